"""Everything `kdkit run` checks before any work, and `kdkit validate` reports.

`check_recipe(recipe)` loads the plugins the recipe names, builds every model and runs it on the
data's images, builds each stage's optimizer and scheduler, and dry-runs every distill stage on a
real two-image batch (tap shapes, adapter sizes, class counts); any problem is a `RecipeError`
naming its key. Nothing is written (except data a recipe asks to generate, with `generate`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from rich.markup import escape
from rich.table import Table

from kdkit import distributed
from kdkit.adapters import adapter_min_batch
from kdkit.build import (
    build_distiller,
    build_recipe_model,
    check_input,
    make_evaluator,
    make_teacher_input,
    teacher_model_key,
)
from kdkit.cache import teacher_cache_dir
from kdkit.checkpoint import OutputDirError, check_output_dir
from kdkit.data import build_dataset, example_batch, generate_data, sample_groups
from kdkit.distiller import Distiller
from kdkit.losses import OptionError, criterion_min_batch, resolve_feature_criterion, resolve_logit_loss
from kdkit.optim import check_optimization
from kdkit.plugins import load_plugins
from kdkit.recipe import DistillSpec, Recipe, RecipeError, StageSpec, parse_pair
from kdkit.registry import DATASETS, EVALUATORS, RegistryError
from kdkit.trainer import autocast, resolve_device


@dataclass
class RecipeCheck:
    """What checking found: the distill stages' tap tables and the size of each model's weights."""

    tables: list[Table] = field(default_factory=list)
    param_bytes: dict[str, int] = field(default_factory=dict)  # model key -> bytes of its weights

    def bytes_to_write(self, recipe: Recipe) -> int:
        """A lower bound of the disk space the run's checkpoints take: per trained model,
        `model.pt` plus `last.pt` (weights and two optimizer moments), one of them written beside
        its old copy before the rename."""
        fitted = [
            s.model if s.do == "train" else recipe.stage_distill(s).student
            for s in recipe.pipeline
            if s.do != "evaluate"
        ]
        return sum(self.param_bytes.get(key or "", 0) * (1 + 3 + 3) for key in fitted)


def check_recipe(recipe: Recipe, generate: bool = False) -> RecipeCheck:
    """Build every model and dry-run every distill stage; raise RecipeError on any problem.

    With `generate`, first generate the data sets the recipe asks to be generated
    (`kdkit.data.generate_data`; commands that create data for a run)."""
    r = recipe
    _check_names(r)
    evaluator = make_evaluator(r)
    if generate:
        for spec in [r.data, *(r.stage_data(s) for s in r.pipeline if s.data and s.do != "evaluate")]:
            generate_data(spec)
    # Every split the run reads, now: an empty or one-class split must not wait for epoch 1's end
    # (training splits are built by `example_batch`).
    tracked = ["test"] if any(r.stage_train(s).track_test for s in r.pipeline if s.do != "evaluate") else []
    for split in dict.fromkeys(["val", *tracked, *(s.split for s in r.pipeline if s.do == "evaluate")]):
        build_dataset(r.data, split)
    for stage in r.pipeline:
        if stage.data and stage.do != "evaluate":
            build_dataset(r.stage_data(stage), "val")
            example_batch(r.stage_data(stage))
    _check_balanced(r)
    result = RecipeCheck(param_bytes=_check_models(r, example_batch(r.data), evaluator))
    _check_training(r)
    for stage in r.pipeline:
        if stage.do == "distill":
            distiller = build_distiller(r, stage)
            result.tables.append(tap_table(stage, distiller))
            distiller.close()
    return result


def _check_names(recipe: Recipe) -> None:
    """The plugins the recipe needs are loaded; its data set and evaluator are registered."""
    r = recipe
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


def _check_balanced(recipe: Recipe) -> None:
    """With `data.balanced`, the batch splits evenly between the training set's groups."""
    specs = {"data": recipe.data} | {
        f"pipeline.{s.name}.data": recipe.stage_data(s)
        for s in recipe.pipeline
        if s.data and s.do != "evaluate"
    }
    problems = []
    for where, spec in specs.items():
        if not spec.balanced:
            continue
        groups = list(dict.fromkeys(sample_groups(build_dataset(spec, "train"))))
        if spec.batch_size % len(groups):
            share = max(1, spec.batch_size // len(groups))
            problems.append(
                f"{where}.batch_size: {spec.batch_size} is not a multiple of the {len(groups)} groups "
                f"{where}.balanced draws equally from ({', '.join(map(str, groups))}); use e.g. "
                f"{share * len(groups)} or {(share + 1) * len(groups)}"
            )
    if problems:
        raise RecipeError(problems)


def _check_models(recipe: Recipe, example: torch.Tensor, evaluator: Any) -> dict[str, int]:
    """Every model builds and runs on the data's images, with the outputs the evaluator needs;
    returns the size of each model's weights in bytes."""
    classes = getattr(evaluator, "num_classes", None)
    # a teacher with its own input (distill.teacher_input) is checked on the batch converted for it
    converts = {
        teacher_model_key(recipe, s)[0]: s
        for s in recipe.pipeline
        if s.do == "distill" and recipe.stage_distill(s).teacher_input
    }
    sizes = {}
    for key in recipe.models:
        model = build_recipe_model(recipe, key, f"models.{key}")
        given = example
        if key in converts:
            stage = converts[key]
            try:
                conversion = make_teacher_input(recipe.stage_distill(stage), recipe.stage_data(stage), model)
            except ValueError as exc:
                raise RecipeError([f"pipeline.{stage.name}.distill.{exc}"]) from None
            given = example if conversion is None else conversion(example)
        outputs = check_input(model, given, f"models.{key}")
        if classes is not None and outputs != classes:
            raise RecipeError(
                [
                    f"models.{key}: outputs {outputs} classes, but evaluator "
                    f"{recipe.evaluator!r} scores {classes}; set models.{key}.options."
                    f"num_classes: {classes} (or choose the evaluator of your task)"
                ]
            )
        sizes[key] = sum(p.numel() * p.element_size() for p in model.parameters())
    return sizes


def _check_training(recipe: Recipe) -> None:
    """What each train/distill stage builds when it starts: optimizer, scheduler, autocast, the
    logit loss and its options, the adapter's smallest batch, a writable teacher cache."""
    r = recipe
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
        problems += _option_problems(d, stage, where)
        for adapter_key, adapter, criterion_key, criterion in _feature_checks(d, stage, where):
            try:
                need = criterion_min_batch(criterion)
                if batch // distributed.world_size() < need:
                    problems.append(
                        f"{criterion_key}: {criterion!r} compares the samples of a batch and needs at "
                        f"least {need} per batch (per process); data.batch_size is {batch}"
                    )
            except RegistryError as exc:
                problems.append(f"{criterion_key}: {exc}")
            try:
                need = adapter_min_batch(adapter)
            except RegistryError as exc:
                problems.append(f"{adapter_key}: {exc}")
                continue
            if batch // distributed.world_size() < need:
                problems.append(
                    f"{adapter_key}: {adapter!r} is computed from batch statistics and needs at least "
                    f"{need} samples per batch (per process); data.batch_size is {batch}"
                )
        if d.cache:
            try:
                key = f"{where}.distill.cache_dir" if "cache_dir" in stage.distill else "distill.cache_dir"
                check_output_dir(teacher_cache_dir(d), option=key)
            except OutputDirError as exc:
                problems.append(f"{exc} (or set distill.cache: false)")
    if problems:
        raise RecipeError(list(dict.fromkeys(problems)))


def _option_problems(d: DistillSpec, stage: StageSpec, where: str) -> list[str]:
    """A distill stage's logit loss and feature criterion are registered and take their options
    (names and values)."""
    problems = []
    for kind, resolve in (("logit_loss", resolve_logit_loss), ("criterion", resolve_feature_criterion)):
        options = "logit_options" if kind == "logit_loss" else "criterion_options"
        # a setting inherited from the top-level `distill` is reported once, under its own key
        name_key, options_key = (
            f"{where}.distill.{key}" if key in stage.distill else f"distill.{key}" for key in (kind, options)
        )
        try:
            resolve(getattr(d, kind), getattr(d, options))
        except RegistryError as exc:
            problems.append(f"{name_key}: {exc}")
        except OptionError as exc:
            problems.append(f"{options_key}.{exc}")
        except ValueError as exc:
            problems.append(f"{options_key}: {exc}")
    return problems


def _feature_checks(d: DistillSpec, stage: StageSpec, where: str) -> list[tuple[str, str, str, str]]:
    """(adapter key, adapter, criterion key, criterion) of the distill section and of each layer
    pair that names its own adapter or criterion; the keys say where to report a problem."""
    # a criterion inherited from the top-level `distill` is reported once, under its own key
    criterion_key = f"{where}.distill.criterion" if "criterion" in stage.distill else "distill.criterion"
    checks = [(f"{where}.distill.adapter", d.adapter, criterion_key, d.criterion)]
    if d.adapter == "none" or isinstance(d.pairs, str):  # no pairs, or uniform:N (the section's settings)
        return checks
    for i, entry in enumerate(d.pairs):
        spec = parse_pair(entry, "", [])  # not None: the recipe's pairs were checked when it was read
        if spec is not None and (spec.adapter or spec.criterion):
            key = f"{where}.distill.pairs[{i}]"
            checks.append(
                (
                    f"{key}.adapter" if spec.adapter else checks[0][0],
                    spec.adapter or d.adapter,
                    f"{key}.criterion" if spec.criterion else criterion_key,
                    spec.criterion or d.criterion,
                )
            )
    return checks


def tap_table(stage: StageSpec, distiller: Distiller) -> Table:
    """A table of layer pairs and groups: taps → shapes → each pair's adapter, criterion and weight
    (a group's method and weight)."""
    table = Table(title=f"stage {stage.name!r}: layer pairs (adapter params: {distiller.extra_parameters()})")
    for col in ("#", "student tap", "shape", "teacher tap", "shape", "adapter", "criterion", "weight"):
        table.add_column(col)
    for i, (pair, (s_shape, t_shape)) in enumerate(zip(distiller.pairs, distiller.shapes, strict=True)):
        table.add_row(
            str(i),
            escape(f"{pair.student.path} [{pair.student.select}]"),
            str(s_shape),
            escape(f"{pair.teacher.path} [{pair.teacher.select}]"),
            str(t_shape),
            escape(str(pair.adapter)),
            escape(str(pair.criterion)),
            f"{pair.weight:g}",
        )
    for j, (group, (s_shapes, t_shapes)) in enumerate(
        zip(distiller.groups, distiller.group_shapes, strict=True)
    ):
        for k, (s_tap, t_tap) in enumerate(zip(group.student, group.teacher, strict=True)):
            table.add_row(
                f"group {j}.{k}",
                escape(f"{s_tap.path} [{s_tap.select}]"),
                str(s_shapes[k]),
                escape(f"{t_tap.path} [{t_tap.select}]"),
                str(t_shapes[k]),
                escape(group.method) if k == 0 else "",
                "",
                f"{group.weight:g}" if k == 0 else "",
            )
    if not distiller.pairs and not distiller.groups:
        table.caption = "no layer pairs: logit distillation only"
    return table
