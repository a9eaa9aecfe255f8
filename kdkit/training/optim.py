"""The optimizer and learning-rate schedule of a training stage, from timm's factories.

`check_optimization` builds both on a one-element parameter, so `kdkit validate` refuses a name
timm does not know (or an optimizer whose package is missing) before any model is trained.
"""

from __future__ import annotations

from typing import Any

import torch
from timm.optim import create_optimizer_v2, list_optimizers
from timm.scheduler import create_scheduler_v2

from kdkit.config.schema import TrainSpec
from kdkit.registry import did_you_mean


def build_optimizer(
    params: Any, spec: TrainSpec, steps_per_epoch: int
) -> tuple[torch.optim.Optimizer, Any | None]:
    """timm's optimizer `spec.optimizer` over `params` (a module or parameters) and its per-step
    scheduler `spec.scheduler` (None for 'none')."""
    optimizer = _optimizer(params, spec)
    return optimizer, None if spec.scheduler == "none" else build_scheduler(optimizer, spec, steps_per_epoch)


def _optimizer(params: Any, spec: TrainSpec) -> torch.optim.Optimizer:
    return create_optimizer_v2(
        params, opt=spec.optimizer, lr=spec.lr, weight_decay=spec.weight_decay, momentum=spec.momentum
    )


def build_scheduler(optimizer: torch.optim.Optimizer, spec: TrainSpec, steps_per_epoch: int) -> Any:
    """timm's scheduler `spec.scheduler` for `optimizer`, stepped once per update."""
    scheduler, _ = create_scheduler_v2(
        optimizer,
        sched=spec.scheduler,
        num_epochs=spec.epochs,
        warmup_epochs=spec.warmup_epochs,
        warmup_lr=spec.warmup_lr,
        min_lr=spec.min_lr,
        step_on_epochs=False,
        updates_per_epoch=steps_per_epoch,
    )
    return scheduler


def check_optimization(spec: TrainSpec, where: str) -> list[str]:
    """Problems building `spec`'s optimizer and scheduler (empty when both build)."""
    try:
        optimizer = _optimizer([torch.nn.Parameter(torch.zeros(1))], spec)
    except Exception as exc:  # unknown name, a missing optional package (bitsandbytes), bad options
        known = list_optimizers()
        if spec.optimizer.lower().split("_")[-1] not in known:  # timm reads 'lookahead_adamw' too
            hint = did_you_mean(spec.optimizer.lower(), known) or " See timm.optim.list_optimizers()."
            return [f"{where}.optimizer: {spec.optimizer!r} is not a timm optimizer.{hint}"]
        return [f"{where}.optimizer: timm cannot build {spec.optimizer!r} with these settings ({exc})"]
    if spec.scheduler == "none":
        return []
    try:
        build_scheduler(optimizer, spec, steps_per_epoch=1)
    except Exception as exc:
        return [
            f"{where}.scheduler: timm cannot build {spec.scheduler!r} ({exc}); expected a timm "
            "scheduler name such as cosine, step, multistep, plateau, poly, tanh, or 'none'"
        ]
    return []
