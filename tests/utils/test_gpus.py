"""`kdkit ablate --gpus`: GPU sets from the arguments, one set per concurrent run, and each worker
process confined to its set through the environment it starts with."""

from __future__ import annotations

import multiprocessing
import os
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from conftest import small_ablation_recipe_dict
from environment_probe import report_environment

from kdkit.cli import main
from kdkit.config.validation import parse_recipe
from kdkit.errors import UsageError
from kdkit.run.gpu_runs import trains_on_cuda
from kdkit.utils.gpus import GpuPlan, gpu_environments, multi_gpu_hint, plan_gpus, worker_environment
from kdkit.utils.workers import SlotQueue, WorkerPool


# ------------------------------------------------------------------------------------ the sets
@pytest.mark.parametrize(
    ("gpus", "per_run", "jobs", "expected"),
    [
        (None, 1, None, GpuPlan([(0,), (1,), (2,), (3,)], 4)),  # default: every visible GPU
        ("all", 2, None, GpuPlan([(0, 1), (2, 3)], 2)),
        ("3,1", 1, None, GpuPlan([(3,), (1,)], 2)),
        ("0,1,2,3", 1, 2, GpuPlan([(0,), (1,)], 2)),  # fewer runs at a time than sets: the first sets
        ("none", 1, 3, GpuPlan([], 3)),  # no assignment: --jobs as before
    ],
)
def test_gpu_sets_are_disjoint_and_one_per_concurrent_run(
    gpus: str | None, per_run: int, jobs: int | None, expected: GpuPlan
) -> None:
    plan = plan_gpus(gpus, per_run, jobs, visible=4)
    assert plan == expected
    used = [g for s in plan.sets for g in s]
    assert len(used) == len(set(used))  # never two runs on one GPU


def test_without_cuda_there_is_no_assignment_and_jobs_keep_their_meaning() -> None:
    assert plan_gpus(None, 1, None, visible=0) == GpuPlan([], 1)
    assert plan_gpus(None, 1, 2, visible=0) == GpuPlan([], 2)


@pytest.mark.parametrize(
    ("gpus", "per_run", "jobs", "message"),
    [
        ("0,0", 1, None, "--gpus 0,0: a GPU is named twice"),
        ("3", 1, None, "--gpus 3: no GPU 3; this machine shows 2 GPU(s), expected indices 0 to 1"),
        ("0,x", 1, None, "--gpus '0,x': expected 'all', 'none' or GPU indices"),
        ("all", 3, None, "--gpus-per-run 3: does not divide the 2 GPUs of --gpus all"),
        ("all", 0, None, "--gpus-per-run 0: expected at least 1"),
        ("0,1", 1, 3, "--jobs 3: more runs at a time than the 2 GPU set(s) of --gpus 0,1"),
        ("none", 2, None, "--gpus-per-run 2: needs GPUs, and none are assigned (--gpus none"),
    ],
)
def test_impossible_gpu_arguments_name_the_argument(
    gpus: str, per_run: int, jobs: int | None, message: str
) -> None:
    with pytest.raises(UsageError, match="^" + message.replace("(", r"\(").replace(")", r"\)")):
        plan_gpus(gpus, per_run, jobs, visible=2)


def test_gpus_without_cuda_is_refused_by_kdkit_ablate_before_any_work(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: --gpus is accepted")
    monkeypatch.chdir(tmp_path)
    Path("tiny.yaml").write_text(yaml.safe_dump(small_ablation_recipe_dict(), sort_keys=False))
    grid = ["ablate", "tiny.yaml", "--vary", "distill.alpha=0.1", "--out", "abl"]
    assert main([*grid, "--gpus", "0,1"]) == 2
    err = capsys.readouterr().err
    assert "--gpus 0,1: no CUDA GPU is visible (torch.cuda.is_available() is False" in err
    assert "leave --gpus out to run on the CPU" in err and "Traceback" not in err
    assert main([*grid, "--gpus-per-run", "2", "--set", "train.device=auto"]) == 2
    assert "--gpus-per-run 2: needs GPUs, and no CUDA GPU is visible" in capsys.readouterr().err
    assert not Path("abl").exists()


def test_a_recipe_that_trains_on_the_cpu_only_gets_no_gpus_by_default() -> None:
    data = small_ablation_recipe_dict()  # train.device: cpu
    assert not trains_on_cuda(parse_recipe(data))
    data["pipeline"][0]["train"] = {"device": "auto"}  # one stage may use CUDA: GPUs are assigned
    assert trains_on_cuda(parse_recipe(data))


# ------------------------------------------------------------------------------------ the environment
def test_a_worker_environment_names_its_gpus_within_the_visible_ones(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert worker_environment((2, 3)) == {"CUDA_VISIBLE_DEVICES": "2,3", "KDKIT_GPUS": "2,3"}
    # kdkit itself confined to GPUs 4-7 (or MIG slices): index 1 is the second of those.
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,MIG-abc,7")
    assert worker_environment((1, 2)) == {"CUDA_VISIBLE_DEVICES": "5,MIG-abc", "KDKIT_GPUS": "1,2"}


def test_a_slot_is_never_held_twice_and_a_freed_one_is_taken_next() -> None:
    slots = SlotQueue(2)
    first, second = slots.take(), slots.take()
    assert {first, second} == {0, 1}
    with pytest.raises(RuntimeError, match="every slot is held"):
        slots.take()  # a third run waits: no worker is started
    slots.give_back(second)
    assert slots.take() == second
    slots.give_back(first)
    with pytest.raises(RuntimeError, match="was not held"):
        slots.give_back(first)


@pytest.mark.slow
def test_each_worker_process_sees_only_its_own_gpu_set_and_extra_runs_queue(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Five runs on two sets of two GPUs, through real spawned worker processes."""
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    environments = gpu_environments([(0, 1), (2, 3)])
    with WorkerPool(report_environment, 2, fresh=True, environments=environments) as pool:
        seen = sorted(pool.run(range(5)))
    assert [task for task, *_ in seen] == list(range(5))
    assert {(cuda, gpus) for _, cuda, gpus, _, _ in seen} <= {("0,1", "0,1"), ("2,3", "2,3")}
    for a in seen:
        overlapping = [b for b in seen if b is not a and b[3] < a[4] and a[3] < b[4]]
        assert len(overlapping) <= 1  # at most two runs at a time: the other three queued
        assert all(b[1] != a[1] for b in overlapping)  # and never two on one GPU
    assert "KDKIT_GPUS" not in os.environ and "CUDA_VISIBLE_DEVICES" not in os.environ


# ------------------------------------------------------------------------------------ kdkit run's hint
def test_kdkit_run_on_a_multi_gpu_machine_says_how_to_use_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # The only fake: this machine's GPUs (the run stops at a bad --out before it touches one).
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.chdir(tmp_path)
    Path("tiny.yaml").write_text(yaml.safe_dump(small_ablation_recipe_dict(), sort_keys=False))
    argv = ["run", "tiny.yaml", "--set", "train.device=auto", "--out", "nothing", "--resume"]
    assert main(argv) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "4 GPUs are visible and this run uses one" in err
    assert "torchrun --standalone --nproc_per_node=4 -m kdkit run tiny.yaml" in err
    assert "kdkit ablate tiny.yaml --vary ... --gpus all" in err
    assert multi_gpu_hint(1, "auto", "r.yaml") is None and multi_gpu_hint(4, "cpu", "r.yaml") is None


def test_a_worker_that_cannot_start_gives_its_gpu_set_back() -> None:
    pool = WorkerPool(str, 1, environments=[{"KDKIT_GPUS": "0"}])
    pool.context = _FailingStart()
    with pytest.raises(OSError, match="no process"):
        pool._start()
    assert list(pool.slots.free) == [0]  # the set is free for the next worker


class _FailingStart:
    """A multiprocessing context whose processes cannot start (as when the OS refuses a process)."""

    def Pipe(self) -> tuple[Any, Any]:  # noqa: N802 (multiprocessing's name)
        return multiprocessing.Pipe()

    def Process(self, **_: Any) -> Any:  # noqa: N802
        class Process:
            def start(self) -> None:
                raise OSError("no process")

        return Process()
