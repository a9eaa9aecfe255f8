"""Which GPUs the runs of `kdkit ablate` use: `--gpus` and `--gpus-per-run` checked against the GPUs
this process sees, split into disjoint sets (one per concurrent run), and the environment that
confines a worker process to its set.

A worker gets its set through `CUDA_VISIBLE_DEVICES`, set before the process starts: CUDA reads the
variable once, when it initialises, so a process that already asked torch about CUDA could not be
confined any more. Inside the worker its GPUs are `cuda:0` ... `cuda:N-1`, so `train.device: auto`
needs no change. See docs/scaling.md.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from kdkit.errors import UsageError

CUDA_VARIABLE = "CUDA_VISIBLE_DEVICES"
GPUS_VARIABLE = "KDKIT_GPUS"  # a worker's set as the coordinator numbers its GPUs, e.g. "2,3"

GpuSet = tuple[int, ...]


@dataclass(frozen=True)
class GpuPlan:
    """The GPU sets that runs take turns on (empty: no GPU assignment) and how many runs go at once."""

    sets: list[GpuSet]
    jobs: int


def visible_gpus() -> int:
    """How many CUDA GPUs this process sees (0 without CUDA)."""
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def plan_gpus(gpus: str | None, per_run: int, jobs: int | None, visible: int) -> GpuPlan:
    """The GPU sets of `--gpus` (None: every visible GPU; 'none': no assignment) split by
    `--gpus-per-run`, and the runs at a time: `--jobs`, by default one per set, never more than
    the sets (two runs never share a GPU). A `UsageError` names the argument that cannot work."""
    if per_run < 1:
        raise UsageError(f"--gpus-per-run {per_run}: expected at least 1")
    if gpus == "none" or (gpus is None and visible == 0):
        if per_run != 1:
            raise UsageError(f"--gpus-per-run {per_run}: needs GPUs, and {_no_gpus(gpus)}")
        return GpuPlan([], jobs or 1)
    if visible == 0:
        raise UsageError(f"--gpus {gpus}: {_no_gpus(gpus)}; leave --gpus out to run on the CPU")
    indices = parse_gpus(gpus or "all", visible)
    if len(indices) % per_run:
        raise UsageError(
            f"--gpus-per-run {per_run}: does not divide the {len(indices)} GPUs of --gpus "
            f"{gpus or 'all'}; expected a divisor of {len(indices)}"
        )
    sets = [tuple(indices[i : i + per_run]) for i in range(0, len(indices), per_run)]
    if jobs is not None and jobs > len(sets):
        raise UsageError(
            f"--jobs {jobs}: more runs at a time than the {len(sets)} GPU set(s) of --gpus "
            f"{gpus or 'all'} with --gpus-per-run {per_run} (runs never share a GPU); expected at "
            f"most {len(sets)}, or --gpus none to run on the CPU"
        )
    return GpuPlan(sets[: jobs or len(sets)], jobs or len(sets))


def _no_gpus(gpus: str | None) -> str:
    """Why no GPU can be assigned, for a message."""
    if gpus == "none":
        return "none are assigned (--gpus none, or a recipe that trains on the CPU only)"
    cause = "torch.cuda.is_available() is False" if not torch.cuda.is_available() else "none are visible"
    return f"no CUDA GPU is visible ({cause}, {CUDA_VARIABLE}={os.environ.get(CUDA_VARIABLE, '(unset)')})"


def parse_gpus(text: str, visible: int) -> list[int]:
    """`--gpus`: 'all' or distinct indices '0,2,3' below `visible`, as this process numbers its GPUs."""
    if text == "all":
        return list(range(visible))
    try:
        indices = [int(part) for part in text.split(",")]
    except ValueError:
        raise UsageError(f"--gpus {text!r}: expected 'all', 'none' or GPU indices such as 0,1") from None
    if len(set(indices)) != len(indices):
        raise UsageError(f"--gpus {text}: a GPU is named twice; expected distinct indices")
    outside = [i for i in indices if not 0 <= i < visible]
    if outside:
        raise UsageError(
            f"--gpus {text}: no GPU {outside[0]}; this machine shows {visible} GPU(s), "
            f"expected indices 0 to {visible - 1}"
        )
    return indices


def worker_environment(gpu_set: GpuSet) -> dict[str, str]:
    """The variables that confine a worker to `gpu_set`: `CUDA_VISIBLE_DEVICES` (the set's entries of
    this process's own `CUDA_VISIBLE_DEVICES` when it has one, since indices count visible GPUs) and
    `KDKIT_GPUS`, the set as given."""
    own = os.environ.get(CUDA_VARIABLE)
    entries = [e.strip() for e in own.split(",")] if own else None
    devices = [entries[i] if entries else str(i) for i in gpu_set]
    return {CUDA_VARIABLE: ",".join(devices), GPUS_VARIABLE: ",".join(map(str, gpu_set))}


def multi_gpu_hint(visible: int, device: str, recipe: str) -> str | None:
    """What `kdkit run` says when the machine has several GPUs and the run would use one of them."""
    if visible < 2 or device not in ("auto", "cuda") or int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return None
    return (
        f"{visible} GPUs are visible and this run uses one. To train it on all of them: "
        f"torchrun --standalone --nproc_per_node={visible} -m kdkit run {recipe} ...; to run "
        f"several variants or seeds at once, one per GPU: kdkit ablate {recipe} --vary ... --gpus all "
        "(docs/scaling.md)"
    )


def gpu_environments(sets: list[GpuSet]) -> list[dict[str, str]] | None:
    """One worker environment per GPU set (`worker_environment`); None without GPU sets."""
    return [worker_environment(s) for s in sets] or None


def describe_sets(sets: list[GpuSet]) -> str:
    """'each on GPUs of its own: 0,1 | 2,3'."""
    return "each on GPUs of its own: " + " | ".join(",".join(map(str, s)) for s in sets)


def worker_gpu_count() -> int:
    """How many GPUs this worker was given (`KDKIT_GPUS`); 0 outside `kdkit ablate --gpus`."""
    gpus = os.environ.get(GPUS_VARIABLE)
    return len(gpus.split(",")) if gpus else 0


def on_gpus() -> str:
    """' on GPU 2,3' in a worker given GPUs 2 and 3 (`KDKIT_GPUS`), else ''."""
    gpus = os.environ.get(GPUS_VARIABLE)
    return f" on GPU {gpus}" if gpus else ""
