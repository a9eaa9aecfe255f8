"""Evaluation: evaluators, scoring a trained model, statistics with intervals, comparing runs, calibration.

The names below were `kdkit.evaluation`'s in 0.2 and stay importable from here."""

from kdkit.evaluation.classification import (
    ClassificationEvaluator,
)
from kdkit.evaluation.protocol import (
    Evaluator,
    Predictions,
)

__all__ = [
    "ClassificationEvaluator",
    "Evaluator",
    "Predictions",
]
