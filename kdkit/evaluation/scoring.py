"""Score a trained model on a split the way the evaluate stage and `kdkit eval` both do:
predictions on the dev split and the split, the evaluator's metrics and files, the bootstrap
intervals when the evaluator can resample, and the calibration `kdkit export` reads."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from kdkit.config.schema import Recipe
from kdkit.data.datasets import build_dataset, eval_loader
from kdkit.evaluation.calibration import write_calibration
from kdkit.evaluation.comparison import replicates_path
from kdkit.evaluation.predict import predict
from kdkit.evaluation.stats import LEVEL, enough_units
from kdkit.models.info import model_size
from kdkit.utils.device import resolve_device


def evaluate_model(
    model: nn.Module, recipe: Recipe, split: str, out_dir: Path, evaluator: Any, label: str
) -> dict[str, Any]:
    """Predict on the dev split ('val') and `split`, let the evaluator turn that into metrics and
    write its files to `out_dir`, record the calibration (thresholds, for `kdkit export`) and, when
    the evaluator can resample, the bootstrap replicates and intervals; return the metrics with the
    model's size. The evaluate stage and `kdkit eval` both use it."""
    device = resolve_device(recipe.train.device)
    model.to(device)
    predictions = {
        s: predict(
            model,
            eval_loader(build_dataset(recipe.data, s), recipe.data),
            device,
            recipe.train.amp,
            f"{label} {s}",
        )
        for s in dict.fromkeys(["val", split])
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    results = {**evaluator(predictions, out_dir), **model_size(model)}
    bootstrap = getattr(evaluator, "bootstrap", None)
    if bootstrap is not None:
        replicates = bootstrap(predictions, split)
        replicates.save(replicates_path(out_dir, split))
        if enough_units(replicates.n_units):  # else no interval: `resampling` says why
            results["intervals"] = {key: list(replicates.interval(key)) for key in replicates.values}
        results["resampling"] = {
            "unit": replicates.unit,
            "n_units": replicates.n_units,
            "draws": len(next(iter(replicates.values.values()))),
            "confidence": LEVEL,
        }
    write_calibration(out_dir, results, split)
    return results
