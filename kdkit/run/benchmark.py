"""The benchmark harness behind `kdkit bench`: what distillation costs next to training the student
alone.

In one process it times, on the same synthetic batches of the recipe's shape (random weights, so
no data root or weight files are needed):

    (a) student     the student trained alone (cross-entropy), through kdkit's Trainer
    (b) distill     the recipe's distill stage with the live teacher, through kdkit's Trainer
    (c) cached      the same with every teacher output read from the teacher-output cache
    (d) reference   benchmarks/reference_loop.py: (b)'s computation by hand, no kdkit code
    (e) compiled    (b) with `train.compile` (torch.compile of student and teacher)

and reports images/s, step time and peak memory of each (`kdkit.utils.memory.PeakMemory`), and the
step-time ratios (b)/(d) (kdkit's overhead), (c)/(a) and (b)/(a) (what distillation costs) and
(b)/(e) (what compiling saves; compilation happens in the untimed warm-up). Warm-up steps are
excluded; every mode is timed `repeats` times, interleaved (so drift on a shared machine hits all
modes alike), and the median is reported. Progress goes to stderr: each mode's warm-up, then the
timed rounds naming the mode being measured. When the recipe's data is available, one more
measurement runs (b) on the real training loader and reports the time spent waiting for it, and the
images/s one loader worker makes (`kdkit.data.throughput`), from a frame store and from the files
when a store serves the data.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import itertools
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from kdkit.config.plan import StagePlan
from kdkit.config.schema import DistillSpec, Recipe, RecipeError, StageSpec, TrainSpec
from kdkit.data.augment import device_images
from kdkit.data.datasets import DataError, build_loaders
from kdkit.data.throughput import innermost, loader_throughput
from kdkit.distill.distiller import Distiller
from kdkit.distill.several_teachers import SeveralTeachers
from kdkit.distill.teacher_cache import TeacherCache
from kdkit.models.info import forward_gflops
from kdkit.run.build import build_distiller, dry_run_size, model_from_recipe
from kdkit.training.task import SupervisedTask
from kdkit.training.trainer import Trainer
from kdkit.utils.device import autocast, resolve_device
from kdkit.utils.memory import PeakMemory
from kdkit.utils.runlog import progress

MODES = {
    "student": "(a) student alone",
    "distill": "(b) distill, live teacher",
    "cached": "(c) distill, teacher cache",
    "reference": "(d) hand-written loop of (b)",
    "compiled": "(e) (b) with train.compile",
}
REFERENCE = Path(__file__).resolve().parents[2] / "benchmarks" / "reference_loop.py"
POOL = 4  # distinct synthetic batches, cycled
# runs n steps of one mode; the optional callable is a progress display's `advance`
Runner = Callable[..., None]
# Dense bf16/fp16 tensor-core peak TFLOP/s from NVIDIA's data sheets, by device-name fragment
# (most specific first): the denominator of model FLOPs utilisation under amp. Others: --peak-tflops.
PEAK_TFLOPS_16BIT = (
    ("H200", 989.4),
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.4),
    ("A100", 312.0),
)


@dataclass(frozen=True)
class BenchSetup:
    """What every mode of one benchmark shares: the recipe (with random weights), its distill stage
    and that stage's training settings, the device, the batch size and the synthetic batches."""

    recipe: Recipe
    stage: StageSpec
    train: TrainSpec
    distill: DistillSpec
    device: torch.device
    size: int  # images per batch
    pool: list[tuple[torch.Tensor, ...]]  # `POOL` batches of (images, labels, sample keys)
    example: torch.Tensor  # a few images on the CPU, for the dry run that sizes a distiller

    def distiller(self) -> Distiller | SeveralTeachers:
        """A new distiller of the stage."""
        return build_distiller(self.recipe, self.stage, example=self.example)


def bench_setup(recipe: Recipe, stage: str | None = None, batch: int | None = None) -> BenchSetup:
    """The setup of a benchmark of `recipe`'s distill stage `stage` (default: the first) at `batch`
    images per step (default: the stage's own batch size)."""
    stage_spec = _distill_stage(recipe, stage)
    plan = recipe.plan.of(stage_spec)
    # Random weights: the cost does not depend on them, and the bench needs no weight files.
    models = {k: dataclasses.replace(s, weights=None, pretrained=False) for k, s in recipe.models.items()}
    recipe = dataclasses.replace(recipe, models=models)
    device = resolve_device(plan.train.device)
    size = batch or plan.data.batch_size  # the stage's own data: the shape it trains at
    pool = _synthetic_batches(recipe, plan, size, device)
    example = pool[0][0][: dry_run_size(plan)].cpu()
    return BenchSetup(recipe, stage_spec, plan.train, plan.distill_spec(), device, size, pool, example)


# ------------------------------------------------------------------------------------ measuring
def run_bench(
    recipe: Recipe,
    stage: str | None = None,
    steps: int = 10,
    batch: int | None = None,
    warmup: int = 3,
    repeats: int = 5,
    loader: bool = True,
    peak_tflops: float | None = None,
    modes: list[str] | None = None,
) -> dict[str, Any]:
    """Measure `modes` (default: all of `MODES`); return the report (see the module docstring)."""
    modes = list(MODES) if modes is None else modes
    setup = bench_setup(recipe, stage, batch)
    gflops = _forward_gflops(setup.distiller(), setup.example)
    peak = peak_tflops or _known_peak(setup.device, setup.train.amp)
    with tempfile.TemporaryDirectory(prefix="kdkit-bench-") as tmp:
        cache = TeacherCache(Path(tmp), {"bench": True}, len(setup.pool) * setup.size, max_bytes=1 << 62)
        builders = _builders(setup, cache, steps, modes)
        runners, memory, unavailable = _warm_up_modes(builders, setup.device, warmup)
        if "distill" in runners:  # each teacher's share of (b)'s step
            runners.update(_teacher_forwards(setup, warmup))
        cache.hits = cache.misses = 0  # count the timed steps only
        seconds = _timed_rounds(runners, steps, repeats, setup.device)
        cache_hits = cache.hits / max(cache.hits + cache.misses, 1)
        loader_report = _loader_wait(setup, steps) if loader else None
    rows = _rows(modes, seconds, memory, unavailable, setup.size, steps, _step_gflops(gflops), peak)
    if "img_per_s" in rows.get("cached", {}):
        rows["cached"]["cache_hit_rate"] = cache_hits
    return {
        "stage": setup.stage.name,
        "batch": setup.size,
        "input": list(setup.pool[0][0].shape[1:]),
        "steps": steps,
        "warmup": warmup,
        "repeats": repeats,
        "amp": setup.train.amp,
        "compile": setup.train.compile,
        "teacher_dtype": setup.distill.teacher_dtype,
        "machine": machine(setup.device),
        "modes": rows,
        "ratios": _ratios(seconds),
        "teachers": _teacher_rows(setup, seconds, steps, gflops["teachers"]),
        "memory_kind": "cuda_max_allocated" if setup.device.type == "cuda" else "rss_increase",
        "forward_gflops_per_image": gflops,
        "peak_tflops": peak,
        "loader": loader_report,
    }


def _step_gflops(gflops: dict[str, Any]) -> dict[str, float]:
    """Model GFLOPs per image of a training step of each mode: the student's forward and backward
    (about 3 forwards), plus the teacher's forward where it runs. Adapters and losses are negligible."""
    student, teacher = 3 * gflops["student"], gflops["teacher"]
    live = student + teacher
    return {"student": student, "distill": live, "cached": student, "reference": live, "compiled": live}


def _builders(
    setup: BenchSetup, cache: TeacherCache, steps: int, modes: list[str]
) -> dict[str, Callable[[], Runner]]:
    """For each of `modes`, a function that builds its models and returns its `Runner`."""
    train, pool = setup.train, setup.pool
    compile_train = dataclasses.replace(train, compile=True)
    n_teachers = len(setup.recipe.plan.of(setup.stage).teachers)

    def one_teacher(build: Callable[[], Runner]) -> Callable[[], Runner]:
        """(c) and (d) time one teacher's cache and hand-written loop: unavailable with several."""
        if n_teachers == 1:
            return build

        def refuse() -> Runner:
            raise ValueError(f"times one teacher; this stage has {n_teachers} (see the teachers' shares)")

        return refuse

    def student() -> Runner:
        model = model_from_recipe(setup.recipe, setup.distill.student, "bench.student")
        return _trainer_steps(SupervisedTask(model, train.label_smoothing), train, pool, steps)

    builders: dict[str, Callable[[], Runner]] = {
        "student": student,
        "distill": lambda: _trainer_steps(setup.distiller(), train, pool, steps),
        "cached": one_teacher(
            lambda: _trainer_steps(
                _filled(setup.distiller(), cache, pool, train), train, pool, steps, keys=True
            )
        ),
        "reference": one_teacher(
            lambda: _reference_steps(
                setup.distiller(), setup.distill, train, pool, steps, setup.example.to(setup.device)
            )
        ),
        "compiled": lambda: _trainer_steps(setup.distiller(), compile_train, pool, steps),
    }
    return {mode: build for mode, build in builders.items() if mode in modes}


def _warm_up_modes(
    builders: dict[str, Callable[[], Runner]], device: torch.device, warmup: int
) -> tuple[dict[str, Runner], dict[str, float | None], dict[str, str]]:
    """Build and warm up each mode, one after the other (so that each one's peak memory is its own):
    its runner, its peak memory, and why a mode that cannot run is unavailable."""
    runners: dict[str, Runner] = {}
    memory: dict[str, float | None] = {}
    unavailable: dict[str, str] = {}
    for mode, build in builders.items():
        try:
            probe = PeakMemory(device)  # baseline before the mode's models exist
            runners[mode] = build()
            probe.start()
            _warm_up(mode, runners[mode], max(warmup, 1))
            memory[mode] = probe.peak()
        except (ValueError, FileNotFoundError) as exc:
            unavailable[mode] = str(exc)
        except Exception as exc:  # torch.compile's failures (no C++ compiler, say) have many types
            if mode != "compiled":
                raise
            unavailable[mode] = f"torch.compile failed: {type(exc).__name__}: {exc}"[:300]
    return runners, memory, unavailable


def _timed_rounds(
    runners: dict[str, Runner], steps: int, repeats: int, device: torch.device
) -> dict[str, list[float]]:
    """Seconds of `steps` steps of each mode, `repeats` times.

    Each round runs every mode once, the compared pairs (b, d) and (c, a) side by side; the order
    rotates and reverses from round to round, so no mode always follows the same one."""
    seconds: dict[str, list[float]] = {mode: [] for mode in runners}
    order = [m for m in ("student", "cached", "distill", "reference", "compiled") if m in runners]
    order += sorted(set(runners) - set(order))  # the teachers' forwards
    rounds = f"bench: {repeats} timed rounds of {len(order)} measurements × {steps} steps"
    with progress(repeats * len(order), rounds, unit="measurements") as advance:
        for r in range(repeats):
            rotated = order[r % len(order) :] + order[: r % len(order)]
            for mode in rotated if r % 2 == 0 else rotated[::-1]:
                advance(0, info=MODES.get(mode, f"{mode} forward"))
                start = time.perf_counter()
                runners[mode](steps)  # no per-step display inside the timed window
                _synchronize(device)
                seconds[mode].append(time.perf_counter() - start)
                advance()
    return seconds


def _rows(
    modes: list[str],
    seconds: dict[str, list[float]],
    memory: dict[str, float | None],
    unavailable: dict[str, str],
    images_per_step: int,
    steps: int,
    step_gflops: dict[str, float],
    peak_tflops: float | None,
) -> dict[str, dict[str, Any]]:
    """The report's row of each mode: speed (median of the repeats), peak memory, FLOP/s and model
    FLOPs utilisation; or why it is unavailable."""
    rows: dict[str, dict[str, Any]] = {}
    for mode, label in MODES.items():
        if mode not in modes:
            continue
        if mode not in seconds:
            rows[mode] = {"label": label, "unavailable": unavailable.get(mode, "not run")}
            continue
        times = sorted(t / steps for t in seconds[mode])
        median = statistics.median(times)
        rows[mode] = {
            "label": label,
            "img_per_s": images_per_step / median,
            "step_ms": 1000 * median,
            "step_ms_min": 1000 * times[0],
            "step_ms_max": 1000 * times[-1],
            "peak_mem_mib": memory.get(mode),
            "tflops_per_s": step_gflops[mode] * images_per_step / median / 1000,
        }
        if peak_tflops:
            rows[mode]["mfu"] = rows[mode]["tflops_per_s"] / peak_tflops
    return rows


def _ratio(seconds: dict[str, list[float]], a: str, b: str) -> float | None:
    """Median over the repeats of a/b measured in the same round (moments apart): robust to load
    that drifts during the run; None when either was not measured."""
    if a not in seconds or b not in seconds:
        return None
    return statistics.median(x / y for x, y in zip(seconds[a], seconds[b], strict=True))


def _ratios(seconds: dict[str, list[float]]) -> dict[str, float | None]:
    """The step-time ratios (b)/(d), (c)/(a), (b)/(a) and (b)/(e)."""
    pairs = {
        "b/d": ("distill", "reference"),
        "c/a": ("cached", "student"),
        "b/a": ("distill", "student"),
        "b/e": ("distill", "compiled"),
    }
    return {name: _ratio(seconds, a, b) for name, (a, b) in pairs.items()}


def _teacher_forwards(setup: BenchSetup, warmup: int) -> dict[str, Runner]:
    """A runner per teacher (`teacher.t<k>`): n forwards of that teacher alone as (b) runs it (its
    input conversion, dtype, taps, under inference mode and the stage's amp), warmed up."""
    distiller = setup.distiller()

    def forwards(branch: Distiller) -> Runner:
        def run(n: int, advance: Callable[..., None] | None = None) -> None:
            with autocast(setup.device, setup.train.amp):
                for i in range(n):
                    branch.teacher_outputs(setup.pool[i % len(setup.pool)][0])
                    if advance is not None:
                        advance()

        return run

    runners = {f"teacher.t{k}": forwards(branch) for k, branch in enumerate(_branches(distiller))}
    for runner in runners.values():
        runner(max(warmup, 1))
    return runners


def _teacher_rows(
    setup: BenchSetup, seconds: dict[str, list[float]], steps: int, gflops: list[float]
) -> list[dict[str, Any]]:
    """Each teacher's forward time per step and its share of (b)'s step (median of the rounds'
    ratios), with its model, the stage that trains it and its forward GFLOPs per image."""
    rows = []
    for k, teacher in enumerate(setup.recipe.plan.of(setup.stage).teachers):
        mode = f"teacher.t{k}"
        row: dict[str, Any] = {"model": teacher.model, "stage": teacher.stage, "weight": teacher.weight}
        row["forward_gflops_per_image"] = gflops[k]
        if mode in seconds:
            row["forward_ms"] = 1000 * statistics.median(seconds[mode]) / steps
            row["share_of_distill_step"] = _ratio(seconds, mode, "distill")
        rows.append(row)
    return rows


def _branches(distiller: Distiller | SeveralTeachers) -> list[Distiller]:
    """The one-teacher distillers of `distiller`: itself, or one per teacher."""
    return list(distiller.branches) if isinstance(distiller, SeveralTeachers) else [distiller]


def _warm_up(mode: str, runner: Runner, steps: int) -> None:
    """The untimed first steps of `mode` (torch.compile compiles here), shown as progress."""
    note = " (compiling: can take minutes)" if mode == "compiled" else ""
    with progress(steps, f"bench {MODES[mode]}: warm-up{note}") as advance:
        runner(steps, advance)


def _forward_gflops(distiller: Distiller | SeveralTeachers, example: torch.Tensor) -> dict[str, Any]:
    """Forward GFLOPs per image of the distiller's student, of each teacher (`teachers`) and of all
    teachers together (`teacher`), by PyTorch's FLOP counter."""
    teachers = []
    for branch in _branches(distiller):
        dtype = next(branch.teacher.parameters()).dtype  # a half-precision teacher takes half inputs
        images = example if branch.teacher_input is None else branch.teacher_input(example)
        teachers.append(forward_gflops(branch.teacher, images.to(dtype)))
    flops = {"student": forward_gflops(distiller.student, example), "teacher": sum(teachers)}
    distiller.close()
    return {**flops, "teachers": teachers}


def _known_peak(device: torch.device, amp: str) -> float | None:
    """The device's dense 16-bit peak TFLOP/s when it is in `PEAK_TFLOPS_16BIT` and amp is 16-bit."""
    if device.type != "cuda" or amp not in ("bf16", "fp16"):
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for fragment, peak in PEAK_TFLOPS_16BIT if fragment in name), None)


def _distill_stage(recipe: Recipe, name: str | None) -> StageSpec:
    stages = [s for s in recipe.pipeline if s.do == "distill" and (name is None or s.name == name)]
    if not stages:
        which = f"a distill stage named {name!r}" if name else "a distill stage"
        raise RecipeError([f"pipeline: kdkit bench needs {which}"])
    return stages[0]


def _synthetic_batches(
    recipe: Recipe, stage: StagePlan, size: int, device: torch.device
) -> list[tuple[torch.Tensor, ...]]:
    """`POOL` batches of random images and labels of the stage's data shape, with distinct sample keys."""
    channels, side = len(stage.data.mean), stage.data.image_size
    student = model_from_recipe(recipe, stage.distill_spec().student, "bench.student")
    with torch.no_grad():
        classes = student.eval()(torch.zeros(1, channels, side, side)).shape[-1]
    generator = torch.Generator().manual_seed(0)
    pool = []
    for b in range(POOL):
        images = torch.randn(size, channels, side, side, generator=generator).to(device)
        labels = torch.randint(0, classes, (size,), generator=generator).to(device)
        keys = torch.stack([torch.arange(b * size, (b + 1) * size), torch.zeros(size, dtype=torch.long)], 1)
        pool.append((images, labels, keys))
    return pool


def _trainer_steps(
    task: torch.nn.Module,
    train: TrainSpec,
    pool: list[tuple[torch.Tensor, ...]],
    steps: int,
    keys: bool = False,
) -> Runner:
    """A function that runs n steps of kdkit's own training loop (`Trainer.train_steps`)."""
    batches = [batch if keys else batch[:2] for batch in pool]
    epoch = [batches[i % len(batches)] for i in range(steps)]  # an epoch of `steps`: sizes the LR schedule
    trainer = Trainer(task, train, epoch, stage="bench")

    def run(n: int, advance: Callable[..., None] | None = None) -> None:
        trainer.train_steps(itertools.islice(itertools.cycle(batches), n), n, advance=advance)

    return run


def _filled(
    distiller: Distiller, cache: TeacherCache, pool: list[tuple[torch.Tensor, ...]], train: TrainSpec
) -> Distiller:
    """`distiller` with `cache` holding its teacher's outputs (as training computes them) for `pool`."""
    distiller.cache = cache
    with torch.no_grad(), autocast(resolve_device(train.device), train.amp):
        for images, _, keys in pool:
            distiller.teacher_outputs(images, keys)
    return distiller


def load_reference() -> Any:
    """The `benchmarks/reference_loop.py` module (it ships with the source tree only)."""
    if not REFERENCE.is_file():
        raise FileNotFoundError(f"{REFERENCE} is missing (it ships with kdkit's source tree)")
    spec = importlib.util.spec_from_file_location("kdkit_reference_loop", REFERENCE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def reference_for(
    distiller: Distiller, d: Any, train: TrainSpec, steps_per_epoch: int, example: torch.Tensor
) -> Any:
    """A `ReferenceLoop` doing what `distiller` and a Trainer with `train` do (the distiller's hooks
    are removed first: the loop hooks its models itself)."""
    if train.optimizer != "adamw" or any(
        p.teacher.io != "output" or p.student.io != "output" for p in distiller.pairs
    ):
        raise ValueError("the reference loop implements AdamW and block-output taps only")
    if any(p.teacher.select != p.student.select for p in distiller.pairs):
        raise ValueError("the reference loop needs one selector per layer pair")
    settings = {(p.adapter, p.criterion, p.weight, repr(p.adapter_options)) for p in distiller.pairs}
    if len(settings) > 1 or any(p.weight != 1 for p in distiller.pairs):
        raise ValueError("the reference loop needs one adapter, criterion and weight 1 for every pair")
    distiller.close()
    schedule = None
    if train.scheduler == "cosine":
        total = train.epochs * steps_per_epoch
        schedule = (train.warmup_epochs * steps_per_epoch, total, train.warmup_lr, train.min_lr)
    elif train.scheduler != "none":
        raise ValueError(f"the reference loop implements the cosine schedule only, not {train.scheduler!r}")
    device = resolve_device(train.device)
    return load_reference().ReferenceLoop(
        distiller.teacher.to(device),
        distiller.student.to(device),
        taps=[(p.student.path, p.teacher.path, p.student.select) for p in distiller.pairs],
        adapter=distiller.pairs[0].adapter if distiller.pairs else "identity",
        adapter_options=_adapter_options(distiller),
        criterion=distiller.pairs[0].criterion if distiller.pairs else d.criterion,
        alpha=distiller.alpha,
        tau=distiller.tau,
        beta=distiller.beta,
        label_smoothing=distiller.label_smoothing,
        lr=train.lr,
        weight_decay=train.weight_decay,
        clip_grad=train.clip_grad,
        amp=train.amp,
        teacher_dtype=distiller.teacher_dtype,
        schedule=schedule,
        example=example,
    )


def _adapter_options(distiller: Distiller) -> dict[str, Any]:
    """The options the distiller's adapters were built with (kdkit's defaults included)."""
    if not distiller.adapters:
        return {}
    adapter = distiller.adapters[0]
    names = ("eps", "detach_covariance", "p")
    options = {name: getattr(adapter, name) for name in names if hasattr(adapter, name)}
    if hasattr(adapter, "proj"):
        options["bias"] = adapter.proj.bias is not None
    return options


def _reference_steps(
    distiller: Distiller,
    d: Any,
    train: TrainSpec,
    pool: list[tuple[torch.Tensor, ...]],
    steps: int,
    example: torch.Tensor,
) -> Runner:
    loop = reference_for(distiller, d, train, steps, example)
    loop.student.train()

    def run(n: int, advance: Callable[..., None] | None = None) -> None:
        for i in range(n):
            images, labels, _ = pool[i % len(pool)]
            loop.step(images, labels)
            if advance is not None:
                advance()

    return run


def _loader_wait(setup: BenchSetup, steps: int) -> dict[str, Any]:
    """(b) on the recipe's real training loader: how long each step waits for its batch."""
    plan = setup.recipe.plan.of(setup.stage)
    data = dataclasses.replace(plan.data, batch_size=setup.size)
    try:
        loader, _, set_epoch = build_loaders(data, plan.seed, eval_splits=())
        images = device_images(next(iter(loader))[0], torch.device("cpu"))
        example = images[: dry_run_size(plan)]
    except (DataError, OSError, ValueError) as exc:
        return {"skipped": f"the recipe's data is not available ({exc})"}
    task = build_distiller(setup.recipe, setup.stage, example=example)
    trainer = Trainer(task, setup.train, loader, stage="bench")
    steps = min(steps, len(loader))
    with progress(2 * steps, "bench: (b) on the recipe's training loader") as advance:
        trainer.train_steps(loader, steps, advance=advance)  # starts the workers (persistent ones stay)
        set_epoch(1, 0)  # the timed pass: the next epoch's order and augmentation, as in training
        timing = trainer.train_steps(loader, steps, advance=advance)  # as in training: a display
    task.close()
    return {
        "num_workers": data.num_workers,
        "data_root": None if data.root is None else str(data.root),
        "steps": timing.steps,
        "wait_ms_per_step": 1000 * timing.data_seconds / timing.steps,
        "step_ms": 1000 * timing.seconds / timing.steps,
        "wait_share": timing.data_seconds / timing.seconds,
        **loader_throughput(innermost(loader.dataset), items=min(256, 4 * setup.size)),
    }


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def machine(device: torch.device) -> dict[str, Any]:
    """What the numbers were measured on."""
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    info: dict[str, Any] = {
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": str(device),
        "load_average_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info
