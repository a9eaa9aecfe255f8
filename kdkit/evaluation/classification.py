"""Built-in evaluators. Plugins register domain evaluators (e.g. FAS HTER/ACER) the same way."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch.nn.functional as F

from kdkit.evaluation.protocol import Predictions
from kdkit.evaluation.stats import DRAWS, SEED, Replicates, bootstrap
from kdkit.registry import EVALUATORS


@EVALUATORS.register("classification")
class ClassificationEvaluator:
    """Top-1 accuracy and cross-entropy per split; the best checkpoint has the highest val accuracy."""

    monitor = "val/accuracy"
    mode = "max"
    summary_keys = ["test/accuracy"]
    optimistic_monitor = "test/accuracy"

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

    def bootstrap(
        self, predictions: dict[str, Predictions], split: str, draws: int = DRAWS, seed: int = SEED
    ) -> Replicates:
        """Accuracy on `split` under bootstrap resamples of its samples (each sample is a unit)."""
        pred = predictions[split]
        correct = (pred.logits.argmax(1) == pred.labels).numpy().astype(np.float64)

        def accuracy(counts: np.ndarray, inverse: np.ndarray) -> dict[str, np.ndarray]:
            weights = counts[:, inverse]
            return {f"{split}/accuracy": (weights @ correct) / weights.sum(1)}

        return bootstrap([str(i) for i in range(correct.size)], "sample", accuracy, draws, seed)
