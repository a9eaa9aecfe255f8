"""Model cost: parameters, fp32 weight size and forward GFLOPs per image."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from kdkit.models.factory import count_parameters


def forward_gflops(model: nn.Module, example: torch.Tensor) -> float:
    """GFLOPs of one forward pass per image (PyTorch's FLOP counter; a multiply-add counts 2)."""
    was_training = model.training
    model.eval()
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(example)
    model.train(was_training)
    return counter.get_total_flops() / example.shape[0] / 1e9


def model_size(model: nn.Module) -> dict[str, float]:
    """Parameters (millions) and fp32 weight size (MiB) of a model."""
    params = count_parameters(model)
    return {"params_M": params / 1e6, "MiB": params * 4 / 2**20}


def model_cost(model: nn.Module, example: torch.Tensor) -> dict[str, float]:
    """`{'params_M', 'MiB', 'GFLOPs'}` for `model` on `example` (a batch of one or more images)."""
    return {**model_size(model), "GFLOPs": forward_gflops(model, example)}


def no_weight_decay_names(model: nn.Module, prefix: str) -> set[str]:
    """The model's own no-weight-decay names (timm: pos_embed, cls_token, ...) under `prefix`."""
    names = model.no_weight_decay() if hasattr(model, "no_weight_decay") else set()
    return {f"{prefix}{name}" for name in names}
