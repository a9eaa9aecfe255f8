"""Checking a recipe: everything the types alone cannot say (ranges, names, which stage may read
which), and the plan built while checking: each stage merged with the top-level sections once, so
what is checked is what runs. Every problem is collected with its key path, `pipeline.<stage>.<key>`.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

from kdkit.config.plan import Plan, StagePlan, TeacherPlan
from kdkit.config.schema import (
    TRACKING_KEYS,
    DataSpec,
    DistillSpec,
    LauncherSpec,
    PairSpec,
    Recipe,
    RecipeError,
    StageSpec,
    TeacherInputSpec,
    TrainSpec,
    canonical_keys,
    convert,
    convert_dataclass,
    shorten,
)
from kdkit.registry import TEACHER_COMBINERS, did_you_mean
from kdkit.utils.trackers import LOGGERS


def parse_recipe(data: dict[str, Any], source: str = "recipe") -> Recipe:
    """Validate a recipe mapping into a `Recipe`, or raise `RecipeError` listing every problem."""
    problems: list[str] = []
    given = canonical_keys(data, problems)
    _check_one_teacher_form(given.get("distill"), "distill", problems)
    recipe = convert_dataclass(Recipe, given, "", problems)
    if recipe is not None and not problems:
        plan = _check_semantics(recipe, problems)
        if not problems:
            recipe.plan = plan  # the specs just checked are the ones every consumer reads
    if problems:
        raise RecipeError(problems, source)
    return recipe


def _check_semantics(recipe: Recipe, problems: list[str]) -> Plan:
    """Cross-field checks that the types alone cannot express; returns the plan they checked."""
    names = [s.name for s in recipe.pipeline]
    for key, name in [("name", recipe.name), *((f"pipeline[{i}].name", n) for i, n in enumerate(names))]:
        problem = file_name_problem(name)
        if problem:
            problems.append(f"{key}: {name!r} {problem}")
    if recipe.seed < 0:  # torch and NumPy refuse negative seeds, and only once training starts
        problems.append(f"seed: expected a non-negative integer, got {recipe.seed}")
    if not recipe.pipeline:
        problems.append("pipeline: expected at least one stage")
    for dup in sorted({n for n in names if names.count(n) > 1}):
        problems.append(f"pipeline: stage name {dup!r} is used more than once")
    _check_data(recipe.data, "data", problems)
    _check_train(recipe.train, "train", problems)
    _check_loggers(recipe.train.loggers, problems)
    check_launcher(recipe.launcher, "launcher", problems)
    return build_plan(recipe, problems)


def _check_loggers(names: list[str] | None, problems: list[str]) -> None:
    """Each name of `train.loggers` is a known logger (whether its package is installed is checked
    before a run, by `kdkit.run.checks`)."""
    for i, name in enumerate(names or []):
        if name not in LOGGERS:
            problems.append(
                f"train.loggers[{i}]: unknown logger {name!r}.{did_you_mean(name, list(LOGGERS))} "
                f"Known loggers: {', '.join(LOGGERS)}"
            )


def build_plan(recipe: Recipe, problems: list[str]) -> Plan:
    """Resolve and check every stage in order (a stage may name only earlier ones)."""
    planned: list[StagePlan] = []
    trained: list[str] = []  # earlier train/distill stages, also those with problems (no follow-ons)
    for stage in recipe.pipeline:
        plan = _plan_stage(recipe, stage, planned, trained, problems)
        if plan is not None:
            planned.append(plan)
        if stage.do != "evaluate":
            trained.append(stage.name)
    return Plan(tuple(planned))


def _plan_stage(
    recipe: Recipe, stage: StageSpec, earlier: list[StagePlan], trained: list[str], problems: list[str]
) -> StagePlan | None:
    """One stage merged with the top-level sections (the one merge rule) and checked; None when
    its overrides do not convert (the problems are appended)."""
    where = f"pipeline.{stage.name}"
    found: list[str] = []
    train = convert(TrainSpec, {**dataclasses.asdict(recipe.train), **stage.train}, f"{where}.train", found)
    # a stage's own `teacher` replaces the `teachers` it inherits, and its own `teachers` the
    # `teacher` (both at one level is an error, checked on the mapping as written)
    own_distill = {"teachers": [], **stage.distill} if "teacher" in stage.distill else stage.distill
    distill = convert(
        DistillSpec, {**dataclasses.asdict(recipe.distill), **own_distill}, f"{where}.distill", found
    )
    data = convert(DataSpec, {**dataclasses.asdict(recipe.data), **stage.data}, f"{where}.data", found)
    if stage.data and stage.do == "evaluate":
        found.append(f"{where}.data: an evaluate stage reads the top-level data; remove it")
    if stage.baseline is not None and stage.do != "evaluate":
        found.append(f"{where}.baseline: only an evaluate stage compares with a baseline")
    found.extend(
        f"{where}.train.{key}: a run logs to one place; set it in the top-level train section"
        for key in TRACKING_KEYS
        if key in stage.train
    )
    problems.extend(found)
    if found:
        return None
    seed = recipe.seed if train.seed is None else train.seed
    train = dataclasses.replace(train, seed=seed)
    if stage.train:  # the top-level train is checked once, by the caller
        _check_train(train, f"{where}.train", problems)
    if stage.data:
        _check_data(data, f"{where}.data", problems)
    if stage.do == "train":
        if stage.model not in recipe.models:
            problems.append(f"{where}.model: expected one of {sorted(recipe.models)}, got {stage.model!r}")
        return StagePlan(stage, seed, train, data, model=stage.model)
    if stage.do == "distill":
        teachers = _plan_teachers(stage, distill, f"{where}.distill", recipe, earlier, trained, problems)
        return StagePlan(stage, seed, train, data, distill, model=distill.student, teachers=teachers)
    _check_evaluate(stage, where, trained, problems)
    return StagePlan(stage, seed, train, data)


def _plan_teachers(
    stage: StageSpec,
    distill: DistillSpec,
    where: str,
    recipe: Recipe,
    earlier: list[StagePlan],
    trained: list[str],
    problems: list[str],
) -> tuple[TeacherPlan, ...]:
    """Every teacher of a distill stage: `distill.teacher`, or each of `distill.teachers` with the
    section's settings it does not set itself; each one's section is checked under its key path."""
    if not distill.teachers:
        _check_distill(distill, where, recipe, trained, problems)
        return (_teacher_plan(distill, 1.0, where, earlier, problems),)
    _check_one_teacher_form(stage.distill, where, problems)
    if distill.teacher_combine not in TEACHER_COMBINERS:
        problems.append(
            f"{where}.teacher_combine: expected one of {TEACHER_COMBINERS.names()}, got "
            f"{distill.teacher_combine!r}.{did_you_mean(distill.teacher_combine, TEACHER_COMBINERS.names())}"
        )
    plans = []
    for i, spec in enumerate(distill.teachers):
        at = f"{where}.teachers[{i}]"
        own = {k: v for k, v in dataclasses.asdict(spec).items() if v is not None and k != "weight"}
        # through convert: the dataclass fields (groups, teacher_input) come back as specs
        merged = convert(DistillSpec, {**dataclasses.asdict(distill), "teachers": [], **own}, at, problems)
        if merged is None:
            continue
        if spec.weight < 0:
            problems.append(f"{at}.weight: expected a value >= 0, got {spec.weight}")
        _check_distill(merged, at, recipe, trained, problems)
        plans.append(_teacher_plan(merged, spec.weight, at, earlier, problems))
    if not any(t.weight > 0 for t in distill.teachers):
        problems.append(f"{where}.teachers: every weight is 0; at least one teacher needs a weight > 0")
    return tuple(plans)


def _check_one_teacher_form(section: Any, where: str, problems: list[str]) -> None:
    """A distill section as written names `teacher` or `teachers`, not both."""
    if isinstance(section, dict) and "teacher" in section and section.get("teachers"):
        problems.append(
            f"{where}: give either teacher ({section['teacher']!r}) or teachers (a list), not both; "
            f"remove {where}.teacher"
        )


def _teacher_plan(
    d: DistillSpec, weight: float, where: str, earlier: list[StagePlan], problems: list[str]
) -> TeacherPlan:
    """One teacher's plan: its model key, the earlier stage that trains it, its parsed pairs."""
    trainer = next((s for s in earlier if s.name == d.teacher and s.do != "evaluate"), None)
    return TeacherPlan(
        model=trainer.model if trainer and trainer.model else d.teacher,
        stage=trainer.name if trainer else None,
        weight=weight,
        distill=d,
        pairs=_parsed_pairs(d, where, problems),
    )


def _check_evaluate(stage: StageSpec, where: str, trained: list[str], problems: list[str]) -> None:
    if not stage.runs:
        problems.append(f"{where}.runs: expected the names of earlier train/distill stages")
    for run in stage.runs:
        if run not in trained:
            problems.append(
                f"{where}.runs: {run!r} is not an earlier train/distill stage.{did_you_mean(run, trained)}"
            )
    if stage.baseline is not None and stage.baseline not in stage.runs:
        problems.append(
            f"{where}.baseline: expected one of the stage's runs {stage.runs}, got {stage.baseline!r}"
        )


def _parsed_pairs(d: DistillSpec, where: str, problems: list[str]) -> tuple[PairSpec, ...] | str:
    """`distill.pairs` parsed once: a `PairSpec` per item ('uniform:N' is returned as it is)."""
    if isinstance(d.pairs, str):
        return d.pairs
    parsed = [parse_pair(entry, f"{where}.pairs[{i}]", problems) for i, entry in enumerate(d.pairs)]
    return tuple(p for p in parsed if p is not None)


_FILE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+=-]*")


def file_name_problem(name: str) -> str:
    """Why `name` cannot be used as one file or folder name ('' when it can): recipe and stage names
    become folders (runs/<name>/<stage>/), so they must stay inside their parent."""
    if not _FILE_NAME.fullmatch(name) or ".." in name:
        return (
            "cannot be a folder name: use letters, digits and _ . + = - (no path separators, no '..', "
            "not starting with '.' or '-'), e.g. 'kdfas-demo'"
        )
    if len(name) > 100:
        return f"is {len(name)} characters long; use at most 100"
    return ""


def _check_data(data: DataSpec, where: str, problems: list[str]) -> None:
    if data.image_size <= 0 or data.batch_size <= 0:
        problems.append(f"{where}: image_size and batch_size must be positive")
    if data.eval_batch_size is not None and data.eval_batch_size <= 0:
        problems.append(
            f"{where}.eval_batch_size: expected a positive number (or null), got {data.eval_batch_size}"
        )
    if data.num_workers < 0:
        problems.append(
            f"{where}.num_workers: expected 0 (load in the training process) or more worker processes, "
            f"got {data.num_workers}"
        )
    if len(data.mean) != len(data.std) or any(s <= 0 for s in data.std):
        problems.append(f"{where}.std: expected as many positive values as {where}.mean")
    if data.aug_cycle is not None and data.aug_cycle < 1:
        problems.append(f"{where}.aug_cycle: expected at least 1 (or null), got {data.aug_cycle}")
    if not 0.0 < data.labeled_fraction <= 1.0:
        problems.append(f"{where}.labeled_fraction: expected a value in (0, 1], got {data.labeled_fraction}")
    if data.unlabeled == "rest" and data.labeled_fraction == 1.0:
        problems.append(
            f"{where}.unlabeled: 'rest' is the training samples whose labels {where}.labeled_fraction "
            "drops, and it is 1.0 (every label kept); lower it, or name another data set"
        )
    if data.epoch_size is not None and (data.epoch_size < 1 or data.balanced):
        problems.append(
            f"{where}.epoch_size: expected a positive number of samples (or null), without balanced "
            f"batches (whose epoch is fixed by the groups); got {data.epoch_size}"
        )
    if data.unlabeled is not None and data.balanced:
        problems.append(
            f"{where}.balanced: balanced batches draw by label, which unlabeled samples lack; "
            f"set balanced: false or drop {where}.unlabeled"
        )


def parse_launcher(data: Any, source: str = "recipe") -> LauncherSpec:
    """A `launcher` section on its own (`kdkit ablate` keeps it out of its runs' recipes: it says how
    they run, not what), or `RecipeError` naming every problem by its key path."""
    problems: list[str] = []
    launcher = convert_dataclass(LauncherSpec, data, "launcher", problems)
    if not problems:
        check_launcher(launcher, "launcher", problems)
    if problems:
        raise RecipeError(problems, source)
    return launcher


def check_launcher(launcher: LauncherSpec, where: str, problems: list[str]) -> None:
    """The `launcher` section's values: positive sizes, sbatch option names and scalar values."""
    for key in ("time", "nodes", "cpus_per_task"):
        if getattr(launcher, key) < 1:
            problems.append(f"{where}.{key}: expected at least 1, got {getattr(launcher, key)}")
    if launcher.gpus_per_node < 0:
        problems.append(f"{where}.gpus_per_node: expected 0 or more, got {launcher.gpus_per_node}")
    if launcher.mem is not None and not re.fullmatch(r"[0-9]+[KMGT]?", launcher.mem):
        problems.append(f"{where}.mem: expected a size such as 16G or 4000M, got {launcher.mem!r}")
    for name, value in launcher.sbatch.items():
        if not re.fullmatch(r"[a-z][a-z0-9_-]*", str(name)):
            problems.append(f"{where}.sbatch.{name}: expected an sbatch option name such as account or qos")
        elif not isinstance(value, str | int | float | bool):
            problems.append(f"{where}.sbatch.{name}: expected a single value, got {shorten(value)}")


def _check_train(train: TrainSpec, where: str, problems: list[str]) -> None:
    if train.epochs < 1:
        problems.append(f"{where}.epochs: expected at least 1, got {train.epochs}")
    if train.lr <= 0:
        problems.append(f"{where}.lr: expected a positive number, got {train.lr}")
    for key, low in (
        ("weight_decay", 0),
        ("momentum", 0),
        ("warmup_epochs", 0),
        ("warmup_lr", 0),
        ("min_lr", 0),
    ):
        if getattr(train, key) < low:
            problems.append(f"{where}.{key}: expected a value >= {low}, got {getattr(train, key)}")
    if not 0 <= train.label_smoothing < 1:
        problems.append(f"{where}.label_smoothing: expected a value in [0, 1), got {train.label_smoothing}")
    if train.clip_grad is not None and train.clip_grad <= 0:
        problems.append(
            f"{where}.clip_grad: expected a positive gradient norm (or null), got {train.clip_grad}"
        )
    if train.max_steps_per_epoch is not None and train.max_steps_per_epoch < 1:
        problems.append(
            f"{where}.max_steps_per_epoch: expected at least 1 (or null), got {train.max_steps_per_epoch}"
        )
    if train.eval_every < 1 or train.log_every < 1:
        problems.append(f"{where}: eval_every and log_every must be at least 1")
    if train.seed is not None and train.seed < 0:
        problems.append(f"{where}.seed: expected a non-negative integer (or null), got {train.seed}")


def _check_distill(
    d: DistillSpec, where: str, recipe: Recipe, earlier: list[str], problems: list[str]
) -> None:
    if not 0.0 <= d.alpha <= 1.0:
        problems.append(f"{where}.alpha: expected a value in [0, 1], got {d.alpha}")
    if d.tau <= 0:
        problems.append(f"{where}.tau: expected a positive temperature, got {d.tau}")
    if d.beta < 0:
        problems.append(f"{where}.beta: expected a value >= 0, got {d.beta}")
    if d.cache_max_gb <= 0:
        problems.append(f"{where}.cache_max_gb: expected a positive size in GB, got {d.cache_max_gb}")
    if d.student not in recipe.models:
        problems.append(f"{where}.student: expected one of {sorted(recipe.models)}, got {d.student!r}")
    if d.teacher not in recipe.models and d.teacher not in earlier:
        problems.append(
            f"{where}.teacher: expected a model key {sorted(recipe.models)} or an earlier "
            f"stage name {earlier}, got {d.teacher!r}"
        )
    for i, group in enumerate(d.groups):
        at = f"{where}.groups[{i}]"
        if len(group.student) != len(group.teacher) or not group.student:
            problems.append(
                f"{at}: expected as many student as teacher layers (at least one each), got "
                f"{len(group.student)} and {len(group.teacher)}"
            )
        if group.weight < 0:
            problems.append(f"{at}.weight: expected a value >= 0, got {group.weight}")
    if isinstance(d.teacher_input, TeacherInputSpec):
        t = d.teacher_input
        if t.size is not None and t.size <= 0:
            problems.append(f"{where}.teacher_input.size: expected a positive side in pixels, got {t.size}")
        if t.std is not None and any(v <= 0 for v in t.std):
            problems.append(f"{where}.teacher_input.std: expected positive numbers, got {t.std}")
        if t.mean is not None and t.std is not None and len(t.mean) != len(t.std):
            problems.append(
                f"{where}.teacher_input: mean and std need as many values, got {t.mean} and {t.std}"
            )
    if isinstance(d.pairs, str) and not re.fullmatch(r"uniform:[1-9][0-9]*", d.pairs):
        problems.append(f"{where}.pairs: expected a list of pairs or 'uniform:N', got {d.pairs!r}")


def parse_pair(entry: Any, where: str, problems: list[str]) -> PairSpec | None:
    """One item of `distill.pairs` as a `PairSpec`: `[student_block, teacher_block]` or a mapping
    (`PairSpec`'s keys). Each problem is appended to `problems` with its key path under `where`."""
    if isinstance(entry, list) and len(entry) == 2 and all(_is_int(v) for v in entry):
        return PairSpec(*entry)
    if not isinstance(entry, dict):
        problems.append(
            f"{where}: expected [student_block, teacher_block] or a mapping "
            f"{{student: block or path, teacher: block or path, ...}}, got {shorten(entry)}"
        )
        return None
    found: list[str] = []
    spec = convert_dataclass(PairSpec, entry, where, found)
    if spec is not None and not found:
        if spec.weight < 0:
            found.append(f"{where}.weight: expected a value >= 0, got {spec.weight}")
        if spec.adapter == "none":
            found.append(
                f"{where}.adapter: 'none' is not an adapter of one pair; remove the pair to leave it "
                "out (distill.adapter: none turns feature KD off)"
            )
    problems.extend(found)
    return None if found else spec


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
