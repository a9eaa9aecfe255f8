"""Module paths of kdkit 0.2, before its modules moved into subpackages, kept importable.

`from kdkit.adapters import build_adapter` or `from kdkit.distiller import SupervisedTask` still
work: importing a 0.2 path gives a small module that hands out the names of the module's new home
(and of the few names that went to another module or were renamed since), so code, plugins and
torchdistill configs written against 0.2 keep working. To patch a function in tests, patch it at its
new path. `kdkit.data`, `kdkit.models` and `kdkit.evaluation` became packages that re-export their
0.2 names.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
from types import ModuleType
from typing import Any

# 0.2 path -> where the module lives now
MOVED_MODULES = {
    "kdkit.recipe": "kdkit.config",
    "kdkit.plan": "kdkit.config.plan",
    "kdkit.adapters": "kdkit.distill.adapters",
    "kdkit.taps": "kdkit.distill.taps",
    "kdkit.losses": "kdkit.distill.losses",
    "kdkit.relations": "kdkit.distill.relations",
    "kdkit.groups": "kdkit.distill.layer_groups",
    "kdkit.teacher_input": "kdkit.distill.teacher_input",
    "kdkit.cache": "kdkit.distill.teacher_cache",
    "kdkit.distiller": "kdkit.distill.distiller",
    "kdkit.torchdistill_compat": "kdkit.distill.torchdistill_compat",
    "kdkit.trainer": "kdkit.training.trainer",
    "kdkit.optim": "kdkit.training.optim",
    "kdkit.distributed": "kdkit.utils.distributed",
    "kdkit.checkpoint": "kdkit.utils.checkpoint",
    "kdkit.lock": "kdkit.utils.lock",
    "kdkit.workers": "kdkit.utils.workers",
    "kdkit.runlog": "kdkit.utils.runlog",
    "kdkit.augment": "kdkit.data.augment",
    "kdkit.frame_store": "kdkit.data.frame_store",
    "kdkit.images": "kdkit.data.images",
    "kdkit.csvfile": "kdkit.data.csvfile",
    "kdkit.throughput": "kdkit.data.throughput",
    "kdkit.hub": "kdkit.models.hub",
    "kdkit.info": "kdkit.models.info",
    "kdkit.evaluators": "kdkit.evaluation.classification",
    "kdkit.scoring": "kdkit.evaluation.scoring",
    "kdkit.comparison": "kdkit.evaluation.comparison",
    "kdkit.stats": "kdkit.evaluation.stats",
    "kdkit.calibration": "kdkit.evaluation.calibration",
    "kdkit.pipeline": "kdkit.run.pipeline",
    "kdkit.build": "kdkit.run.build",
    "kdkit.checks": "kdkit.run.checks",
    "kdkit.stage_cache": "kdkit.run.stage_cache",
    "kdkit.resume": "kdkit.run.resume",
}


# names that left the module their 0.2 path now stands for: (0.2 path, name) -> the module now,
# or "module:name" for a name that was renamed as well
MOVED_NAMES = {
    **{
        ("kdkit.distiller", name): "kdkit.distill.pairs"
        for name in ("LayerPair", "LayerGroup", "PairError", "GroupError", "uniform_pairs")
        + ("layer_pairs", "layer_groups", "feature_taps")
    },
    ("kdkit.distiller", "SupervisedTask"): "kdkit.training.task",
    ("kdkit.distiller", "compile_in_place"): "kdkit.models.compile",
    ("kdkit.distiller", "labeled_cross_entropy"): "kdkit.distill.losses",
    ("kdkit.trainer", "resolve_device"): "kdkit.utils.device",
    ("kdkit.trainer", "autocast"): "kdkit.utils.device",
    ("kdkit.trainer", "predict"): "kdkit.evaluation.predict",
    **{
        ("kdkit.trainer", name): "kdkit.training.display"
        for name in ("EPOCH_LINE_WIDTH", "epoch_lines", "main_terms", "rate_text")
    },
    ("kdkit.build", "build_recipe_model"): "kdkit.run.build:model_from_recipe",
}


class MovedModuleFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds a 0.2 path; loads it as a module that looks its names up where they live now."""

    def find_spec(
        self, fullname: str, path: object = None, target: object = None
    ) -> importlib.machinery.ModuleSpec | None:
        """A spec for a 0.2 path; None (not mine) for every other name."""
        if fullname not in MOVED_MODULES:
            return None
        return importlib.machinery.ModuleSpec(fullname, self)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        """A module standing for `spec.name`'s new home."""
        return ModuleType(spec.name, f"kdkit 0.2's {spec.name}, now {MOVED_MODULES[spec.name]}.")

    def exec_module(self, module: ModuleType) -> None:
        """Give the module a PEP 562 `__getattr__` that looks each name up where it lives now."""
        old = module.__name__
        home = importlib.import_module(MOVED_MODULES[old])

        def __getattr__(name: str) -> Any:
            moved_to, _, renamed = MOVED_NAMES.get((old, name), "").partition(":")
            return getattr(importlib.import_module(moved_to) if moved_to else home, renamed or name)

        module.__getattr__ = __getattr__  # type: ignore[method-assign]


def install() -> None:
    """Put the finder on `sys.meta_path` once (kdkit's `__init__` calls this)."""
    if not any(isinstance(finder, MovedModuleFinder) for finder in sys.meta_path):
        sys.meta_path.append(MovedModuleFinder())
