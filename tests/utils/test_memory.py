"""kdkit.utils.memory: the one peak-memory measure of `kdkit ablate` (a run's whole process) and
`kdkit bench` (a window per mode), the resident set's high-water mark on the CPU and the CUDA
allocator's peak on a GPU."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from kdkit.utils.memory import PeakMemory, process_peak, rss_mib

MIB = 2**20
DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")),
]


def _allocate(device: torch.device, mib: int) -> torch.Tensor:
    """`mib` MiB that really occupy memory (written, so the pages are resident)."""
    return torch.ones(mib * MIB, dtype=torch.uint8, device=device)


@pytest.mark.parametrize("device", DEVICES)
def test_a_window_counts_its_own_peak_and_the_process_peak_includes_it(device: str) -> None:
    where = torch.device(device)
    before = _allocate(where, 192)  # a higher peak before the window must not count in it
    del before
    probe = PeakMemory(where)
    probe.start()
    inside = _allocate(where, 96)
    del inside  # freed before the reading: the window's peak still holds it
    peak = probe.peak()
    assert peak is not None and 90 <= peak < 150, peak
    key = "peak_cuda_MiB" if where.type == "cuda" else "peak_rss_MiB"
    assert process_peak()[key] >= 192  # the whole process: everything since it started
    if where.type == "cpu":
        assert process_peak()[key] >= rss_mib("VmRSS")  # type: ignore[operator]


def test_a_spawned_process_reports_its_own_peak_not_its_parents() -> None:
    """A run of an ablation measures its own worker process: `ru_maxrss` would start at the peak of
    the coordinator that spawned it (the kernel keeps the peak of the image `exec` replaces)."""
    ballast = _allocate(torch.device("cpu"), 1024)  # this process's peak, far above the child's
    child = subprocess.run(
        [
            sys.executable,
            "-c",
            "from kdkit.utils.memory import process_peak; print(process_peak()['peak_rss_MiB'])",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    del ballast
    assert float(child.stdout) < 1024, child.stdout
