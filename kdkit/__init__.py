"""kdkit: knowledge distillation for PyTorch.

Public API (everything a plugin or another project should import):

- `Registry` and the registries `MODELS`, `ADAPTERS`, `DATASETS`, `EVALUATORS`, `TAP_PRESETS`, `COMMANDS`
- taps: `Tap`, `TapRecorder`, `select_features`, `block_taps`, `find_preset`
- adapters: `build_adapter` (identity, projection, covariance, gram)
- losses: `kd_loss`, `cross_entropy`, `build_feature_criterion`
- `Distiller`, `SupervisedTask`, `layer_pairs`, `Trainer`, `Predictions`
- recipes: `load_recipe`, `Recipe`, `RecipeError`; models: `build_model`
- modules for plugins' own tools: `kdkit.images.read_rgb` (any image as 8-bit RGB),
  `kdkit.csvfile.read_csv` (CSV as spreadsheets write it), `kdkit.lock.exclusive` (one writer per
  output folder), `kdkit.workers.WorkerPool` / `stop_on_signals` (interruptible worker processes),
  `kdkit.runlog.progress` / `output` (progress on stderr, results on stdout), `kdkit.checkpoint`'s
  atomic writers
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.2.0"

# Imported on first use (PEP 562): `kdkit --version`, or a Ctrl-C while the command line starts,
# need neither torch nor timm.
_EXPORTS = {
    "build_adapter": "kdkit.adapters",
    "build_dataset": "kdkit.data",
    "build_loaders": "kdkit.data",
    "Distiller": "kdkit.distiller",
    "LayerPair": "kdkit.distiller",
    "SupervisedTask": "kdkit.distiller",
    "layer_pairs": "kdkit.distiller",
    "Evaluator": "kdkit.evaluation",
    "Predictions": "kdkit.evaluation",
    "ClassificationEvaluator": "kdkit.evaluators",
    "build_feature_criterion": "kdkit.losses",
    "cross_entropy": "kdkit.losses",
    "kd_loss": "kdkit.losses",
    "build_model": "kdkit.models",
    "Recipe": "kdkit.recipe",
    "RecipeError": "kdkit.recipe",
    "load_recipe": "kdkit.recipe",
    "ADAPTERS": "kdkit.registry",
    "COMMANDS": "kdkit.registry",
    "DATASETS": "kdkit.registry",
    "EVALUATORS": "kdkit.registry",
    "MODELS": "kdkit.registry",
    "TAP_PRESETS": "kdkit.registry",
    "Registries": "kdkit.registry",
    "Registry": "kdkit.registry",
    "Tap": "kdkit.taps",
    "TapRecorder": "kdkit.taps",
    "find_preset": "kdkit.taps",
    "select_features": "kdkit.taps",
    "block_taps": "kdkit.taps",
    "Trainer": "kdkit.trainer",
}

if TYPE_CHECKING:
    from kdkit.adapters import build_adapter
    from kdkit.data import build_dataset, build_loaders
    from kdkit.distiller import Distiller, LayerPair, SupervisedTask, layer_pairs
    from kdkit.evaluation import Evaluator, Predictions
    from kdkit.evaluators import ClassificationEvaluator
    from kdkit.losses import build_feature_criterion, cross_entropy, kd_loss
    from kdkit.models import build_model
    from kdkit.recipe import Recipe, RecipeError, load_recipe
    from kdkit.registry import (
        ADAPTERS,
        COMMANDS,
        DATASETS,
        EVALUATORS,
        MODELS,
        TAP_PRESETS,
        Registries,
        Registry,
    )
    from kdkit.taps import Tap, TapRecorder, block_taps, find_preset, select_features
    from kdkit.trainer import Trainer


def __getattr__(name: str) -> Any:
    """Import a public name from its module the first time it is used."""
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'kdkit' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


__all__ = [
    "ADAPTERS",
    "COMMANDS",
    "DATASETS",
    "EVALUATORS",
    "MODELS",
    "TAP_PRESETS",
    "ClassificationEvaluator",
    "Distiller",
    "Evaluator",
    "Predictions",
    "Recipe",
    "RecipeError",
    "Registries",
    "Registry",
    "LayerPair",
    "SupervisedTask",
    "Tap",
    "TapRecorder",
    "Trainer",
    "build_adapter",
    "build_dataset",
    "build_feature_criterion",
    "build_loaders",
    "build_model",
    "cross_entropy",
    "find_preset",
    "kd_loss",
    "load_recipe",
    "select_features",
    "layer_pairs",
    "block_taps",
]
