"""benchmarks/gpu.sh, the prepared GPU benchmark, run on the CPU at its toy size (--tiny)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_benchmark_runs_at_a_tiny_size_and_prints_one_json() -> None:
    kdkit = Path(sys.executable).parent / "kdkit"
    env = {**os.environ, "KDKIT": str(kdkit)}
    done = subprocess.run(
        ["bash", str(REPO / "benchmarks" / "gpu.sh"), "--tiny"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout)
    assert report["tiny"] is True and report["gpu"] is None  # no GPU here
    eager, compiled = report["eager"], report["compiled"]
    assert set(eager["modes"]) == {"student", "distill", "cached", "reference"}  # --tiny: no (e)
    assert set(compiled["modes"]) == {"distill"}  # --tiny compiles (b) only
    for run in (eager, compiled):
        assert run["input"] == [3, 32, 32] and run["batch"] == 4
        assert all(row["img_per_s"] > 0 for row in run["modes"].values()), run["modes"]
    assert eager["compile"] is False and compiled["compile"] is True
    assert compiled["ratios"]["b/a"] is None and eager["ratios"]["b/a"] > 0  # unmeasured: no ratio
    two = report["two_teachers"]  # the same teacher twice: twice its FLOPs, a share each
    assert set(two["modes"]) == {"student", "distill"} and len(two["teachers"]) == 2
    assert two["forward_gflops_per_image"]["teacher"] == 2 * eager["forward_gflops_per_image"]["teacher"]
    assert all(t["share_of_distill_step"] > 0 for t in two["teachers"])
