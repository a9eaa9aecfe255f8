"""Everything `kdkit run` checks before any work, and `kdkit validate` reports.

`check_recipe(recipe)` loads the plugins the recipe names, builds every split each stage reads
(a distill stage's unlabelled pool included), builds every model and runs it on the data's images
(a teacher on its converted input), builds each stage's optimizer and scheduler, and dry-runs every
distill stage on a real batch of 2-3 of its training images: tap shapes, adapter sizes, class
counts, each pair's criterion on its adapter's outputs, and one training step's loss terms (no
gradient). Any problem a stage would meet at its first step is a `RecipeError` naming the stage and
key, before the first stage trains. Nothing is written (except data a recipe asks to generate, with
`generate`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from rich.markup import escape
from rich.table import Table
from torch.utils.data import default_collate

from kdkit.config.plan import StagePlan, TeacherPlan
from kdkit.config.schema import DistillSpec, Recipe, RecipeError
from kdkit.data.augment import device_images
from kdkit.data.datasets import (
    DataError,
    PartlyLabeled,
    build_dataset,
    example_batch,
    generate_data,
    training_set,
)
from kdkit.data.samplers import sample_strata
from kdkit.distill.adapters import adapter_min_batch, build_adapter, unknown_adapter_options
from kdkit.distill.distiller import Distiller
from kdkit.distill.losses import (
    OptionError,
    criterion_min_batch,
    resolve_feature_criterion,
    resolve_logit_loss,
)
from kdkit.distill.several_teachers import SeveralTeachers
from kdkit.distill.teacher_cache import teacher_cache_dir
from kdkit.distill.teacher_ensemble import TeacherCombiner
from kdkit.plugins import load_plugins
from kdkit.registry import DATASETS, EVALUATORS, RegistryError
from kdkit.run.build import (
    build_distiller,
    check_input,
    dry_run_size,
    make_evaluator,
    make_teacher_input,
    model_from_recipe,
)
from kdkit.training.optim import check_optimization
from kdkit.utils import distributed
from kdkit.utils.checkpoint import OutputDirError, check_output_dir
from kdkit.utils.device import autocast, resolve_device
from kdkit.utils.trackers import missing_package

Shape = tuple[int, ...]  # a tensor's shape, as the tap table prints it


@dataclass
class RecipeCheck:
    """What checking found: the distill stages' tap tables and the size of each model's weights."""

    tables: list[Table] = field(default_factory=list)
    param_bytes: dict[str, int] = field(default_factory=dict)  # model key -> bytes of its weights

    def bytes_to_write(self, recipe: Recipe) -> int:
        """A lower bound of the disk space the run's checkpoints take: per trained model,
        `model.pt` plus `last.pt` (weights and two optimizer moments), one of them written beside
        its old copy before the rename."""
        fitted = [s.model for s in recipe.plan if s.model is not None]
        return sum(self.param_bytes.get(key, 0) * (1 + 3 + 3) for key in fitted)


def check_recipe(recipe: Recipe, generate: bool = False, source: str = "recipe") -> RecipeCheck:
    """Build every model and dry-run every distill stage; raise RecipeError on any problem, naming
    `source` (the recipe's file, as the errors found while loading it do).

    With `generate`, first generate the data sets the recipe asks to be generated
    (`kdkit.data.datasets.generate_data`; commands that create data for a run)."""
    try:
        return _check(recipe, generate)
    except RecipeError as exc:
        raise RecipeError(exc.problems, source) from None
    except DataError as exc:  # a data set the recipe names cannot be used as configured
        raise RecipeError([str(exc)], source) from None


def _check(recipe: Recipe, generate: bool) -> RecipeCheck:
    r = recipe
    _check_names(r)
    _check_loggers(r)
    evaluator = make_evaluator(r)
    if generate:
        for spec in [r.data, *(s.data for s in _own_data(r))]:
            generate_data(spec)
    # Every split the run reads, now: an empty or one-class split must not wait for epoch 1's end
    # (training splits are built by `example_batch`).
    tracked = ["test"] if any(s.train.track_test for s in r.plan if s.do != "evaluate") else []
    for split in dict.fromkeys(["val", *tracked, *(s.split for s in r.pipeline if s.do == "evaluate")]):
        build_dataset(r.data, split)
    for stage in _own_data(r):
        build_dataset(stage.data, "val")
        example_batch(stage.data)
    _check_balanced(r)
    result = RecipeCheck(param_bytes=_check_models(r, example_batch(r.data), evaluator))
    check_stage_settings(r)
    for stage in r.plan:
        if stage.do == "distill":
            result.tables.extend(_check_distill_stage(r, stage))
    return result


def _check_loggers(recipe: Recipe) -> None:
    """Every logger `train.loggers` names can be imported (else its install line)."""
    problems = [missing_package(name) for name in dict.fromkeys(recipe.train.loggers or [])]
    if any(problems):
        raise RecipeError([f"train.loggers: {problem}" for problem in problems if problem])


def _check_distill_stage(recipe: Recipe, stage: StagePlan) -> list[Table]:
    """Build a distill stage's Distiller (every teacher's) on a batch of its training data and run
    one training step's losses on it; return its tap table, one per teacher."""
    images, labels = _training_batch(stage)
    distiller = build_distiller(recipe, stage.spec, example=images)
    several = isinstance(distiller, SeveralTeachers)
    branches = list(distiller.branches) if several else [distiller]
    try:
        tables = []
        for k, (branch, teacher) in enumerate(zip(branches, stage.teachers, strict=True)):
            where = f"{stage.key}.distill" + (f".teachers[{k}]" if several else "")
            compared = _check_pair_criteria(where, branch)
            title = f"teacher {k} {teacher.distill.teacher!r}" if several else ""
            tables.append(tap_table(stage, branch, compared, title))
        _check_step(stage, distiller, images, labels)
        return tables
    finally:
        distiller.close()


def _training_batch(stage: StagePlan) -> tuple[torch.Tensor, torch.Tensor]:
    """Images and labels of a few samples of a distill stage's training set (the dry run's size),
    the last one from its unlabelled pool when it has one; a pool that cannot be built, or whose
    images differ from the training images, is a recipe error naming `unlabeled`."""
    spec, key = stage.data, stage.origin("data", "unlabeled")
    n = dry_run_size(stage)
    try:  # the labelled split was built before: a failure here is the pool's
        dataset = training_set(spec, with_unlabeled=True)
    except (DataError, RegistryError) as exc:
        raise RecipeError([f"{key}: {exc}"]) from None
    pool = dataset.datasets[1] if isinstance(dataset, PartlyLabeled) and len(dataset.datasets) > 1 else None
    labeled = len(dataset) - (len(pool) if pool is not None else 0)
    parts = [_collated(dataset, list(range(min(n - (pool is not None), labeled))))]
    if pool is not None:  # the last sample: the pool's last
        parts.append(_collated(dataset, [len(dataset) - 1]))
        if parts[0][0].shape[1:] != parts[1][0].shape[1:]:
            raise RecipeError(
                [
                    f"{key}: its images are {tuple(parts[1][0].shape[1:])}, the training "
                    f"images {tuple(parts[0][0].shape[1:])}; a batch needs one size and channel count "
                    f"(give the pool the training data's image_size, mean and std)"
                ]
            )
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def _collated(dataset: Any, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The images (as a model takes them) and labels of `dataset[indices]`."""
    images, labels = default_collate([dataset[i][:2] for i in indices])
    return device_images(images, torch.device("cpu")), torch.as_tensor(labels)


def _check_pair_criteria(where: str, distiller: Distiller) -> list[tuple[Shape, Shape]]:
    """Each pair's criterion takes its adapter's outputs for features of the real tap shapes
    (the Distiller's dry run sized the adapters, but did not call the criteria); returns the
    shapes of each pair's adapter outputs, what its criterion compares. `where`: the pairs'
    distill section's key path."""
    generator = torch.Generator().manual_seed(0)
    compared = []
    for i, (pair, (s_shape, t_shape)) in enumerate(zip(distiller.pairs, distiller.shapes, strict=True)):
        s, t = (torch.randn(shape, generator=generator) for shape in (s_shape, t_shape))
        with torch.no_grad():
            s_out, t_out = distiller.adapters[i](s, t)
            try:
                distiller.criteria[i](s_out, t_out)
            except (ValueError, TypeError) as exc:
                raise RecipeError(
                    [
                        f"{where}.pairs[{i}]: criterion {pair.criterion!r} cannot compare the outputs "
                        f"of adapter {pair.adapter!r}, {tuple(s_out.shape)} and {tuple(t_out.shape)} "
                        f"(student {pair.student.path} [{pair.student.select}] {s_shape}, teacher "
                        f"{pair.teacher.path} [{pair.teacher.select}] {t_shape}): {exc}"
                    ]
                ) from None
        compared.append((tuple(s_out.shape), tuple(t_out.shape)))
    return compared


def _check_step(
    stage: StagePlan, distiller: Distiller | SeveralTeachers, images: torch.Tensor, labels: torch.Tensor
) -> None:
    """One training step's loss terms on a real batch (no gradient): the teacher's converted input,
    the logit loss on the real classes and labels (unlabelled samples too), every pair and group."""
    try:
        with torch.no_grad():
            distiller(images, labels)
    except Exception as exc:  # whatever fails here would fail the stage's first step
        raise RecipeError(
            [
                f"pipeline.{stage.name}.distill: a training step on {len(images)} of the stage's "
                f"training images fails ({type(exc).__name__}: {exc})"
            ]
        ) from None


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


def _own_data(recipe: Recipe) -> list[StagePlan]:
    """The train/distill stages that override `data` (the others train on the top-level data)."""
    return [s for s in recipe.plan if s.spec.data and s.do != "evaluate"]


def _check_balanced(recipe: Recipe) -> None:
    """With `data.balanced`, the batch splits evenly between the training set's groups."""
    specs = {"data": recipe.data} | {s.origin("data"): s.data for s in _own_data(recipe)}
    problems = []
    for where, spec in specs.items():
        if not spec.balanced:
            continue
        groups = list(dict.fromkeys(sample_strata(build_dataset(spec, "train"))))
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
    converts = {t.model: (s, t.distill) for s in recipe.plan for t in s.teachers if t.distill.teacher_input}
    sizes = {}
    for key in recipe.models:
        model = model_from_recipe(recipe, key, f"models.{key}")
        given, size_key = example, "data.image_size"
        if key in converts:
            stage, distill = converts[key]
            try:
                conversion = make_teacher_input(distill, stage.data, model)
            except ValueError as exc:
                raise RecipeError([f"{stage.key}.distill.{exc}"]) from None
            if conversion is not None:
                given, size_key = conversion(example), f"{stage.key}.distill.teacher_input.size"
        outputs = check_input(model, given, f"models.{key}", size_key)
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


def check_stage_settings(recipe: Recipe) -> None:
    """What each train/distill stage builds when it starts: optimizer, scheduler, autocast, the
    logit loss, criteria and adapters with their options, their smallest batch, a writable teacher
    cache. Needs neither data nor models (quick, e.g. for every variant of an ablation grid)."""
    r = recipe
    problems: list[str] = []
    for stage in r.plan:
        if stage.do == "evaluate":
            continue
        train = stage.train
        # a setting inherited from the top-level `train` is reported once, under its own key
        own = {"optimizer", "scheduler"} & set(stage.spec.train)
        problems += check_optimization(train, f"{stage.key}.train" if own else "train")
        try:
            autocast(resolve_device(train.device), train.amp)
        except ValueError as exc:  # names train.device / train.amp
            own = {"device", "amp"} & set(stage.spec.train)
            problems.append(f"{stage.key}.{exc}" if own else str(exc))
        d = stage.distill
        if d is None:
            continue
        problems += _distill_setting_problems(stage)
        if any(t.distill.cache for t in stage.teachers):
            try:
                check_output_dir(teacher_cache_dir(d), option=stage.origin("distill", "cache_dir"))
            except OutputDirError as exc:
                problems.append(f"{exc} (or set distill.cache: false)")
    if problems:
        raise RecipeError(list(dict.fromkeys(problems)))


def _distill_setting_problems(stage: StagePlan) -> list[str]:
    """Each teacher's logit loss, criteria and adapters of a distill stage are registered, take
    their options and suit the batch size; reported under the key each comes from."""
    batch = stage.data.batch_size
    several = bool(stage.distill_spec().teachers)
    problems = _combine_problems(stage) if several else []
    for k, teacher in enumerate(stage.teachers):
        index = k if several else None
        problems += _option_problems(stage, teacher.distill, index)
        problems += _adapter_option_problems(stage, teacher, index)
        for adapter_key, adapter, criterion_key, criterion in _feature_checks(stage, teacher, index):
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
    return problems


def _combine_problems(stage: StagePlan) -> list[str]:
    """The rule `distill.teacher_combine` works with the logit loss and the teachers' weights."""
    d = stage.distill_spec()
    try:
        TeacherCombiner(d.teacher_combine, d.logit_loss, d.logit_options, [t.weight for t in stage.teachers])
    except RegistryError:
        return []  # an unknown rule or logit loss is reported under its own key
    except OptionError as exc:
        if exc.option != "weights":
            return []  # a bad logit option is reported under logit_options
        return [f"{stage.origin('distill', 'teachers')}: {exc}"]
    except ValueError as exc:
        return [f"{stage.origin('distill', 'teacher_combine')}: {exc}"]
    return []


def _own_key(stage: StagePlan, k: int | None, key: str) -> str | None:
    """`pipeline.<stage>.distill.teachers[k].<key>` when teacher `k` of `distill.teachers` sets
    `key` itself, else None (the setting is the distill section's)."""
    if k is None or getattr(stage.distill_spec().teachers[k], key, None) is None:
        return None
    return f"{stage.key}.distill.teachers[{k}].{key}"


def _section_key(stage: StagePlan, k: int | None) -> str:
    """The key path of a teacher's distill settings: the section, or `distill.teachers[k]`."""
    return f"{stage.key}.distill" + ("" if k is None else f".teachers[{k}]")


def _option_problems(stage: StagePlan, d: DistillSpec, k: int | None) -> list[str]:
    """A distill stage's logit loss and (teacher `k`'s) feature criterion are registered and take
    their options (names and values)."""
    problems = []
    for kind, resolve in (("logit_loss", resolve_logit_loss), ("criterion", resolve_feature_criterion)):
        options = "logit_options" if kind == "logit_loss" else "criterion_options"
        # a setting inherited from the top-level `distill` is reported once, under its own key
        name_key = _own_key(stage, k, kind) or stage.origin("distill", kind)
        options_key = _own_key(stage, k, options) or stage.origin("distill", options)
        try:
            resolve(getattr(d, kind), getattr(d, options))
        except RegistryError as exc:
            problems.append(f"{name_key}: {exc}")
        except OptionError as exc:
            problems.append(f"{options_key}.{exc}")
        except ValueError as exc:
            problems.append(f"{options_key}: {exc}")
    return problems


def _adapter_option_problems(stage: StagePlan, teacher: TeacherPlan, k: int | None) -> list[str]:
    """The adapter options of (teacher `k`'s) distill section, and those a pair gives itself, suit
    their adapter (names, then values, by building it for two small widths). Options left from another adapter
    are the usual cause: the message says how to clear them."""
    d = teacher.distill
    if d.adapter == "none":
        return []
    # options inherited from the top-level `distill` are reported once, under their own key
    key = _own_key(stage, k, "adapter_options") or stage.origin("distill", "adapter_options")
    checks = [(key, d.adapter, d.adapter_options, f"clear them with --set {key}={{}}")]
    for i, spec in enumerate(teacher.pair_specs()):
        if spec.adapter_options is not None:
            pair_key = f"{_section_key(stage, k)}.pairs[{i}].adapter_options"
            adapter = spec.adapter or d.adapter
            checks.append((pair_key, adapter, spec.adapter_options, "remove them from the pair"))
    problems = []
    for option_key, adapter, options, clear in checks:
        try:
            unknown = unknown_adapter_options(adapter, options)
            if unknown:
                problems.append(f"{option_key}: {unknown}; options of another adapter? {clear}")
            else:
                build_adapter(adapter, 4, 4, **options)  # a bad value fails here, before any work
        except RegistryError:
            continue  # an unknown adapter name is reported under its own key
        except (ValueError, TypeError) as exc:
            problems.append(f"{option_key}: adapter {adapter!r}: {exc}")
    return problems


def _feature_checks(stage: StagePlan, teacher: TeacherPlan, k: int | None) -> list[tuple[str, str, str, str]]:
    """(adapter key, adapter, criterion key, criterion) of (teacher `k`'s) distill section and of
    each layer pair that names its own adapter or criterion; the keys say where to report a problem."""
    d = teacher.distill
    # a criterion inherited from the top-level `distill` is reported once, under its own key
    criterion_key = _own_key(stage, k, "criterion") or stage.origin("distill", "criterion")
    adapter_key = _own_key(stage, k, "adapter") or f"{stage.key}.distill.adapter"
    checks = [(adapter_key, d.adapter, criterion_key, d.criterion)]
    if d.adapter == "none":
        return checks
    for i, spec in enumerate(teacher.pair_specs()):
        if spec.adapter or spec.criterion:
            key = f"{_section_key(stage, k)}.pairs[{i}]"
            checks.append(
                (
                    f"{key}.adapter" if spec.adapter else checks[0][0],
                    spec.adapter or d.adapter,
                    f"{key}.criterion" if spec.criterion else criterion_key,
                    spec.criterion or d.criterion,
                )
            )
    return checks


# the shapes, then the pair's own settings (adapter, criterion, weight) last
TAP_COLUMNS = (
    "#",
    "student tap",
    "shape",
    "teacher tap",
    "shape",
    "compared",
    "adapter",
    "criterion",
    "weight",
)


def tap_table(
    stage: StagePlan, distiller: Distiller, compared: list[tuple[Shape, Shape]], teacher: str = ""
) -> Table:
    """A table of layer pairs and groups: taps → shapes (as captured → as selected) → what each
    pair's adapter hands its criterion (`compared`: the shapes of its outputs, from
    `_check_pair_criteria`) → adapter, criterion and weight (a group's method and weight).
    `teacher`: which teacher's pairs, in the title (a stage with several teachers has a table each)."""
    whose = f", {teacher}" if teacher else ""
    params = distiller.extra_parameters()
    table = Table(title=f"stage {stage.name!r}{whose}: layer pairs (adapter params: {params})")
    for col in TAP_COLUMNS:
        table.add_column(col)
    student, teacher = distiller.student_taps.captured_shapes, distiller.teacher_taps.captured_shapes
    for i, (pair, (s_shape, t_shape)) in enumerate(zip(distiller.pairs, distiller.shapes, strict=True)):
        table.add_row(
            str(i),
            escape(f"{pair.student.path} [{pair.student.select}]"),
            _shape_cell(student.get(f"feat.{i}"), s_shape),
            escape(f"{pair.teacher.path} [{pair.teacher.select}]"),
            _shape_cell(teacher.get(f"feat.{i}"), t_shape),
            _compared_cell(*compared[i]),
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
                _shape_cell(student.get(f"group.{j}.{k}"), s_shapes[k]),
                escape(f"{t_tap.path} [{t_tap.select}]"),
                _shape_cell(teacher.get(f"group.{j}.{k}"), t_shapes[k]),
                "",
                escape(group.method) if k == 0 else "",
                "",
                f"{group.weight:g}" if k == 0 else "",
            )
    if not distiller.pairs and not distiller.groups:
        table.caption = "no layer pairs: logit distillation only"
    else:
        table.caption = "shape: as captured → as selected; compared: the adapter's outputs"
    return table


def _shape_cell(captured: Shape | None, selected: Shape) -> str:
    """`captured → selected` where the selector changed the shape (a CNN map pooled or laid out
    as tokens, a ViT's class token taken), else the one shape."""
    return str(selected) if captured in (None, selected) else f"{captured} → {selected}"


def _compared_cell(student: Shape, teacher: Shape) -> str:
    """The shape both adapter outputs share, or both (relation criteria compare unequal shapes)."""
    return str(student) if student == teacher else f"{student} / {teacher}"
