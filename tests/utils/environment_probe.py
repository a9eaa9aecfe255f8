"""A worker function for tests of `WorkerPool(environments=...)`, in a module that imports nothing heavy,
so that each spawned worker starts in a fraction of a second."""

from __future__ import annotations

import os
import time


def report_environment(task: int) -> tuple[int, str | None, str | None, float, float]:
    """(task, CUDA_VISIBLE_DEVICES, KDKIT_GPUS as this process saw them, start and end time)."""
    start = time.time()
    seen = os.environ.get("CUDA_VISIBLE_DEVICES"), os.environ.get("KDKIT_GPUS")
    time.sleep(0.4)  # long enough for the runs that hold GPU sets to overlap
    return task, *seen, start, time.time()
