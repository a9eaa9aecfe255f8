"""kdkit: knowledge distillation for PyTorch.

Public API (everything a plugin or another project should import):

- `Registry` and the registries `MODELS`, `ADAPTERS`, `DATASETS`, `EVALUATORS`, `TAP_PRESETS`, `COMMANDS`
- taps: `Tap`, `TapRecorder`, `select_features`, `block_taps`, `find_preset`
- adapters: `build_adapter` (identity, projection, procrustes, covariance, cka, gram, ...)
- losses: `kd_loss`, `cross_entropy`, `build_feature_criterion`
- `Distiller`, `SupervisedTask`, `layer_pairs`, `Trainer`, `Predictions`
- recipes: `load_recipe`, `Recipe`, `RecipeError`; models: `build_model`
- modules for plugins' own tools: `kdkit.data.images.read_rgb` (any image as 8-bit RGB),
  `kdkit.data.csvfile.read_csv` (CSV as spreadsheets write it), `kdkit.utils.lock.exclusive` (one
  writer per output folder), `kdkit.utils.workers.WorkerPool` / `stop_on_signals` (interruptible
  worker processes), `kdkit.utils.runlog.progress` / `output` (progress on stderr, results on
  stdout), `kdkit.utils.checkpoint`'s atomic writers

The package's folders are its layers (docs/architecture.md): `cli/` → `run/` → `training/` →
`distill/`, on `config/`, `data/`, `models/`, `evaluation/` and `utils/`. kdkit 0.2's flat module
paths (`kdkit.adapters`, `kdkit.trainer`, ...) still import (`kdkit._moved`).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from kdkit import _moved

__version__ = "0.2.0"
# The release whose cache keys this code still derives (the "kdkit" field of the teacher-output and
# stage cache keys). Raise it only when what a cache stores changes meaning: a new release alone
# must not turn every stored teacher output and trained stage into a miss.
CACHE_KEYS_VERSION = "0.2.0"

_moved.install()  # the module paths of 0.2 (`kdkit.adapters`, `kdkit.trainer`, ...) keep working

# Imported on first use (PEP 562): `kdkit --version`, or a Ctrl-C while the command line starts,
# need neither torch nor timm.
_EXPORTS = {
    "build_adapter": "kdkit.distill.adapters",
    "build_dataset": "kdkit.data.datasets",
    "build_loaders": "kdkit.data.datasets",
    "Distiller": "kdkit.distill.distiller",
    "LayerPair": "kdkit.distill.pairs",
    "SupervisedTask": "kdkit.training.task",
    "layer_pairs": "kdkit.distill.pairs",
    "Evaluator": "kdkit.evaluation.protocol",
    "Predictions": "kdkit.evaluation.protocol",
    "ClassificationEvaluator": "kdkit.evaluation.classification",
    "build_feature_criterion": "kdkit.distill.losses",
    "cross_entropy": "kdkit.distill.losses",
    "kd_loss": "kdkit.distill.losses",
    "build_model": "kdkit.models.factory",
    "Recipe": "kdkit.config.schema",
    "RecipeError": "kdkit.config.schema",
    "load_recipe": "kdkit.config.loading",
    "ADAPTERS": "kdkit.registry",
    "COMMANDS": "kdkit.registry",
    "DATASETS": "kdkit.registry",
    "EVALUATORS": "kdkit.registry",
    "MODELS": "kdkit.registry",
    "TAP_PRESETS": "kdkit.registry",
    "Registries": "kdkit.registry",
    "Registry": "kdkit.registry",
    "Tap": "kdkit.distill.taps",
    "TapRecorder": "kdkit.distill.taps",
    "find_preset": "kdkit.distill.taps",
    "select_features": "kdkit.distill.taps",
    "block_taps": "kdkit.distill.taps",
    "Trainer": "kdkit.training.trainer",
}

if TYPE_CHECKING:
    from kdkit.config.loading import load_recipe
    from kdkit.config.schema import Recipe, RecipeError
    from kdkit.data.datasets import build_dataset, build_loaders
    from kdkit.distill.adapters import build_adapter
    from kdkit.distill.distiller import Distiller
    from kdkit.distill.losses import build_feature_criterion, cross_entropy, kd_loss
    from kdkit.distill.pairs import LayerPair, layer_pairs
    from kdkit.distill.taps import Tap, TapRecorder, block_taps, find_preset, select_features
    from kdkit.evaluation.classification import ClassificationEvaluator
    from kdkit.evaluation.protocol import Evaluator, Predictions
    from kdkit.models.factory import build_model
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
    from kdkit.training.task import SupervisedTask
    from kdkit.training.trainer import Trainer


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
