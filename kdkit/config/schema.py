"""The recipe schema: typed dataclasses for every section, and the conversion of a YAML mapping
into them that collects every problem with its key path (``train.lr: expected a number, got 'fast'``,
``distil: unknown key. Did you mean 'distill'?``). Field comments are the reference."""

from __future__ import annotations

import dataclasses
import functools
import reprlib
import types
import typing
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from kdkit.registry import did_you_mean

if TYPE_CHECKING:
    from kdkit.config.plan import Plan

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
class TeacherSpec:
    """One teacher of `distill.teachers`: a model key or an earlier stage, its weight in the
    combination, and the distill settings it sets for itself (unset: the distill section's)."""

    teacher: str  # a key of `models`, or the name of an earlier stage that trained it
    weight: float = 1.0  # its share of the logit and feature terms (normalised over the teachers)
    pairs: list[Any] | str | None = None
    adapter: str | None = None
    adapter_options: dict[str, Any] | None = None
    criterion: str | None = None
    criterion_options: dict[str, Any] | None = None
    groups: list[GroupSpec] | None = None
    teacher_input: Literal["auto"] | TeacherInputSpec | None = None
    teacher_dtype: Literal["float32", "bfloat16", "float16"] | None = None
    cache: bool | None = None


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
    # several teachers (`TeacherSpec`), instead of `teacher`; their logits combine by the rule
    # `teacher_combine` of `kdkit.registry.TEACHER_COMBINERS`, their feature terms by weight
    teachers: list[TeacherSpec] = field(default_factory=list)
    teacher_combine: str = "ensemble"


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
    # Run-wide (the top-level train section only; no stage result depends on them, see TRACKING_KEYS):
    # experiment trackers beside metrics.jsonl, which is always written: jsonl, tensorboard, mlflow,
    # wandb; null = tensorboard when it is installed (kdkit 0.2's behaviour). See docs/tracking.md
    loggers: list[str] | None = None
    tracking_uri: str | None = None  # MLflow's; null = $MLFLOW_TRACKING_URI, else MLflow's default
    experiment: str | None = None  # MLflow experiment and W&B project; null = the recipe's name


# The `train` keys that choose where a run is logged: set once per run (not per stage), and no
# stage's result depends on them, so they are no stage input (cache keys, `--resume`).
TRACKING_KEYS = ("loggers", "tracking_uri", "experiment")


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
class LauncherSpec:
    """Where `kdkit run` and `kdkit ablate` run the work: here, or as SLURM jobs through submitit
    (docs/scaling.md, "A SLURM cluster"). The command line's `--launcher`, `--partition`, ... override
    it. It says how the work runs, not what: it is in no cache key and changes no result."""

    kind: Literal["local", "slurm"] = "local"
    partition: str | None = None  # null: the cluster's default partition
    time: int = 60  # minutes per job; a job that runs out of it is requeued and resumes
    nodes: int = 1  # nodes per run (a DDP run over nodes × gpus_per_node processes)
    gpus_per_node: int = 0  # GPUs per node, one process each (0: one CPU process)
    cpus_per_task: int = 1  # CPU cores per process (its torch threads)
    mem: str | None = None  # memory per node as sbatch writes it, e.g. 32G; null: the cluster's default
    folder: str = "slurm"  # submitit's job files and logs (relative: inside the run or ablation folder)
    sbatch: dict[str, Any] = field(default_factory=dict)  # more sbatch options: {account: lab, ...}


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
    launcher: LauncherSpec = field(default_factory=LauncherSpec)

    @functools.cached_property
    def plan(self) -> Plan:
        """Every stage resolved once (`kdkit.config.plan`); `parse_recipe` builds it while checking,
        this builds it for a recipe made otherwise (e.g. `dataclasses.replace`)."""
        from kdkit.config.validation import build_plan  # validation reads this schema: import on use

        problems: list[str] = []
        plan = build_plan(self, problems)
        if problems:
            raise RecipeError(problems)
        return plan

    def to_dict(self) -> dict[str, Any]:
        """A plain dict (YAML/JSON-serialisable) of the resolved recipe, which parses back to it."""
        data = dataclasses.asdict(self)
        if data["distill"]["teachers"]:  # one form only: `teacher` is then the unused default
            del data["distill"]["teacher"]
        return data


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


def convert(tp: Any, value: Any, path: str, problems: list[str]) -> Any:
    """Convert `value` to type `tp`, appending a message to `problems` for each mismatch."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        return convert_dataclass(tp, value, path, problems)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        trials: dict[Any, list[str]] = {}
        for arg in args:
            if arg is type(None):
                continue
            trials[arg] = []
            out = convert(arg, value, path, trials[arg])
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
        return [convert(item_tp, v, f"{path}[{i}]", problems) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            problems.append(f"{path}: expected a mapping, got {shorten(value)}")
            return {}
        _, val_tp = typing.get_args(tp)
        return {str(k): convert(val_tp, v, f"{path}.{k}", problems) for k, v in value.items()}
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


def convert_dataclass(cls: Any, value: Any, path: str, problems: list[str]) -> Any:
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
        kwargs[name] = convert(hints[name], raw, f"{prefix}{name}", problems)
    try:
        return cls(**kwargs)
    except TypeError:  # a required field was missing; already reported
        return None


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


def canonical_path(parts: list[str]) -> list[str]:
    """An override's key path with an old distill key renamed (`distill.stages.0` → `distill.pairs.0`)."""
    at = 1 if parts[0] == "distill" else 3 if parts[0] == "pipeline" and parts[2:3] == ["distill"] else 0
    if at and len(parts) > at and parts[at] in DISTILL_ALIASES:
        return [*parts[:at], DISTILL_ALIASES[parts[at]], *parts[at + 1 :]]
    return parts
