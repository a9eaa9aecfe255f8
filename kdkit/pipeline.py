"""Running a recipe: check the whole plan first, then run its stages in order.

Run directory layout::

    RUN/recipe.yaml          the resolved recipe (after --set overrides)
    RUN/metrics.jsonl        one JSON object per logged step / epoch, every stage
    RUN/summary.json         final metrics of every stage (best and last)
    RUN/<stage>/last.pt      resume state of a train/distill stage
    RUN/<stage>/model.pt     the trained network at its best validation epoch
    RUN/<stage>/done.json    written last: the stage is complete and is skipped on --resume

With a shared stage cache (`RecipeRun(..., stage_cache=DIR)`, used by `kdkit ablate`), a `train`
stage is keyed by a hash of exactly what it depends on (`train_stage_key`): a run whose key is
already in ``DIR/<key>/`` reuses that model instead of training it again. Distill stages are never
cached: they are what an ablation varies.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
import yaml
from rich.markup import escape
from rich.table import Table
from torch import nn

from kdkit import __version__, distributed
from kdkit.adapters import adapter_min_batch
from kdkit.cache import open_teacher_cache, teacher_cache_dir
from kdkit.checkpoint import (
    OutputDirError,
    atomic_write_text,
    check_output_dir,
    file_sha256,
    load_file,
    seed_everything,
)
from kdkit.comparison import (
    differences,
    differences_table,
    load_replicates,
    paper_section,
    paper_table,
    replicates_path,
    results_table,
    split_keys,
)
from kdkit.data import build_dataset, build_loaders, eval_loader, example_batch, generate_data
from kdkit.distiller import Distiller, SupervisedTask, stage_pairs
from kdkit.info import model_size
from kdkit.lock import locked
from kdkit.models import ModelError, build_model, load_state_dict_checked
from kdkit.optim import check_optimization
from kdkit.plugins import load_plugins
from kdkit.recipe import DataSpec, ModelSpec, Recipe, RecipeError, StageSpec
from kdkit.registry import DATASETS, EVALUATORS, FEATURE_CRITERIA, RegistryError
from kdkit.runlog import MetricsLog, console, output
from kdkit.stats import LEVEL
from kdkit.trainer import StageResult, Trainer, autocast, predict, resolve_device


class RecipeRun:
    """One execution of a recipe in a run directory, optionally sharing trained stages via `stage_cache`."""

    def __init__(self, recipe: Recipe, out_dir: Path, stage_cache: Path | None = None) -> None:
        self.recipe = recipe
        self.out_dir = Path(out_dir)
        self.stage_cache = Path(stage_cache) if stage_cache is not None else None
        self.trained: dict[str, tuple[ModelSpec, Path]] = {}  # stage -> (model spec, model.pt)
        self.param_bytes: dict[str, int] = {}  # model key -> size of its weights (known after `check`)

    # ------------------------------------------------------------------ checks before any work
    def check(self, generate: bool = False) -> list[Table]:
        """Build every model and dry-run every distill stage; raise RecipeError on any problem.

        With `generate`, first generate the data sets the recipe asks to be generated
        (`kdkit.data.generate_data`; commands that create data for a run). Returns the tap/adapter
        tables of the distill stages (for `kdkit validate`)."""
        r = self.recipe
        self._check_names()
        evaluator = self.make_evaluator()
        if generate:
            for spec in [r.data, *(r.stage_data(s) for s in r.pipeline if s.data and s.do != "evaluate")]:
                generate_data(spec)
        # Every split the run reads, now: an empty or one-class split must not wait for epoch 1's end
        # (training splits are built by `example_batch`).
        tracked = (
            ["test"] if any(r.stage_train(s).track_test for s in r.pipeline if s.do != "evaluate") else []
        )
        for split in dict.fromkeys(["val", *tracked, *(s.split for s in r.pipeline if s.do == "evaluate")]):
            build_dataset(r.data, split)
        for stage in r.pipeline:
            if stage.data and stage.do != "evaluate":
                build_dataset(r.stage_data(stage), "val")
                example_batch(r.stage_data(stage))
        self._check_models(example_batch(r.data), evaluator)
        self._check_training()
        tables = []
        for stage in r.pipeline:
            if stage.do == "distill":
                distiller = self.build_distiller(stage, check_only=True)
                tables.append(self.tap_table(stage, distiller))
                distiller.close()
        return tables

    def _check_names(self) -> None:
        """The plugins the recipe needs are loaded; its data set and evaluator are registered."""
        r = self.recipe
        problems = []
        installed = load_plugins()
        for name in r.plugins:
            info = installed.get(name)
            if info is None:
                problems.append(f"plugins: {name!r} is not installed (installed: {sorted(installed)})")
            elif info.error:
                problems.append(f"plugins: {name!r} failed to load ({info.error})")
        for key, registry in (("data.dataset", DATASETS), ("evaluator", EVALUATORS)):
            name = r.data.dataset if key == "data.dataset" else r.evaluator
            try:
                registry.get(name)
            except RegistryError as exc:
                problems.append(f"{key}: {exc}")
        if problems:
            raise RecipeError(problems)

    def _check_models(self, example: torch.Tensor, evaluator: Any) -> None:
        """Every model builds and runs on the data's images, with the outputs the evaluator needs."""
        classes = getattr(evaluator, "num_classes", None)
        for key in self.recipe.models:
            model = self.build(key, f"models.{key}")
            outputs = check_input(model, example, f"models.{key}")
            if classes is not None and outputs != classes:
                raise RecipeError(
                    [
                        f"models.{key}: outputs {outputs} classes, but evaluator "
                        f"{self.recipe.evaluator!r} scores {classes}; set models.{key}.options."
                        f"num_classes: {classes} (or choose the evaluator of your task)"
                    ]
                )
            self.param_bytes[key] = sum(p.numel() * p.element_size() for p in model.parameters())

    def _check_training(self) -> None:
        """What each train/distill stage builds when it starts: optimizer, scheduler, autocast, the
        adapter's smallest batch, a writable teacher cache."""
        r = self.recipe
        problems: list[str] = []
        for stage in r.pipeline:
            if stage.do == "evaluate":
                continue
            where, train = f"pipeline.{stage.name}", r.stage_train(stage)
            # a setting inherited from the top-level `train` is reported once, under its own key
            own = {"optimizer", "scheduler"} & set(stage.train)
            problems += check_optimization(train, f"{where}.train" if own else "train")
            try:
                autocast(resolve_device(train.device), train.amp)
            except ValueError as exc:  # names train.device / train.amp
                problems.append(
                    f"pipeline.{stage.name}.{exc}" if {"device", "amp"} & set(stage.train) else str(exc)
                )
            if stage.do != "distill":
                continue
            d, batch = r.stage_distill(stage), r.stage_data(stage).batch_size
            try:
                FEATURE_CRITERIA.get(d.criterion)
            except RegistryError as exc:
                key = f"{where}.distill.criterion" if "criterion" in stage.distill else "distill.criterion"
                problems.append(f"{key}: {exc}")
            try:
                need = adapter_min_batch(d.adapter)
            except RegistryError as exc:
                problems.append(f"{where}.distill.adapter: {exc}")
                continue
            if batch // distributed.world_size() < need:
                problems.append(
                    f"{where}.distill.adapter: {d.adapter!r} is computed from batch statistics and needs "
                    f"at least {need} samples per batch (per process); data.batch_size is {batch}"
                )
            if d.cache:
                try:
                    key = (
                        f"{where}.distill.cache_dir" if "cache_dir" in stage.distill else "distill.cache_dir"
                    )
                    check_output_dir(teacher_cache_dir(d), option=key)
                except OutputDirError as exc:
                    problems.append(f"{exc} (or set distill.cache: false)")
        if problems:
            raise RecipeError(list(dict.fromkeys(problems)))

    def bytes_to_write(self) -> int:
        """A lower bound of the disk space the run's checkpoints take (after `check`): per trained
        model, `model.pt` plus `last.pt` (weights and two optimizer moments), one of them written
        beside its old copy before the rename."""
        r = self.recipe
        fitted = [
            s.model if s.do == "train" else r.stage_distill(s).student
            for s in r.pipeline
            if s.do != "evaluate"
        ]
        return sum(self.param_bytes.get(key or "", 0) * (1 + 3 + 3) for key in fitted)

    def make_evaluator(self) -> Any:
        """The recipe's evaluator instance."""
        try:
            return EVALUATORS.get(self.recipe.evaluator)(**self.recipe.evaluator_options)
        except (TypeError, ValueError) as exc:
            text = str(exc)
            raise RecipeError(
                [text if text.startswith("evaluator_options") else f"evaluator_options: {text}"]
            ) from None

    def build(self, key: str, where: str) -> nn.Module:
        """Build the model `models[key]`, re-raising build problems as recipe errors."""
        try:
            return build_model(self.recipe.models[key], where=f"models.{key}")
        except ModelError as exc:  # already names the model's key
            raise RecipeError([str(exc)]) from None
        except ValueError as exc:
            raise RecipeError([f"{where}: {exc}"]) from None

    def build_distiller(
        self, stage: StageSpec, example: torch.Tensor | None = None, check_only: bool = False
    ) -> Distiller:
        """Student, teacher (trained in an earlier stage, or from its spec), taps and adapters sized
        by a dry run on `example` (default: two of the stage's training images).

        The student is built first, so that with the same seed it starts from the same weights as a
        `train` stage of the same model (the baseline trained without a teacher)."""
        d = self.recipe.stage_distill(stage)
        train = self.recipe.stage_train(stage)
        where = f"pipeline.{stage.name}.distill"
        student = self.build(d.student, f"{where}.student")
        earlier = self.recipe.pipeline[: self.recipe.pipeline.index(stage)]  # never a later stage
        teacher_stage = next((s for s in earlier if s.name == d.teacher and s.do != "evaluate"), None)
        if teacher_stage is not None:
            key = (
                teacher_stage.model
                if teacher_stage.do == "train"
                else self.recipe.stage_distill(teacher_stage).student
            )
            teacher = self.build(key, f"{where}.teacher")
            if not check_only:
                load_state_dict_checked(
                    teacher, load_file(self.trained[d.teacher][1])["model"], f"stage {d.teacher!r} model.pt"
                )
        else:
            teacher = self.build(d.teacher, f"{where}.teacher")
        try:
            pairs = stage_pairs(teacher, student, d.stages, d.point, d.select) if d.adapter != "none" else []
            return Distiller(
                teacher,
                student,
                pairs,
                adapter=d.adapter,
                adapter_options=d.adapter_options,
                criterion=d.criterion,
                alpha=d.alpha,
                tau=d.tau,
                beta=d.beta,
                label_smoothing=train.label_smoothing,
                example_input=example_batch(self.recipe.stage_data(stage)) if example is None else example,
                teacher_dtype=d.teacher_dtype,
            )
        except (ValueError, KeyError) as exc:
            raise RecipeError([f"{where}: {exc}"]) from None

    def tap_table(self, stage: StageSpec, distiller: Distiller) -> Table:
        """A table of stage pairs: taps → shapes → adapter → criterion."""
        d = self.recipe.stage_distill(stage)
        table = Table(
            title=f"stage {stage.name!r}: feature pairs (adapter params: {distiller.extra_parameters()})"
        )
        for col in ("#", "student tap", "shape", "teacher tap", "shape", "adapter", "criterion"):
            table.add_column(col)
        for i, (pair, (s_shape, t_shape)) in enumerate(zip(distiller.pairs, distiller.shapes, strict=True)):
            table.add_row(
                str(i),
                escape(f"{pair.student.path} [{pair.student.select}]"),
                str(s_shape),
                escape(f"{pair.teacher.path} [{pair.teacher.select}]"),
                str(t_shape),
                d.adapter,
                d.criterion,
            )
        return table

    # ------------------------------------------------------------------ execution
    def run(self, resume: bool = False) -> dict[str, Any]:
        """Run every stage (skipping complete ones when resuming); return the summary."""
        r = self.recipe
        self.out_dir.mkdir(parents=True, exist_ok=True)
        main = distributed.is_main()  # under torchrun, rank 0 alone writes the run directory
        if main:
            atomic_write_text(yaml.safe_dump(r.to_dict(), sort_keys=False), self.out_dir / "recipe.yaml")
        log = MetricsLog(self.out_dir)
        summary = self._read_summary() if resume else {}
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
        finally:
            log.close()
        return summary

    def _read_summary(self) -> dict[str, Any]:
        path = self.out_dir / "summary.json"
        return json.loads(path.read_text()) if path.exists() else {}

    def _remember(self, stage: StageSpec, stage_dir: Path) -> None:
        if stage.do == "train":
            # The cached copy outlives this directory (an ablation renames it): later stages and the
            # teacher reference in student checkpoints point there.
            cached = self._cache_entry(stage) / "model.pt" if self.stage_cache is not None else None
            path = cached if cached is not None and cached.exists() else stage_dir / "model.pt"
            self.trained[stage.name] = (self.recipe.models[stage.model], path)
        elif stage.do == "distill":
            key = self.recipe.stage_distill(stage).student
            self.trained[stage.name] = (self.recipe.models[key], stage_dir / "model.pt")

    def _run_stage(
        self, stage: StageSpec, stage_dir: Path, log: MetricsLog, resume: bool, summary: dict[str, Any]
    ) -> dict[str, Any]:
        if stage.do == "evaluate":
            return self._evaluate_stage(stage, stage_dir, summary) if distributed.is_main() else {}
        if stage.do == "train" and self.stage_cache is not None:
            return self._cached_train_stage(stage, stage_dir, log, resume)
        return self._fit_stage(stage, stage_dir, log, resume)

    def _cache_entry(self, stage: StageSpec) -> Path:
        assert self.stage_cache is not None
        return self.stage_cache / train_stage_key(self.recipe, stage)

    def _cached_train_stage(
        self, stage: StageSpec, stage_dir: Path, log: MetricsLog, resume: bool
    ) -> dict[str, Any]:
        """Reuse the cached result of an identical train stage, or train and publish it.

        The lock makes concurrent runs that need the same stage wait for one training."""
        entry = self._cache_entry(stage)
        with locked(entry.with_name(f"{entry.name}.lock")):
            if (entry / "done.json").exists():
                cached = json.loads((entry / "done.json").read_text())
                _link_or_copy(entry / "model.pt", stage_dir / "model.pt")
                console.print(
                    f"[{stage.name}] reused from cache {entry.name} (trained by {cached['trained_by']})",
                    markup=False,
                )
                result, reused, trained_by = cached["result"], True, cached["trained_by"]
            else:
                result = self._fit_stage(stage, stage_dir, log, resume)
                reused, trained_by = False, self.out_dir.name
                _publish(stage_dir / "model.pt", entry, {"result": result, "trained_by": trained_by})
                console.print(f"[{stage.name}] trained and cached as {entry.name}", markup=False)
        self._remember(stage, stage_dir)
        return {**result, "cache": {"key": entry.name, "reused": reused, "trained_by": trained_by}}

    def _fit_stage(self, stage: StageSpec, stage_dir: Path, log: MetricsLog, resume: bool) -> dict[str, Any]:
        r = self.recipe
        train = r.stage_train(stage)
        seed = r.stage_seed(stage)
        data = r.stage_data(stage)
        # a trailing batch too small for a batch-statistics adapter would give a zero feature loss
        min_batch = adapter_min_batch(r.stage_distill(stage).adapter) if stage.do == "distill" else 1
        train_loader, eval_loaders, set_epoch = build_loaders(data, seed, min_batch=min_batch)
        if train.track_test:  # reported only (StageResult.best_on_test); the test split of the run's data
            eval_loaders["test"] = eval_loader(build_dataset(r.data, "test"), r.data)
        meta: dict[str, Any] = {"stage": stage.name, "recipe": r.to_dict(), "data": _data_meta(data)}
        seed_everything(seed)  # models are built right after seeding: same seed, same initial weights
        if stage.do == "train":
            model = self.build(stage.model, f"pipeline.{stage.name}.model")
            task: nn.Module = SupervisedTask(model, train.label_smoothing)
            meta["spec"] = _spec_for_checkpoint(r.models[stage.model])
            extra = 0
        else:
            task = self.build_distiller(stage)
            d = r.stage_distill(stage)
            task.cache = open_teacher_cache(task, d, train_loader.dataset, train.amp)
            meta["spec"] = _spec_for_checkpoint(r.models[d.student])
            meta["teacher"] = self._teacher_reference(d.teacher)
            extra = task.extra_parameters()
        trainer = Trainer(
            task,
            train,
            train_loader,
            eval_loaders,
            self.make_evaluator(),
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
        if isinstance(task, Distiller):
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
        evaluator = self.make_evaluator()
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


def evaluate_model(
    model: nn.Module, recipe: Recipe, split: str, out_dir: Path, evaluator: Any, label: str
) -> dict[str, Any]:
    """Predict on the dev split ('val') and `split`, let the evaluator turn that into metrics and
    write its files to `out_dir`, record the calibration (thresholds, for `kdkit export`) and, when
    the evaluator can resample, the bootstrap replicates and intervals; return the metrics with the
    model's size. The evaluate stage and `kdkit eval` both use it."""
    from kdkit.deploy.calibration import write_calibration

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
        results["intervals"] = {key: list(replicates.interval(key)) for key in replicates.values}
        results["resampling"] = {
            "unit": replicates.unit,
            "n_units": replicates.n_units,
            "draws": len(next(iter(replicates.values.values()))),
            "confidence": LEVEL,
        }
    write_calibration(out_dir, results, split)
    return results


def check_input(model: nn.Module, example: torch.Tensor, where: str) -> int:
    """Fail with a recipe error when `model` cannot take the data's images (size, patch, channels);
    return the size of its output's last dimension (the number of classes of a classifier)."""
    patch = getattr(getattr(model, "patch_embed", None), "patch_size", None)
    size = tuple(example.shape[-2:])
    if patch is not None and any(s % p for s, p in zip(size, patch, strict=True)):
        raise RecipeError(
            [
                f"{where}: data.image_size {size[0]} is not divisible by the patch size "
                f"{patch[0]}; choose an image size that is a multiple of it"
            ]
        )
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            output = model(example)
    except Exception as exc:  # any failure here is a model/data mismatch the user must fix
        raise RecipeError(
            [
                f"{where}: cannot run on the data's {tuple(example.shape[1:])} images "
                f"({type(exc).__name__}: {exc}); check the model options (img_size, in_chans) "
                "against data.image_size and the data's channels"
            ]
        ) from None
    finally:
        model.train(was_training)
    return int(output.shape[-1])


def train_stage_key(recipe: Recipe, stage: StageSpec) -> str:
    """Hash of exactly what a `train` stage's model depends on.

    Data, the model's spec (and its initial weights file), the merged training settings (with the
    stage's seed), the evaluator (it picks the saved epoch) and the kdkit version; not the distill
    section, other models or the stage's name.
    """
    spec = recipe.models[stage.model]
    train = recipe.stage_train(stage)
    parts = {
        "do": stage.do,
        "data": dataclasses.asdict(recipe.stage_data(stage)),
        # a tracked test split is the run's own (reported only; see Trainer.best_on_test)
        "test_data": dataclasses.asdict(recipe.data) if train.track_test else None,
        "model": dataclasses.asdict(spec),
        "weights_sha256": file_sha256(spec.weights) if spec.weights else None,
        "train": dataclasses.asdict(train),
        "evaluator": [recipe.evaluator, recipe.evaluator_options],
        "kdkit": __version__,
    }
    text = json.dumps(parts, sort_keys=True, default=str)
    return f"{stage.model}-{hashlib.sha256(text.encode()).hexdigest()[:16]}"


def _link_or_copy(src: Path, dst: Path) -> None:
    """Hard-link `src` to `dst` (a copy across file systems) through a temporary name: atomic."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copy2(src, tmp)
    os.replace(tmp, dst)


def _publish(model: Path, entry: Path, record: dict[str, Any]) -> None:
    """Put `model` and `done.json` into the cache folder `entry`, all at once (a folder rename)."""
    tmp = entry.with_name(f".{entry.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    _link_or_copy(model, tmp / "model.pt")
    atomic_write_text(json.dumps(record, indent=2), tmp / "done.json")
    os.replace(tmp, entry)


def _spec_for_checkpoint(spec: ModelSpec) -> dict[str, Any]:
    """The spec to rebuild the network from `model.pt` (its weights are in the file itself)."""
    return dataclasses.asdict(dataclasses.replace(spec, weights=None, pretrained=False))


def _data_meta(d: DataSpec) -> dict[str, Any]:
    return {"dataset": d.dataset, "image_size": d.image_size, "mean": d.mean, "std": d.std}
