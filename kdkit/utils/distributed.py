"""torch.distributed in one place: start and end a process group, rank helpers, the DDP wrapper.

`torchrun --nproc_per_node=N -m kdkit run RECIPE` starts N processes with RANK, WORLD_SIZE,
LOCAL_RANK and MASTER_ADDR/PORT set; `session()` turns that into a process group (NCCL on CUDA,
gloo on the CPU). Without those variables everything here is a no-op for a single process, so the
rest of kdkit calls these helpers unconditionally. See docs/scaling.md.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from kdkit.utils.runlog import console

# Long enough for rank 0 to evaluate or write a checkpoint while the others wait at a barrier.
TIMEOUT = datetime.timedelta(hours=2)


def is_distributed() -> bool:
    """Whether a process group with more than one process is running."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank (0 without a process group)."""
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    """Number of processes (1 without a process group)."""
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    """Rank 0: the process that logs, prints, evaluates and writes checkpoints."""
    return rank() == 0


def barrier() -> None:
    """Wait for every rank (no-op for a single process)."""
    if is_distributed():
        dist.barrier()


def device_for_rank(name: str) -> str:
    """Under torchrun on CUDA, 'auto'/'cuda' mean this process's own GPU (LOCAL_RANK)."""
    if is_distributed() and torch.cuda.is_available() and name in ("auto", "cuda"):
        return f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    return name


@contextlib.contextmanager
def session() -> Iterator[None]:
    """Start a process group when launched by torchrun (WORLD_SIZE > 1); end it afterwards.

    Ranks other than 0 print nothing: their console is silenced.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        yield
        return
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group(backend, timeout=TIMEOUT)
    quiet = console.quiet
    console.quiet = not is_main()
    try:
        yield
    finally:
        console.quiet = quiet
        dist.destroy_process_group()


@contextlib.contextmanager
def main_first() -> Iterator[None]:
    """Rank 0 runs the block first (e.g. generating or downloading data), then the others."""
    if not is_main():
        barrier()
    yield
    if is_main():
        barrier()


def broadcast_object(obj: Any) -> Any:
    """Rank 0's `obj` on every rank."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_sum(tensor: torch.Tensor) -> torch.Tensor:
    """The element-wise sum of `tensor` over all ranks (the tensor itself for one process)."""
    if is_distributed():
        tensor = tensor.clone()
        dist.all_reduce(tensor)
    return tensor


def wrap(task: nn.Module, device: torch.device) -> nn.Module:
    """The module a training step calls: `task` itself, or `task` inside DistributedDataParallel.

    The whole task is wrapped, so its `forward(images, labels, keys)` (teacher, student, adapters,
    losses) runs as usual and DDP sees every trainable parameter used in it. The frozen teacher is
    excluded from DDP: its parameters and buffers are neither broadcast nor synchronised, each rank
    keeps its own inference-only copy. Hooks (taps) must be registered before this call.
    """
    if not is_distributed():
        return task
    teacher = getattr(task, "teacher", None)
    if isinstance(teacher, nn.Module):
        names = [f"teacher.{n}" for n, _ in teacher.named_parameters()]
        names += [f"teacher.{n}" for n, _ in teacher.named_buffers()]
        nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(task, names)
    device_ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(task, device_ids=device_ids)


def decorrelate_rng() -> None:
    """Give each rank its own torch random stream (dropout, drop-path) from the shared seed."""
    if is_distributed():
        base = int(torch.randint(0, 2**62, (1,)).item())
        torch.manual_seed(base + rank())
