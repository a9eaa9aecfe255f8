"""kdkit: knowledge distillation for PyTorch.

Public API (everything a plugin or another project should import):

- `Registry` and the registries `MODELS`, `ADAPTERS`, `DATASETS`, `EVALUATORS`, `TAP_PRESETS`, `COMMANDS`
- taps: `Tap`, `TapRecorder`, `select_features`, `stage_taps`, `find_preset`
- adapters: `build_adapter` (identity, projection, covariance, gram)
- losses: `kd_loss`, `cross_entropy`, `build_feature_criterion`
- `Distiller`, `SupervisedTask`, `stage_pairs`, `Trainer`, `Predictions`
- recipes: `load_recipe`, `Recipe`, `RecipeError`; models: `build_model`
- modules for plugins' own tools: `kdkit.images.read_rgb` (any image as 8-bit RGB),
  `kdkit.csvfile.read_csv` (CSV as spreadsheets write it), `kdkit.lock.exclusive` (one writer per
  output folder), `kdkit.workers.WorkerPool` / `stop_on_signals` (interruptible worker processes),
  `kdkit.runlog.progress` / `output` (progress on stderr, results on stdout), `kdkit.checkpoint`'s
  atomic writers
"""

from kdkit.adapters import build_adapter
from kdkit.data import build_dataset, build_loaders
from kdkit.distiller import Distiller, StagePair, SupervisedTask, stage_pairs
from kdkit.evaluation import Evaluator, Predictions
from kdkit.evaluators import ClassificationEvaluator
from kdkit.losses import build_feature_criterion, cross_entropy, kd_loss
from kdkit.models import build_model
from kdkit.recipe import Recipe, RecipeError, load_recipe
from kdkit.registry import ADAPTERS, COMMANDS, DATASETS, EVALUATORS, MODELS, TAP_PRESETS, Registries, Registry
from kdkit.taps import Tap, TapRecorder, find_preset, select_features, stage_taps
from kdkit.trainer import Trainer

__version__ = "0.2.0"

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
    "StagePair",
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
    "stage_pairs",
    "stage_taps",
]
