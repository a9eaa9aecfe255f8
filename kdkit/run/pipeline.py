"""Running a recipe: check the whole plan first, then run its stages in order.

Run directory layout::

    RUN/recipe.yaml          the resolved recipe (after --set overrides)
    RUN/metrics.jsonl        one JSON object per logged step / epoch, every stage
    RUN/summary.json         final metrics of every stage (best and last)
    RUN/<stage>/last.pt      resume state of a train/distill stage
    RUN/<stage>/model.pt     the trained network at its best validation epoch
    RUN/<stage>/done.json    written last: the stage is complete and is skipped on --resume
    RUN/trackers.json        the run ids of its experiment trackers (`train.loggers`), if any

`kdkit.run.checks.check_recipe` checks the whole plan before a run; `RecipeRun` only runs it. With a
shared stage cache (`RecipeRun(..., stage_cache=StageCache(DIR))`, used by `kdkit ablate`), an
identical `train` stage is trained once (see `kdkit.run.stage_cache`).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import yaml
from torch import nn

from kdkit.config.schema import DataSpec, ModelSpec, Recipe, RecipeError, StageSpec
from kdkit.data.datasets import build_dataset, build_loaders, eval_loader
from kdkit.distill.distiller import Distiller
from kdkit.distill.several_teachers import SeveralTeachers
from kdkit.evaluation.comparison import (
    differences,
    differences_table,
    load_replicates,
    paper_section,
    paper_table,
    results_table,
    split_keys,
)
from kdkit.evaluation.scoring import evaluate_model
from kdkit.models.factory import build_model, load_state_dict_checked
from kdkit.models.info import model_size
from kdkit.registry import DATASETS
from kdkit.run.build import build_distiller, distill_min_batch, make_evaluator, model_from_recipe
from kdkit.run.stage_cache import StageCache
from kdkit.training.task import SupervisedTask
from kdkit.training.trainer import StageResult, Trainer
from kdkit.utils import distributed
from kdkit.utils.checkpoint import atomic_write_text, file_sha256, load_file, seed_everything
from kdkit.utils.runlog import MetricsLog, console, output
from kdkit.utils.trackers import (
    TRACKER_DIRS,
    RunIdentity,
    Tracker,
    TrackerError,
    chosen_loggers,
    open_trackers,
)


class RecipeRun:
    """One execution of a recipe in a run directory, optionally sharing trained stages via `stage_cache`."""

    def __init__(
        self,
        recipe: Recipe,
        out_dir: Path,
        stage_cache: StageCache | None = None,
        identity: RunIdentity | None = None,
    ) -> None:
        self.recipe = recipe
        self.out_dir = Path(out_dir)
        self.stage_cache = stage_cache
        # how experiment trackers file the run; default: named after its directory, alone
        self.identity = identity or run_identity(recipe, self.out_dir.name, self.out_dir.resolve())
        self.trained: dict[str, tuple[ModelSpec, Path]] = {}  # stage -> (model spec, model.pt)

    def run(self, resume: bool = False) -> dict[str, Any]:
        """Run every stage (skipping complete ones when resuming); return the summary."""
        r = self.recipe
        self.out_dir.mkdir(parents=True, exist_ok=True)
        main = distributed.is_main()  # under torchrun, rank 0 alone writes the run directory
        resolved = r.to_dict()
        if main:
            atomic_write_text(yaml.safe_dump(resolved, sort_keys=False), self.out_dir / "recipe.yaml")
        log = MetricsLog(self.out_dir, self._trackers() if main else [])
        log.params(resolved)
        summary = self._read_summary() if resume else {}
        failed = True
        try:
            for stage in r.pipeline:
                stage_dir = self.out_dir / stage.name
                done = stage_dir / "done.json"
                if resume and done.exists():
                    console.print(f"[{stage.name}] complete, skipped (resume)", markup=False)
                    self._remember(stage, stage_dir)
                    continue
                console.rule(f"stage {stage.name}: {stage.do}")
                result = self._run_stage(stage, stage_dir, log, resume, summary)
                summary[stage.name] = result
                if main:
                    atomic_write_text(json.dumps(summary, indent=2), self.out_dir / "summary.json")
                    atomic_write_text(json.dumps({"stage": stage.name}), done)
                    log.stage_result(stage.name, result, self._final_model(stage))
            failed = False
        finally:
            log.files(self.out_dir, self._artefacts() if main else [])
            log.close(failed)
        return summary

    def _trackers(self) -> list[Tracker]:
        """The experiment trackers of `train.loggers`, started (a resumed run continues theirs)."""
        train = self.recipe.train
        try:
            names = chosen_loggers(train.loggers)
            return open_trackers(names, self.out_dir, self.identity, train.tracking_uri)
        except TrackerError as exc:
            raise RecipeError([f"train.loggers: {exc}"]) from None

    def _final_model(self, stage: StageSpec) -> Path | None:
        """Where a fitted stage's `model.pt` is once the run is complete (None: it has none)."""
        if stage.do == "evaluate":
            return None
        return self.identity.run_dir / stage.name / "model.pt"

    def _artefacts(self) -> list[Path]:
        """What trackers keep of the run: its summary, its resolved recipe and its plots."""
        files = [self.out_dir / "summary.json", self.out_dir / "recipe.yaml"]
        plots = sorted(self.out_dir.rglob("*.png"))
        plots = [path for path in plots if path.relative_to(self.out_dir).parts[0] not in TRACKER_DIRS]
        return [path for path in files if path.exists()] + plots

    def _read_summary(self) -> dict[str, Any]:
        path = self.out_dir / "summary.json"
        return json.loads(path.read_text()) if path.exists() else {}

    def _remember(self, stage: StageSpec, stage_dir: Path) -> None:
        key, path = self.recipe.plan.of(stage).model, stage_dir / "model.pt"
        if key is None:  # an evaluate stage trains nothing
            return
        if stage.do == "train" and self.stage_cache is not None:
            # The cached copy outlives this directory (an ablation renames it): later stages and the
            # teacher reference in student checkpoints point there.
            cached = self.stage_cache.entry(self.recipe, stage) / "model.pt"
            path = cached if cached.exists() else path
        self.trained[stage.name] = (self.recipe.models[key], path)

    def _run_stage(
        self, stage: StageSpec, stage_dir: Path, log: MetricsLog, resume: bool, summary: dict[str, Any]
    ) -> dict[str, Any]:
        if stage.do == "evaluate":
            return self._evaluate_stage(stage, stage_dir, summary) if distributed.is_main() else {}
        if stage.do == "train" and self.stage_cache is not None:
            return self._cached_train_stage(stage, stage_dir, log, resume)
        return self._fit_stage(stage, stage_dir, log, resume)

    def _cached_train_stage(
        self, stage: StageSpec, stage_dir: Path, log: MetricsLog, resume: bool
    ) -> dict[str, Any]:
        """Reuse the cached result of an identical train stage, or train and publish it."""
        assert self.stage_cache is not None
        result, record = self.stage_cache.fetch_or_train(
            self.recipe,
            stage,
            stage_dir / "model.pt",
            lambda: self._fit_stage(stage, stage_dir, log, resume),
            self.out_dir.name,
        )
        if record["reused"]:
            what = f"reused from cache {record['key']} (trained by {record['trained_by']})"
        else:
            what = f"trained and cached as {record['key']}"
        console.print(f"[{stage.name}] {what}", markup=False)
        self._remember(stage, stage_dir)
        return {**result, "cache": record}

    def _fit_stage(self, stage: StageSpec, stage_dir: Path, log: MetricsLog, resume: bool) -> dict[str, Any]:
        r, plan = self.recipe, self.recipe.plan.of(stage)
        train, seed, data = plan.train, plan.seed, plan.data
        # a trailing batch too small for a batch-statistics adapter would give a zero feature loss
        min_batch = distill_min_batch(plan) if plan.distill is not None else 1
        train_loader, eval_loaders, set_epoch = build_loaders(
            data, seed, min_batch=min_batch, with_unlabeled=stage.do == "distill"
        )
        if train.track_test:  # reported only (StageResult.best_on_test); the test split of the run's data
            eval_loaders["test"] = eval_loader(build_dataset(r.data, "test"), r.data)
        meta: dict[str, Any] = {"stage": stage.name, "recipe": r.to_dict(), "data": _data_meta(data)}
        seed_everything(seed)  # models are built right after seeding: same seed, same initial weights
        if stage.do == "train":
            model = model_from_recipe(r, stage.model, f"pipeline.{stage.name}.model")
            task: nn.Module = SupervisedTask(model, train.label_smoothing)
            meta["spec"] = _spec_for_checkpoint(r.models[stage.model])
            extra = 0
        else:
            trained = {name: path for name, (_, path) in self.trained.items()}
            task = build_distiller(r, stage, trained, cache_data=train_loader.dataset)
            d = plan.distill_spec()
            meta["spec"] = _spec_for_checkpoint(r.models[d.student])
            references = [self._teacher_reference(t.distill.teacher) for t in plan.teachers]
            if d.teachers:
                meta["teachers"] = references
            else:  # the key of one-teacher checkpoints, as before `distill.teachers`
                meta["teacher"] = references[0]
            extra = task.extra_parameters()
        trainer = Trainer(
            task,
            train,
            train_loader,
            eval_loaders,
            make_evaluator(r),
            stage_dir,
            log,
            stage.name,
            seed,
            model_meta=meta,
            set_epoch=set_epoch,
        )
        # Same seed, same augmentation and dropout draws in every ablation variant, however much
        # randomness building the task consumed (a projection adapter's init, for instance).
        seed_everything(seed)
        result: StageResult = trainer.fit(resume=resume)
        if isinstance(task, Distiller | SeveralTeachers):
            task.close()
        self._remember(stage, stage_dir)
        return {
            "do": stage.do,
            **dataclasses.asdict(result),
            **model_size(task.model),
            "adapter_params": extra,
        }

    def _teacher_reference(self, teacher: str) -> dict[str, Any]:
        """The teacher is never saved with the student: reference it by path and hash."""
        if teacher in self.trained:
            path = self.trained[teacher][1]
        else:
            path = self.recipe.models[teacher].weights
            if path is None:
                return {"model": teacher, "path": None, "sha256": None}
        # Absolute: the reference must still point at the teacher when read from another directory.
        return {"model": teacher, "path": str(Path(path).resolve()), "sha256": file_sha256(path)}

    def _evaluate_stage(self, stage: StageSpec, stage_dir: Path, summary: dict[str, Any]) -> dict[str, Any]:
        """Evaluate every run on the stage's split; with a `baseline`, compare each run with it."""
        r = self.recipe
        evaluator = make_evaluator(r)
        mode = getattr(evaluator, "mode", "max")
        results: dict[str, Any] = {}
        for run in stage.runs:
            spec, path = self.trained[run]
            model = build_model(dataclasses.replace(spec, weights=None, pretrained=False))
            load_state_dict_checked(model, load_file(path)["model"], str(path))
            label = f"[{stage.name}] {run}"
            results[run] = evaluate_model(model, r, stage.split, stage_dir / run, evaluator, label)
        keys = getattr(evaluator, "summary_keys", None)
        output.print(results_table(results, stage.split, keys, mode))
        out: dict[str, Any] = {"do": "evaluate", "split": stage.split, "results": results}
        if stage.baseline is not None:
            replicates = {run: load_replicates(stage_dir / run, stage.split) for run in stage.runs}
            keys = split_keys(keys, stage.split) or [
                k for k in results[stage.baseline] if k.startswith(f"{stage.split}/")
            ]
            out["baseline"] = stage.baseline
            out["differences"] = differences(results, replicates, stage.baseline, keys)
            output.print(differences_table(out["differences"], stage.baseline, mode))
        paper = paper_section(results, summary, getattr(evaluator, "paper_keys", []))
        if paper:
            out["paper"] = paper
            output.print(paper_table(paper))
        return out


def run_identity(
    recipe: Recipe, name: str, run_dir: Path, group: str | None = None, tags: dict[str, str] | None = None
) -> RunIdentity:
    """How trackers file a run of `recipe` named `name` whose files end up in `run_dir`: in the
    experiment `train.experiment` (default: the recipe's name), with an ablation's `group` and tags."""
    return RunIdentity(name, recipe.train.experiment or recipe.name, run_dir, group, tags or {})


def _spec_for_checkpoint(spec: ModelSpec) -> dict[str, Any]:
    """The spec to rebuild the network from `model.pt` (its weights are in the file itself)."""
    return dataclasses.asdict(dataclasses.replace(spec, weights=None, pretrained=False))


def _data_meta(d: DataSpec) -> dict[str, Any]:
    """What a deployed model needs to know of its data: input geometry and normalisation, and the
    input preparer's options the data set was made with (e.g. the face detector and crop scale),
    so that `kdkit predict` prepares files as the training frames were prepared."""
    options = getattr(DATASETS.get(d.dataset), "input_preparer_options", None)
    return {
        "dataset": d.dataset,
        "image_size": d.image_size,
        "mean": d.mean,
        "std": d.std,
        "input_preparer_options": options(d) if options else {},
    }
