"""Recipes: YAML → typed, validated configuration.

A recipe is read with `yaml.safe_load` (no tags that import or run code), overridden with
`--set a.b=c` strings, then checked against the dataclasses below *before any work starts*.
Every problem is collected and reported with its key path, e.g.
``train.lr: expected a number, got 'fast'`` or ``distil: unknown key. Did you mean 'distill'?``.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import re
import reprlib
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from kdkit.config.plan import Plan, StagePlan
from kdkit.registry import did_you_mean

# A value pasted by mistake, or a file with thousands of bad keys, must not flood the terminal.
MAX_PROBLEM_CHARS = 2000  # per problem line
MAX_PROBLEMS = 50  # lines listed; the rest are counted


class RecipeError(ValueError):
    """One or more problems in a recipe; `problems` holds one line per problem (each length-bounded)."""

    def __init__(self, problems: list[str], source: str = "recipe") -> None:
        self.problems = [_bounded(p) for p in problems[:MAX_PROBLEMS]]
        if len(problems) > MAX_PROBLEMS:
            self.problems.append(f"... and {len(problems) - MAX_PROBLEMS} more problems")
        self.source = source
        super().__init__(f"{source}: " + "; ".join(self.problems))

    def __str__(self) -> str:
        lines = "\n".join(f"  - {p}" for p in self.problems)
        return f"invalid {self.source}:\n{lines}"


def _bounded(text: str) -> str:
    if len(text) <= MAX_PROBLEM_CHARS:
        return text
    return f"{text[:MAX_PROBLEM_CHARS]}… ({len(text) - MAX_PROBLEM_CHARS} more characters)"


def shorten(value: Any) -> str:
    """`repr(value)` cut to a readable length (long lists and mappings end in '...')."""
    return _REPR.repr(value)


_REPR = reprlib.Repr()
_REPR.maxlist = _REPR.maxdict = 8
_REPR.maxstring = _REPR.maxother = 80

# --------------------------------------------------------------------------------------------
# The schema. Field comments are the reference; docs/recipes.md is generated from the same facts.
# --------------------------------------------------------------------------------------------


@dataclass
class ModelSpec:
    """One model: a kdkit/plugin model name or any timm model name, plus its options."""

    name: str  # registered model name, or a timm model name such as vit_base_patch16_224
    options: dict[str, Any] = field(default_factory=dict)  # keyword arguments for the factory
    weights: str | None = None  # local .pth/.pt/.safetensors file to initialise from
    pretrained: bool = False  # download timm's pretrained weights (needs network or a hub cache)


@dataclass
class UnlabeledPool:
    """Another data set whose samples join `distill` stages' training set without their labels."""

    dataset: str  # a registered dataset
    root: str | None = None
    split: str = "train"  # the split of it that is used
    options: dict[str, Any] = field(default_factory=dict)  # dataset-specific options


@dataclass
class DataSpec:
    """The data set every stage reads."""

    dataset: str  # a registered dataset, e.g. digits or fas_folder
    root: str | None = None  # where the data lives (dataset-specific)
    image_size: int = 224  # side of the square input image in pixels
    batch_size: int = 64
    eval_batch_size: int | None = None  # default: 2 × batch_size
    num_workers: int = 0  # DataLoader worker processes
    # epoch e replays the augmentation of epoch e mod aug_cycle (so cached teacher outputs are reused);
    # null = a fresh augmentation every epoch
    aug_cycle: int | None = None
    # every training batch draws equally from each group of the training set (its `groups`, else
    # its `labels`, e.g. domain x live/attack); batch_size must be a multiple of the group count
    balanced: bool = False
    # training samples per epoch (the data's permutations concatenated and cut); null = the training
    # set's size. Equal step counts for stages whose training sets differ in size (labels only vs pool)
    epoch_size: int | None = None
    # keep the labels of this fraction of the training set (stratified by label, the same samples
    # in every run); `train` stages see only these samples
    labeled_fraction: float = 1.0
    # samples that `distill` stages also train on without labels (teacher terms only): 'rest' (the
    # training samples whose labels labeled_fraction dropped) or another data set (`UnlabeledPool`)
    unlabeled: Literal["rest"] | UnlabeledPool | None = None
    mean: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])  # input normalisation
    std: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])
    options: dict[str, Any] = field(default_factory=dict)  # dataset-specific options


@dataclass
class PairSpec:
    """One teacher/student layer pair of `distill.pairs` written as a mapping; the options left
    unset come from the distill section."""

    student: int | str  # 1-based block number of the student's tap preset, or a module path
    teacher: int | str  # the same for the teacher
    adapter: str | None = None  # default: distill.adapter
    # default: distill.adapter_options when the pair uses distill.adapter, else none
    adapter_options: dict[str, Any] | None = None
    criterion: str | None = None  # default: distill.criterion
    # default: distill.criterion_options when the pair uses distill.criterion, else none
    criterion_options: dict[str, Any] | None = None
    weight: float = 1.0  # this pair's weight w_i in the feature term beta * sum_i w_i * l_i / n
    # token selector; default: distill.select, else the preset's (a block number) or 'all' (a path)
    select: str | None = None
    io: Literal["output", "input"] = "output"  # tap the module's output or its input


@dataclass
class GroupSpec:
    """One item of `distill.groups`: a method that takes several layers of each model at once."""

    method: str  # a registered layer-group method (kdkit.distill.layer_groups: vitkd)
    student: list[int | str]  # 1-based block numbers of the student's tap preset, or module paths
    teacher: list[int | str]  # as many of the teacher's
    options: dict[str, Any] = field(default_factory=dict)  # the method's own options
    weight: float = 1.0  # its weight w in the feature term, like a pair's
    select: str | None = None  # token selector of its taps; default: the method's


@dataclass
class TeacherInputSpec:
    """The input the teacher expects, when it differs from the student's (`data`)."""

    size: int | None = None  # side in pixels; null = the student's
    mean: list[float] | None = None  # null = the student's data.mean
    std: list[float] | None = None  # null = the student's data.std
    interpolation: Literal["bicubic", "bilinear", "nearest"] = "bicubic"


@dataclass
class DistillSpec:
    """How the student learns from the teacher (used by `distill` stages)."""

    teacher: str = "teacher"  # a key of `models`, or the name of an earlier stage that trained it
    student: str = "student"  # a key of `models`
    adapter: str = "covariance"  # feature adapter of each layer pair, or 'none' for no feature KD
    adapter_options: dict[str, Any] = field(default_factory=dict)
    criterion: str = (
        "mse"  # feature loss after the adapter: a registered one (mse, smooth_l1, cosine, rkd, at)
    )
    criterion_options: dict[str, Any] = field(default_factory=dict)  # its options (rkd: distance_weight, ...)
    # teacher/student layer pairs: [[student_block, teacher_block], ...] (1-based), mappings
    # (`PairSpec`: block numbers or module paths, with per-pair options), or 'uniform:N': N pairs
    # spread evenly over both depths (12 vs 24 blocks, N=4: 3,6,9,12 ↔ 6,12,18,24). Old name: stages.
    pairs: list[Any] | str = field(default_factory=list)
    # methods that take a group of layers at once (`GroupSpec`), beside the pairs
    groups: list[GroupSpec] = field(default_factory=list)
    point: str = "block"  # which part of a block to tap: block | attn | mlp (preset dependent)
    select: str | None = None  # token selector (cls, mean, patch, tokens, all); default: preset's
    alpha: float = 0.7  # weight of the logit KD term; CE gets 1 - alpha
    tau: float = 3.0  # KD temperature
    logit_loss: str = "kl"  # the logit KD term: a registered logit loss (kl, dkd, dist)
    logit_options: dict[str, Any] = field(default_factory=dict)  # its options (kl: standardize, ...)
    beta: float = 1.0  # weight of the feature term (the weighted mean over layer pairs)
    # the teacher's own input: 'auto' (its timm pretrained_cfg: size, mean, std, interpolation), a
    # `TeacherInputSpec`, or null (the student's input as it is)
    teacher_input: Literal["auto"] | TeacherInputSpec | None = None
    teacher_dtype: Literal["float32", "bfloat16", "float16"] = "float32"  # the teacher's weights and compute
    cache: bool = True  # store teacher outputs per (sample, augmentation) and reuse them
    cache_dir: str | None = None  # default: $KDKIT_CACHE_DIR or ~/.cache/kdkit/teacher-outputs
    cache_max_gb: float = 20.0  # size bound of cache_dir; beyond it the teacher runs live


@dataclass
class TrainSpec:
    """Optimisation settings (a stage may override any of them)."""

    epochs: int = 10
    optimizer: str = "adamw"  # any timm optimizer name
    lr: float = 5e-4
    weight_decay: float = 0.05
    momentum: float = 0.9  # for SGD-like optimizers
    scheduler: str = "cosine"  # any timm scheduler name, or 'none'
    warmup_epochs: int = 0
    warmup_lr: float = 1e-6
    min_lr: float = 1e-6
    label_smoothing: float = 0.0
    clip_grad: float | None = None  # max gradient norm; null = no clipping
    amp: Literal["none", "bf16", "fp16"] = "none"  # fp16 needs CUDA (uses a grad scaler)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    # torch.compile the models (the student; in distillation the teacher too, under inference mode):
    # the first steps wait for compilation (tens of seconds), later ones run faster on a GPU
    compile: bool = False
    compile_mode: Literal["default", "reduce-overhead", "max-autotune"] = "default"
    eval_every: int = 1  # evaluate every N epochs (and always after the last)
    log_every: int = 20  # steps between progress/log updates
    max_steps_per_epoch: int | None = None  # cap steps per epoch (quick runs, smoke tests)
    seed: int | None = None  # this stage's seed; null = the recipe's `seed` (a stage may pin its own)
    # also evaluate the test split every epoch, only to report the epoch a test-set selection would
    # pick (the "optimistic" numbers of published code); never used to select anything
    track_test: bool = False


@dataclass
class StageSpec:
    """One step of the pipeline."""

    name: str
    do: Literal["train", "distill", "evaluate"]
    model: str | None = None  # train: the key of `models` to train
    runs: list[str] = field(default_factory=list)  # evaluate: stage names whose models to test
    split: str = "test"  # evaluate: the split to report
    # evaluate: the run every other run is compared with (paired differences with intervals),
    # normally the student trained without a teacher
    baseline: str | None = None
    train: dict[str, Any] = field(default_factory=dict)  # overrides of the top-level `train`
    distill: dict[str, Any] = field(default_factory=dict)  # overrides of the top-level `distill`
    # train/distill: overrides of the top-level `data` for this stage's training (e.g. a teacher
    # trained on a larger pool); every stage is evaluated on the top-level data's dev/test splits
    data: dict[str, Any] = field(default_factory=dict)


@dataclass
class Recipe:
    """A whole experiment: data, models, distillation, training and the pipeline of stages."""

    name: str
    data: DataSpec
    models: dict[str, ModelSpec]
    pipeline: list[StageSpec]
    seed: int = 0
    plugins: list[str] = field(default_factory=list)  # plugins the recipe needs (checked)
    distill: DistillSpec = field(default_factory=DistillSpec)
    train: TrainSpec = field(default_factory=TrainSpec)
    evaluator: str = "classification"  # a registered evaluator
    evaluator_options: dict[str, Any] = field(default_factory=dict)

    @functools.cached_property
    def plan(self) -> Plan:
        """Every stage resolved once (`kdkit.config.plan`); `parse_recipe` builds it while checking."""
        problems: list[str] = []
        plan = _build_plan(self, problems)
        if problems:
            raise RecipeError(problems)
        return plan

    def to_dict(self) -> dict[str, Any]:
        """A plain dict (YAML/JSON-serialisable) of the resolved recipe."""
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------------------------
# Typed conversion with error collection.
# --------------------------------------------------------------------------------------------

_MISSING = object()


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    if origin is dict:
        return "a mapping"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return {int: "an integer", float: "a number", str: "a string", bool: "true/false"}.get(
        tp, "null" if tp is type(None) else getattr(tp, "__name__", str(tp))
    )


def _convert(tp: Any, value: Any, path: str, problems: list[str]) -> Any:
    """Convert `value` to type `tp`, appending a message to `problems` for each mismatch."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        return _convert_dataclass(tp, value, path, problems)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        trials: dict[Any, list[str]] = {}
        for arg in args:
            if arg is type(None):
                continue
            trials[arg] = []
            out = _convert(arg, value, path, trials[arg])
            if not trials[arg]:
                return out
        # a mapping meant as the union's one dataclass: its own problems say more, by key
        (mapping, *others) = [a for a in args if dataclasses.is_dataclass(a)] or [None]
        if isinstance(value, dict) and mapping is not None and not others:
            problems.extend(trials[mapping])
        else:
            problems.append(f"{path}: expected {_type_name(tp)}, got {shorten(value)}")
        return None
    if origin is Literal:
        if value not in typing.get_args(tp):
            problems.append(f"{path}: expected one of {_type_name(tp)}, got {shorten(value)}")
        return value
    if origin is list:
        if not isinstance(value, list):
            problems.append(f"{path}: expected {_type_name(tp)}, got {shorten(value)}")
            return []
        (item_tp,) = typing.get_args(tp)
        return [_convert(item_tp, v, f"{path}[{i}]", problems) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            problems.append(f"{path}: expected a mapping, got {shorten(value)}")
            return {}
        _, val_tp = typing.get_args(tp)
        return {str(k): _convert(val_tp, v, f"{path}.{k}", problems) for k, v in value.items()}
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            problems.append(f"{path}: expected a number, got {shorten(value)}")
            return 0.0
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            problems.append(f"{path}: expected an integer, got {shorten(value)}")
            return 0
        return value
    if tp is bool:
        if not isinstance(value, bool):
            problems.append(f"{path}: expected true/false, got {shorten(value)}")
        return bool(value)
    if tp is str:
        if not isinstance(value, str):
            problems.append(f"{path}: expected a string, got {shorten(value)}")
            return str(value)
        return value
    raise TypeError(f"unsupported schema type {tp!r} at {path}")  # a bug in the schema, not the recipe


def _convert_dataclass(cls: Any, value: Any, path: str, problems: list[str]) -> Any:
    if not isinstance(value, dict):
        problems.append(f"{path or 'recipe'}: expected a mapping, got {shorten(value)}")
        value = {}
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    prefix = f"{path}." if path else ""
    for key in value:
        if key not in fields:
            problems.append(
                f"{prefix}{key}: unknown key.{did_you_mean(str(key), list(fields))}"
                f" Valid keys: {', '.join(fields)}"
            )
    kwargs = {}
    for name, f in fields.items():
        raw = value.get(name, _MISSING)
        if raw is _MISSING:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                problems.append(f"{prefix}{name}: missing required value ({_type_name(hints[name])})")
            continue
        kwargs[name] = _convert(hints[name], raw, f"{prefix}{name}", problems)
    try:
        return cls(**kwargs)
    except TypeError:  # a required field was missing; already reported
        return None


# --------------------------------------------------------------------------------------------
# Loading, overrides and cross-field checks.
# --------------------------------------------------------------------------------------------


class _SafeLoader(yaml.SafeLoader):
    """`yaml.SafeLoader` that also reads `1e-3` (no dot) as a number, as YAML 1.2 does."""


_SafeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)
# What a malformed document can raise besides YAMLError (bad !!int/!!timestamp values, deep nesting).
_YAML_ERRORS = (yaml.YAMLError, ValueError, RecursionError)


class YamlTooLarge(ValueError):
    """A YAML document refused for its expanded size."""


# More values than any recipe has; anchors and aliases can make a tiny file expand beyond it (a
# "billion laughs" document), which would exhaust memory wherever the data is copied or printed.
MAX_YAML_VALUES = 100_000


def _safe_load(text: str) -> Any:
    data = yaml.load(text, Loader=_SafeLoader)  # a SafeLoader subclass: no code-running tags
    if _expanded_size(data, MAX_YAML_VALUES) > MAX_YAML_VALUES:
        raise YamlTooLarge(
            f"the document expands to more than {MAX_YAML_VALUES} values through its anchors and "
            "aliases (&name / *name); write the values out or use fewer nested aliases"
        )
    return data


def _expanded_size(data: Any, limit: int) -> int:
    """How many values `data` holds with every alias expanded, counting at most to `limit` + 1."""
    count, stack = 0, [data]
    while stack and count <= limit:
        node = stack.pop()
        count += 1
        if isinstance(node, dict):
            stack.extend(node.keys())
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return count


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping safely; syntax errors name the file and line."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RecipeError([f"file not found: {path}"], str(path)) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise RecipeError([f"cannot read {path}: {exc}"], str(path)) from None
    try:
        data = _safe_load(text)
    except YamlTooLarge as exc:
        raise RecipeError([str(exc)], str(path)) from None
    except _YAML_ERRORS as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(exc, "problem", None) or (str(exc).splitlines() or [type(exc).__name__])[0]
        raise RecipeError([f"malformed YAML at {where}{problem}"], str(path)) from None
    if not isinstance(data, dict):
        raise RecipeError([f"expected a YAML mapping at the top level, got {type(data).__name__}"], str(path))
    return data


def parse_override(text: str, flag: str = "--set") -> tuple[list[str], Any]:
    """Split 'a.b.c=value' into (['a', 'b', 'c'], value); the value is parsed as YAML. `flag` names
    the option the text came from in the error message."""
    key, sep, raw = text.partition("=")
    parts = key.strip().split(".")
    if not sep or not key.strip() or any(not p for p in parts):
        raise RecipeError([f"{flag} {text!r}: expected KEY=VALUE with a dotted key, e.g. train.lr=0.001"])
    try:
        value = _safe_load(raw) if raw.strip() else ""
    except _YAML_ERRORS:
        value = raw  # not valid YAML: keep the text as a string
    return parts, value


# Old names of distill keys, still read (in the top-level section and a stage's overrides);
# `Recipe.to_dict` writes the new ones.
DISTILL_ALIASES = {"stages": "pairs"}


def canonical_keys(data: Any, problems: list[str] | None = None) -> Any:
    """`data` (a raw recipe mapping) with every old key name renamed to its current one
    (`distill.stages` → `distill.pairs`), in place of the old key; the input is not modified.
    A mapping that holds both names is left as it is, or, with `problems`, reported there (and
    the old key dropped, so that it is not reported again as unknown)."""
    if not isinstance(data, dict):
        return data
    data = dict(data)
    if isinstance(data.get("distill"), dict):
        data["distill"] = _renamed(data["distill"], "distill", problems)
    if isinstance(data.get("pipeline"), list):
        data["pipeline"] = [
            {
                **stage,
                "distill": _renamed(stage["distill"], f"pipeline.{stage.get('name', i)}.distill", problems),
            }
            if isinstance(stage, dict) and isinstance(stage.get("distill"), dict)
            else stage
            for i, stage in enumerate(data["pipeline"])
        ]
    return data


def _renamed(section: dict[str, Any], where: str, problems: list[str] | None) -> dict[str, Any]:
    """A distill mapping with its old key names replaced by the current ones (same order)."""
    for old, new in DISTILL_ALIASES.items():
        if old in section and new in section:
            if problems is not None:
                problems.append(
                    f"{where}: both {new!r} and {old!r} (its old name) are given; keep only {where}.{new}"
                )
                section = {key: value for key, value in section.items() if key != old}
        elif old in section:
            section = {(new if key == old else key): value for key, value in section.items()}
    return section


def _canonical_path(parts: list[str]) -> list[str]:
    """An override's key path with an old distill key renamed (`distill.stages.0` → `distill.pairs.0`)."""
    at = 1 if parts[0] == "distill" else 3 if parts[0] == "pipeline" and parts[2:3] == ["distill"] else 0
    if at and len(parts) > at and parts[at] in DISTILL_ALIASES:
        return [*parts[:at], DISTILL_ALIASES[parts[at]], *parts[at + 1 :]]
    return parts


def diff_keys(a: object, b: object, path: str = "") -> list[str]:
    """The dotted key paths at which two recipe mappings differ (e.g. a saved and a resolved
    recipe); old key names count as their current ones (a run saved with `stages` has `pairs`)."""
    if not path:
        a, b = canonical_keys(a), canonical_keys(b)
    if isinstance(a, dict) and isinstance(b, dict):
        return [
            k
            for key in a.keys() | b.keys()
            for k in diff_keys(a.get(key), b.get(key), f"{path}.{key}" if path else str(key))
        ]
    return [] if a == b else [path or "(root)"]


def recipe_changes(saved: dict[str, Any], resolved: dict[str, Any]) -> list[str]:
    """The key paths at which a resolved recipe differs from one a run saved, with the saved one
    read as this version reads it: a key added since (at its default) is no change."""
    with contextlib.suppress(RecipeError):  # not readable any more: compared as written
        saved = parse_recipe(saved).to_dict()
    return sorted(diff_keys(saved, resolved))


def parse_options(texts: list[str], flag: str) -> dict[str, Any]:
    """`['a=1', 'b.c=x']` (repeated `flag KEY=VALUE` options) → `{'a': 1, 'b.c': 'x'}`, values as YAML."""
    options = {}
    for text in texts:
        parts, value = parse_override(text, flag)
        options[".".join(parts)] = value
    return options


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return a copy of `data` with each 'a.b=c' override applied.

    List items are addressed by index (`pipeline.0.train.epochs=2`) or, for lists of mappings
    with a `name`, by that name (`pipeline.teacher.train.epochs=2`). Old key names, in the data
    and in the overrides, are read as their current ones (`distill.stages` is `distill.pairs`).
    Adapter options stay with their adapter: an override that changes a distill section's adapter
    without setting its `adapter_options` drops the old adapter's options, with a note
    (`_keep_options_with_their_adapter`).
    """
    data = copy.deepcopy(canonical_keys(data))
    before = _adapter_settings(data)
    changed = [_set_value(data, text) for text in overrides]
    _keep_options_with_their_adapter(data, before, changed)
    return data


def _set_value(data: dict[str, Any], text: str) -> tuple[str | int, ...]:
    """Apply one 'a.b=c' override to `data` in place; return the key path it set, list items as
    their index."""
    parts, value = parse_override(text)
    parts = _canonical_path(parts)
    node: Any = data
    path: list[str | int] = []
    for depth, part in enumerate(parts):
        last = depth == len(parts) - 1
        where = ".".join(parts[: depth + 1])
        if isinstance(node, list):
            index = _list_index(node, part, where, text) % len(node)
            path.append(index)
            if last:
                node[index] = value
            else:
                node = node[index]
        elif isinstance(node, dict):
            path.append(part)
            if last:
                node[part] = value
            else:
                if node.get(part) is None:
                    node[part] = {}
                node = node[part]
        else:
            raise RecipeError([f"--set {text!r}: {'.'.join(parts[:depth])} is {node!r}, not a mapping"])
    return tuple(path)


Section = tuple[str | int, ...]  # the key path of a distill section: ('distill',), ('pipeline', i, 'distill')


def _distill_sections(data: dict[str, Any]) -> dict[Section, dict[str, Any]]:
    """The top-level distill section and each stage's own, by key path (a missing top one as {})."""
    top = data.get("distill")
    sections: dict[Section, dict[str, Any]] = {("distill",): top if isinstance(top, dict) else {}}
    for i, stage in enumerate(_stages(data)):
        if isinstance(stage, dict) and isinstance(stage.get("distill"), dict):
            sections[("pipeline", i, "distill")] = stage["distill"]
    return sections


def _stages(data: dict[str, Any]) -> list[Any]:
    stages = data.get("pipeline")
    return stages if isinstance(stages, list) else []


def _adapter_settings(data: dict[str, Any]) -> dict[Section, tuple[Any, dict[str, Any], bool]]:
    """Per distill section, every stage's included (one it has not got inherits everything): the
    adapter and adapter options it uses (its own, else the top-level section's), and whether the
    options are its own."""
    sections = _distill_sections(data)
    top = sections[("distill",)]
    inherited = (top.get("adapter", DistillSpec.adapter), top.get("adapter_options") or {})
    settings = {}
    for path in [("distill",), *(("pipeline", i, "distill") for i in range(len(_stages(data))))]:
        own = sections.get(path, {})
        options = (own["adapter_options"] or {}) if "adapter_options" in own else inherited[1]
        settings[path] = (own.get("adapter", inherited[0]), options, "adapter_options" in own)
    return settings


def _keep_options_with_their_adapter(
    data: dict[str, Any], before: dict[Section, tuple[Any, dict[str, Any], bool]], changed: list[Section]
) -> None:
    """Where the overrides (`changed`: the key paths they set) changed a section's adapter, drop the
    old adapter's options that they did not set themselves, with a note: the new adapter would
    refuse them, or read them as something else. A stage that keeps its adapter keeps the options
    it had from the top-level section."""
    for path in _distill_sections(data):  # the top-level section first: stages inherit from it
        adapter, options, own = _adapter_settings(data)[path]
        old_adapter, old_options, _ = before.get(path, (adapter, options, own))
        keys = [(*path, "adapter_options")] + ([] if own else [("distill", "adapter_options")])
        if any(c == key[: len(c)] for key in keys for c in changed):
            continue  # the overrides gave these options (or everything around them) themselves
        given = {c[len(key)] for key in keys for c in changed if c[: len(key)] == key and len(c) > len(key)}
        dropped = {k: v for k, v in options.items() if k not in given}
        section = _distill_sections(data)[path]
        if adapter != old_adapter and dropped:
            section["adapter_options"] = {k: v for k, v in options.items() if k in given}
            where = _section_name(data, path)
            _note_once(
                f"note: {where}.adapter is now {adapter!r} (was {old_adapter!r}): dropped "
                f"{where}.adapter_options {dropped}, options of {old_adapter!r}; set "
                f"{where}.adapter_options to give the new adapter options"
            )
        elif adapter == old_adapter and options != old_options and not own:
            section["adapter_options"] = copy.deepcopy(old_options)


def _section_name(data: dict[str, Any], path: Section) -> str:
    """A distill section's key as a recipe names it: `distill` or `pipeline.<stage>.distill`."""
    if path == ("distill",):
        return "distill"
    stage = data["pipeline"][path[1]]
    return f"pipeline.{stage.get('name', path[1])}.distill"


@functools.cache
def _note_once(text: str) -> None:
    """Print a note on stderr, once per process (an ablation applies a variant's overrides per seed).
    Plain `print`: kdkit.utils.runlog's console imports this module, and no progress bar runs yet."""
    print(text, file=sys.stderr)


def _list_index(node: list[Any], part: str, where: str, text: str) -> int:
    if re.fullmatch(r"-?[0-9]+", part):
        index = int(part)
        if -len(node) <= index < len(node):
            return index
        raise RecipeError([f"--set {text!r}: {where}: index out of range (the list has {len(node)} items)"])
    names = [item.get("name") if isinstance(item, dict) else None for item in node]  # aligned with node
    if part in names:
        return names.index(part)
    hint = did_you_mean(part, [n for n in names if isinstance(n, str)])
    raise RecipeError([f"--set {text!r}: {where}: no list item named {part!r}.{hint}"])


def parse_recipe(data: dict[str, Any], source: str = "recipe") -> Recipe:
    """Validate a recipe mapping into a `Recipe`, or raise `RecipeError` listing every problem."""
    problems: list[str] = []
    recipe = _convert_dataclass(Recipe, canonical_keys(data, problems), "", problems)
    if recipe is not None and not problems:
        plan = _check_semantics(recipe, problems)
        if not problems:
            recipe.plan = plan  # the specs just checked are the ones every consumer reads
    if problems:
        raise RecipeError(problems, source)
    return recipe


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read, override and validate a recipe file."""
    data = apply_overrides(read_yaml(path), overrides or [])
    return parse_recipe(data, str(path))


def _check_semantics(recipe: Recipe, problems: list[str]) -> Plan:
    """Cross-field checks that the types alone cannot express; returns the plan they checked."""
    names = [s.name for s in recipe.pipeline]
    for key, name in [("name", recipe.name), *((f"pipeline[{i}].name", n) for i, n in enumerate(names))]:
        problem = file_name_problem(name)
        if problem:
            problems.append(f"{key}: {name!r} {problem}")
    if not recipe.pipeline:
        problems.append("pipeline: expected at least one stage")
    for dup in sorted({n for n in names if names.count(n) > 1}):
        problems.append(f"pipeline: stage name {dup!r} is used more than once")
    _check_data(recipe.data, "data", problems)
    _check_train(recipe.train, "train", problems)
    return _build_plan(recipe, problems)


def _build_plan(recipe: Recipe, problems: list[str]) -> Plan:
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
    train = _convert(TrainSpec, {**dataclasses.asdict(recipe.train), **stage.train}, f"{where}.train", found)
    distill = _convert(
        DistillSpec, {**dataclasses.asdict(recipe.distill), **stage.distill}, f"{where}.distill", found
    )
    data = _convert(DataSpec, {**dataclasses.asdict(recipe.data), **stage.data}, f"{where}.data", found)
    if stage.data and stage.do == "evaluate":
        found.append(f"{where}.data: an evaluate stage reads the top-level data; remove it")
    if stage.baseline is not None and stage.do != "evaluate":
        found.append(f"{where}.baseline: only an evaluate stage compares with a baseline")
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
        _check_distill(distill, f"{where}.distill", recipe, trained, problems)
        trainer = next((s for s in earlier if s.name == distill.teacher and s.do != "evaluate"), None)
        return StagePlan(
            stage,
            seed,
            train,
            data,
            distill,
            pairs=_parsed_pairs(distill, f"{where}.distill", problems),
            model=distill.student,
            teacher=trainer.model if trainer else distill.teacher,
            teacher_stage=trainer.name if trainer else None,
        )
    _check_evaluate(stage, where, trained, problems)
    return StagePlan(stage, seed, train, data)


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
    spec = _convert_dataclass(PairSpec, entry, where, found)
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
