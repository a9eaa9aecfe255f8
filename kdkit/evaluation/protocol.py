"""What an evaluator receives and returns.

The trainer runs the model over each evaluation split (no shuffling) and hands the evaluator one
`Predictions` per split. An evaluator only computes metrics; plugins register their own.

Besides the `Evaluator` protocol, an evaluator may have (kdkit uses them when present):

- `summary_keys`: the headline metrics, in the order tables show them;
- `bootstrap(predictions, split, draws, seed) -> kdkit.evaluation.stats.Replicates`: the metrics of `split`
  on bootstrap resamples of its independent units, for intervals and paired comparisons;
- `paper_keys`: numbers computed the way published code computes them (e.g. a threshold chosen
  on the test set), shown only in a separate, labelled section and never used for selection;
- `num_classes`: the number of model outputs the metrics are defined for (e.g. 2 for live vs
  attack); `kdkit validate` refuses models with another number of outputs before any training;
- `optimistic_monitor`: the test metric published code selects its epoch by (same direction as
  `monitor`); with `train.track_test` the trainer records which epoch that would be.
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
