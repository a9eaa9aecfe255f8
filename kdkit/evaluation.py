"""What an evaluator receives and returns.

The trainer runs the model over each evaluation split (no shuffling) and hands the evaluator one
`Predictions` per split. An evaluator only computes metrics; plugins register their own.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch


@dataclass
class Predictions:
    """Model outputs over one data split, in dataset order.

    `dataset` is the split's dataset; evaluators read per-sample metadata from its optional
    `meta` attribute (a list of dicts aligned with the dataset indices, e.g. video ids).
    """

    logits: torch.Tensor  # (N, C) float32 on the CPU
    labels: torch.Tensor  # (N,) int64 on the CPU
    dataset: Any


class Evaluator(Protocol):
    """Turns predictions on named splits ('val', 'test') into flat `{'split/metric': float}`."""

    monitor: str  # metric key used to pick the best checkpoint, e.g. 'val/accuracy'
    mode: str  # 'max' or 'min'

    def __call__(self, predictions: dict[str, Predictions], out_dir: Path | None = None) -> dict[str, float]:
        """Compute metrics; may write plots or tables under `out_dir`."""
        ...
