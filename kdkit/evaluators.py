"""Built-in evaluators. Plugins register domain evaluators (e.g. FAS HTER/ACER) the same way."""

from __future__ import annotations

from pathlib import Path

import torch.nn.functional as F

from kdkit.evaluation import Predictions
from kdkit.registry import EVALUATORS


@EVALUATORS.register("classification")
class ClassificationEvaluator:
    """Top-1 accuracy and cross-entropy per split; the best checkpoint has the highest val accuracy."""

    monitor = "val/accuracy"
    mode = "max"

    def __init__(self, **options: object) -> None:
        if options:
            raise ValueError(
                f"evaluator_options: the classification evaluator takes no options, got {sorted(options)}"
            )

    def __call__(self, predictions: dict[str, Predictions], out_dir: Path | None = None) -> dict[str, float]:
        """Return `{'<split>/accuracy': ..., '<split>/loss': ...}` for every split."""
        metrics = {}
        for split, pred in predictions.items():
            metrics[f"{split}/accuracy"] = (pred.logits.argmax(1) == pred.labels).float().mean().item()
            metrics[f"{split}/loss"] = F.cross_entropy(pred.logits, pred.labels).item()
        return metrics
