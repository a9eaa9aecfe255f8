"""What a stage depends on (`stage_inputs`, `stage_upstream`), and train stages shared between runs
(`kdkit ablate`): an identical `train` stage is trained once.

A `train` stage is keyed by a hash of exactly what its model depends on (`train_stage_key`); the
first run that needs it trains it and publishes ``DIR/<key>/{model.pt,done.json}`` in one folder
rename; the others wait on the entry's lock and reuse it. Distill stages are never cached: they
are what an ablation varies.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kdkit import CACHE_KEYS_VERSION
from kdkit.config.schema import TRACKING_KEYS, DistillSpec, Recipe, StageSpec, TrainSpec
from kdkit.utils import distributed
from kdkit.utils.checkpoint import atomic_path, atomic_write_text, file_sha256
from kdkit.utils.lock import locked


def stage_inputs(recipe: Recipe, stage: StageSpec) -> dict[str, Any]:
    """What a stage's result depends on in the recipe, as a mapping whose key paths name it
    (`distill.select`, `train.lr`, `models.student.options.depth`, ...).

    Not the results of earlier stages it reads (`stage_upstream`), nor files named by the recipe
    (initial weights). Train: its data, model spec, merged training settings (with the stage's seed)
    and the evaluator (it picks the saved epoch); distill: the same for its student, plus its
    merged distill section and its teacher's spec; evaluate: its runs, split, baseline, the
    top-level data and the device and precision it predicts with."""
    evaluator = [recipe.evaluator, recipe.evaluator_options]
    if stage.do == "evaluate":
        return {
            "do": stage.do,
            "runs": stage.runs,
            "split": stage.split,
            "baseline": stage.baseline,
            "data": dataclasses.asdict(recipe.data),
            "train": {"device": recipe.train.device, "amp": recipe.train.amp},
            "evaluator": evaluator,
        }
    plan = recipe.plan.of(stage)
    train = plan.train
    inputs = {
        "do": stage.do,
        "data": dataclasses.asdict(plan.data),
        # a tracked test split is the run's own (reported only; see Trainer.best_on_test)
        "test_data": dataclasses.asdict(recipe.data) if train.track_test else None,
        "train": _train_inputs(train),
        "evaluator": evaluator,
    }
    if stage.do == "train":  # the key `model` (not `models`) keeps existing cache entries valid
        return {**inputs, "model": dataclasses.asdict(recipe.models[stage.model])}
    distill = plan.distill_spec()
    keys = (distill.student, *(t.model for t in plan.teachers))
    models = {key: dataclasses.asdict(recipe.models[key]) for key in keys}
    return {**inputs, "distill": _distill_inputs(distill), "models": models}


def _train_inputs(train: TrainSpec) -> dict[str, Any]:
    """The merged train section as stage inputs, without where the run is logged (`TRACKING_KEYS`):
    no result depends on it, and the keys of stages trained before those keys existed stay valid."""
    inputs = dataclasses.asdict(train)
    for key in TRACKING_KEYS:
        del inputs[key]
    return inputs


def _distill_inputs(distill: DistillSpec) -> dict[str, Any]:
    """The distill section as stage inputs; a one-teacher section without the several-teacher keys,
    so that the stages of recipes written before them keep their keys."""
    inputs = dataclasses.asdict(distill)
    if not distill.teachers:
        del inputs["teachers"], inputs["teacher_combine"]
    return inputs


def stage_upstream(recipe: Recipe, stage: StageSpec) -> list[str]:
    """The earlier stages whose results `stage` reads: a distill stage's teacher, when a stage trains
    it, and an evaluate stage's runs."""
    if stage.do == "evaluate":
        return list(stage.runs)
    stages = [t.stage for t in recipe.plan.of(stage).teachers if t.stage]
    return list(dict.fromkeys(stages))


def train_stage_key(recipe: Recipe, stage: StageSpec) -> str:
    """Hash of exactly what a `train` stage's model depends on: its `stage_inputs`, the SHA-256 of
    its model's initial weights file and `kdkit.CACHE_KEYS_VERSION`; not the distill section, other models
    or the stage's name."""
    spec = recipe.models[stage.model]
    parts = {
        **stage_inputs(recipe, stage),
        "weights_sha256": file_sha256(spec.weights) if spec.weights else None,
        "kdkit": CACHE_KEYS_VERSION,
    }
    text = json.dumps(parts, sort_keys=True, default=str)
    return f"{stage.model}-{hashlib.sha256(text.encode()).hexdigest()[:16]}"


class StageCache:
    """The folder of shared train stages; `fetch_or_train` gives a stage's result and model."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)

    def entry(self, recipe: Recipe, stage: StageSpec) -> Path:
        """The folder of `stage`'s cached result (it may not exist yet)."""
        return self.folder / train_stage_key(recipe, stage)

    def fetch_or_train(
        self,
        recipe: Recipe,
        stage: StageSpec,
        model_path: Path,
        train: Callable[[], dict[str, Any]],
        run_name: str,
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """The stage's result and its cache record (key, reused, trained_by), with its model at
        `model_path`: linked from the cache, or trained by `train()` and published.

        The entry's lock makes concurrent runs that need the same stage wait for one training. Under
        DDP, rank 0 alone holds it and decides; every rank trains (a rank waiting on the lock would
        leave rank 0 waiting for it at the first gradient), rank 0 alone links and publishes."""
        entry = self.entry(recipe, stage)
        lock, main = entry.with_name(f"{entry.name}.lock"), distributed.is_main()
        if distributed.is_distributed():
            with locked(lock):  # first wait out another run's training alone, not in a collective (timeout)
                pass
        with locked(lock) if main else contextlib.nullcontext():
            done = entry / "done.json"
            cached = distributed.broadcast_object(
                json.loads(done.read_text()) if main and done.exists() else None
            )
            if cached is not None:
                if main:
                    link_or_copy(entry / "model.pt", model_path)
                result, reused, trained_by = cached["result"], True, cached["trained_by"]
            else:
                result, reused, trained_by = train(), False, run_name
                if main:
                    _publish(model_path, entry, {"result": result, "trained_by": trained_by})
            distributed.barrier()  # the other ranks read the model once it is in place
        return result, {"key": entry.name, "reused": reused, "trained_by": trained_by}


def link_or_copy(src: Path, dst: Path) -> None:
    """Hard-link `src` to `dst` (a copy across file systems) through a temporary name: atomic."""
    with atomic_path(dst) as tmp:
        tmp.unlink()
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copy2(src, tmp)


def _publish(model: Path, entry: Path, record: dict[str, Any]) -> None:
    """Put `model` and `done.json` into the cache folder `entry`, all at once (a folder rename)."""
    tmp = entry.with_name(f".{entry.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    link_or_copy(model, tmp / "model.pt")
    atomic_write_text(json.dumps(record, indent=2), tmp / "done.json")
    os.replace(tmp, entry)
