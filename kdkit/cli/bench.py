"""`kdkit bench RECIPE`: what distillation costs next to training the student alone.

In one process it times, on the same synthetic batches of the recipe's shape (random weights, so
no data root or weight files are needed):

    (a) student     the student trained alone (cross-entropy), through kdkit's Trainer
    (b) distill     the recipe's distill stage with the live teacher, through kdkit's Trainer
    (c) cached      the same with every teacher output read from the teacher-output cache
    (d) reference   benchmarks/reference_loop.py: (b)'s computation by hand, no kdkit code
    (e) compiled    (b) with `train.compile` (torch.compile of student and teacher)

and prints images/s, step time and peak memory of each, and the step-time ratios (b)/(d)
(kdkit's overhead), (c)/(a) and (b)/(a) (what distillation costs) and (b)/(e) (what compiling
saves; compilation happens in the untimed warm-up). Warm-up steps are excluded;
every mode is timed `repeats` times, interleaved (so drift on a shared machine hits all modes
alike), and the median is reported. Progress goes to stderr: each mode's warm-up, then the timed
rounds naming the mode being measured. When the recipe's data is available, one more measurement
runs (b) on the real training loader and reports the time spent waiting for it, and the images/s
one loader worker makes (`kdkit.data.throughput`), from a frame store and from the files when a store
serves the data.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import dataclasses
import gc
import importlib.util
import itertools
import json
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from rich.table import Table

from kdkit.cli.arguments import add_recipe_args
from kdkit.config.plan import StagePlan
from kdkit.config.recipe import Recipe, RecipeError, StageSpec, TrainSpec, load_recipe
from kdkit.data.augment import device_images
from kdkit.data.datasets import DataError, build_loaders
from kdkit.data.frame_store import STORE_DIR, store_command
from kdkit.data.throughput import innermost, loader_throughput
from kdkit.distill.distiller import Distiller
from kdkit.distill.teacher_cache import TeacherCache
from kdkit.models.info import forward_gflops
from kdkit.run.build import build_distiller, build_recipe_model, dry_run_size
from kdkit.training.task import SupervisedTask
from kdkit.training.trainer import Trainer, rate_text
from kdkit.utils.device import autocast, resolve_device
from kdkit.utils.runlog import output, progress

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


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """`kdkit bench RECIPE [--steps N] [--batch B] [--json]`."""
    p = subparsers.add_parser(
        "bench",
        help="time student-alone vs distillation (live teacher, cached teacher, hand-written loop)",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
    )
    add_recipe_args(p)
    p.add_argument("--stage", help="the distill stage to measure (default: the first)")
    p.add_argument("--steps", type=int, default=10, help="timed steps per measurement (default 10)")
    p.add_argument("--batch", type=int, help="batch size (default: the distill stage's data.batch_size)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per mode first (default 3)")
    p.add_argument("--repeats", type=int, default=5, help="measurements per mode; the median counts")
    p.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    p.add_argument("--no-data", action="store_true", help="skip the loader measurements")
    p.add_argument("--no-compile", action="store_true", help="skip mode (e), torch.compile")
    p.add_argument(
        "--modes",
        default=",".join(MODES),
        help=f"the modes to measure, comma-separated (default: all, {','.join(MODES)})",
    )
    p.add_argument(
        "--peak-tflops",
        type=float,
        help="the device's peak TFLOP/s for the run's precision, for model FLOPs utilisation "
        "(default: known for H100/H200/A100 under bf16/fp16 amp; otherwise none is reported)",
    )
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=cmd_bench)


def cmd_bench(args: argparse.Namespace) -> int:
    """Run the benchmark and print it."""
    if min(args.steps, args.repeats) < 1 or args.warmup < 0 or (args.batch is not None and args.batch < 1):
        raise RecipeError(["--steps, --repeats and --batch must be positive, --warmup >= 0"], "kdkit bench")
    if args.peak_tflops is not None and args.peak_tflops <= 0:
        raise RecipeError([f"--peak-tflops {args.peak_tflops}: expected a positive number"], "kdkit bench")
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = sorted(set(modes) - set(MODES))
    if unknown or not modes:
        raise RecipeError([f"--modes {args.modes}: expected some of {', '.join(MODES)}"], "kdkit bench")
    if args.no_compile and "compiled" in modes:
        modes.remove("compiled")
    if args.threads:
        torch.set_num_threads(args.threads)
    recipe = load_recipe(args.recipe, args.overrides)
    report = run_bench(
        recipe,
        stage=args.stage,
        steps=args.steps,
        batch=args.batch,
        warmup=args.warmup,
        repeats=args.repeats,
        loader=not args.no_data,
        modes=modes,
        peak_tflops=args.peak_tflops,
    )
    report["recipe"] = str(args.recipe)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print_report(report)
    return 0


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
    stage_spec = _distill_stage(recipe, stage)
    plan = recipe.plan.of(stage_spec)
    train, d = plan.train, plan.distill_spec()
    # Random weights: the cost does not depend on them, and the bench needs no weight files.
    models = {k: dataclasses.replace(s, weights=None, pretrained=False) for k, s in recipe.models.items()}
    recipe = dataclasses.replace(recipe, models=models)
    device = resolve_device(train.device)
    size = batch or plan.data.batch_size  # the stage's own data: the shape it trains at
    pool = _synthetic_batches(recipe, plan, size, device)
    example = pool[0][0][: dry_run_size(plan)].cpu()

    def distiller() -> Distiller:
        return build_distiller(recipe, stage_spec, example=example)

    gflops = _forward_gflops(distiller(), example)
    # Model FLOPs per image of a training step: the student's forward and backward (about 3
    # forwards), plus the teacher's forward where it runs. Adapters and losses are negligible.
    step_gflops = {
        "student": 3 * gflops["student"],
        "distill": 3 * gflops["student"] + gflops["teacher"],
        "cached": 3 * gflops["student"],
        "reference": 3 * gflops["student"] + gflops["teacher"],
        "compiled": 3 * gflops["student"] + gflops["teacher"],
    }
    peak = peak_tflops or _known_peak(device, train.amp)

    with tempfile.TemporaryDirectory(prefix="kdkit-bench-") as tmp:
        cache = TeacherCache(Path(tmp), {"bench": True}, len(pool) * size, max_bytes=1 << 62)
        builders: dict[str, Callable[[], Runner]] = {
            "student": lambda: _trainer_steps(
                SupervisedTask(build_recipe_model(recipe, d.student, "bench.student"), train.label_smoothing),
                train,
                pool,
                steps,
            ),
            "distill": lambda: _trainer_steps(distiller(), train, pool, steps),
            "cached": lambda: _trainer_steps(
                _filled(distiller(), cache, pool, train), train, pool, steps, keys=True
            ),
            "reference": lambda: _reference_steps(distiller(), d, train, pool, steps, example.to(device)),
        }
        compile_train = dataclasses.replace(train, compile=True)
        builders["compiled"] = lambda: _trainer_steps(distiller(), compile_train, pool, steps)
        builders = {mode: build for mode, build in builders.items() if mode in modes}
        runners, memory, unavailable = {}, {}, {}
        for mode, build in builders.items():  # one after the other: peak memory of each alone
            try:
                probe = _PeakMemory(device)  # baseline before the mode's models exist
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
        seconds: dict[str, list[float]] = {mode: [] for mode in runners}
        cache.hits = cache.misses = 0  # count the timed steps only
        # Each round runs every mode once, the compared pairs (b, d) and (c, a) side by side; the order
        # rotates and reverses from round to round, so no mode always follows the same one.
        order = [m for m in ("student", "cached", "distill", "reference", "compiled") if m in runners]
        rounds = f"bench: {repeats} timed rounds of {len(order)} modes × {steps} steps"
        with progress(repeats * len(order), rounds, unit="measurements") as advance:
            for r in range(repeats):
                rotated = order[r % len(order) :] + order[: r % len(order)]
                for mode in rotated if r % 2 == 0 else rotated[::-1]:
                    advance(0, info=MODES[mode])
                    start = time.perf_counter()
                    runners[mode](steps)  # no per-step display inside the timed window
                    _synchronize(device)
                    seconds[mode].append(time.perf_counter() - start)
                    advance()
        cache_hits = cache.hits / max(cache.hits + cache.misses, 1)
        loader_report = _loader_wait(recipe, stage_spec, train, size, steps) if loader else None

    rows: dict[str, dict[str, Any]] = {}
    for mode, label in MODES.items():
        if mode not in modes:
            continue
        if mode not in runners:
            rows[mode] = {"label": label, "unavailable": unavailable.get(mode, "not run")}
            continue
        times = sorted(t / steps for t in seconds[mode])
        median = statistics.median(times)
        rows[mode] = {
            "label": label,
            "img_per_s": size / median,
            "step_ms": 1000 * median,
            "step_ms_min": 1000 * times[0],
            "step_ms_max": 1000 * times[-1],
            "peak_mem_mib": memory.get(mode),
            "tflops_per_s": step_gflops[mode] * size / median / 1000,
        }
        if peak:
            rows[mode]["mfu"] = rows[mode]["tflops_per_s"] / peak
    if "img_per_s" in rows.get("cached", {}):
        rows["cached"]["cache_hit_rate"] = cache_hits

    def ratio(a: str, b: str) -> float | None:
        """Median over the repeats of a/b measured in the same round (moments apart): robust to load
        that drifts during the run."""
        if a not in seconds or b not in seconds:
            return None
        return statistics.median(x / y for x, y in zip(seconds[a], seconds[b], strict=True))

    return {
        "stage": stage_spec.name,
        "batch": size,
        "input": list(pool[0][0].shape[1:]),
        "steps": steps,
        "warmup": warmup,
        "repeats": repeats,
        "amp": train.amp,
        "compile": train.compile,
        "teacher_dtype": d.teacher_dtype,
        "machine": machine(device),
        "modes": rows,
        "ratios": {
            "b/d": ratio("distill", "reference"),
            "c/a": ratio("cached", "student"),
            "b/a": ratio("distill", "student"),
            "b/e": ratio("distill", "compiled"),
        },
        "memory_kind": "cuda_max_allocated" if device.type == "cuda" else "rss_increase",
        "forward_gflops_per_image": gflops,
        "peak_tflops": peak,
        "loader": loader_report,
    }


def _warm_up(mode: str, runner: Runner, steps: int) -> None:
    """The untimed first steps of `mode` (torch.compile compiles here), shown as progress."""
    note = " (compiling: can take minutes)" if mode == "compiled" else ""
    with progress(steps, f"bench {MODES[mode]}: warm-up{note}") as advance:
        runner(steps, advance)


def _forward_gflops(distiller: Distiller, example: torch.Tensor) -> dict[str, float]:
    """Forward GFLOPs per image of the distiller's student and teacher (PyTorch's FLOP counter)."""
    dtype = next(distiller.teacher.parameters()).dtype  # a half-precision teacher takes half inputs
    flops = {
        "student": forward_gflops(distiller.student, example),
        "teacher": forward_gflops(distiller.teacher, example.to(dtype)),
    }
    distiller.close()
    return flops


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
    student = build_recipe_model(recipe, stage.distill_spec().student, "bench.student")
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


def _loader_wait(recipe: Recipe, stage: StageSpec, train: TrainSpec, size: int, steps: int) -> dict[str, Any]:
    """(b) on the recipe's real training loader: how long each step waits for its batch."""
    plan = recipe.plan.of(stage)
    data = dataclasses.replace(plan.data, batch_size=size)
    try:
        loader, _, set_epoch = build_loaders(data, plan.seed, eval_splits=())
        images = device_images(next(iter(loader))[0], torch.device("cpu"))
        example = images[: dry_run_size(plan)]
    except (DataError, OSError, ValueError) as exc:
        return {"skipped": f"the recipe's data is not available ({exc})"}
    task = build_distiller(recipe, stage, example=example)
    trainer = Trainer(task, train, loader, stage="bench")
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
        **loader_throughput(innermost(loader.dataset), items=min(256, 4 * size)),
    }


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _PeakMemory:
    """Peak memory (MiB) above a baseline taken at creation: CUDA's allocator peak, or the resident
    set size of the process on the CPU.

    Freed memory is first handed back to the system (`malloc_trim`) and the kernel's peak-RSS
    counter is reset at `start()`, so each mode is measured alone: its models, optimizer state and
    activations (and, for the cache, the file pages it reads).
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._settle()
        cuda = device.type == "cuda"
        self.base = torch.cuda.memory_allocated(device) / 1024 if cuda else _status_kib("VmRSS")
        self.resettable = False

    def _settle(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        else:
            _malloc_trim()

    def start(self) -> None:
        """Begin the measured window."""
        self._settle()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.resettable = True
        else:
            self.resettable = _reset_peak_rss()

    def peak(self) -> float | None:
        """MiB above the baseline at the window's peak (None where the CPU counter cannot be reset)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak: float | None = torch.cuda.max_memory_allocated(self.device) / 1024
        else:
            peak = _status_kib("VmHWM")
        if not self.resettable or peak is None or self.base is None:
            return None
        return (peak - self.base) / 1024


def _malloc_trim() -> None:
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS (VmHWM) counter of this process (Linux)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


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


# ------------------------------------------------------------------------------------ printing
def print_report(report: dict[str, Any]) -> None:
    """The machine line, the table of modes and the ratios."""
    m = report["machine"]
    output.print(
        f"{m['cpu']} · {m['cpus_usable']}/{m['cpus']} CPUs · {m['torch_threads']} torch threads · "
        f"torch {m['torch']} · {m['device']}{' · ' + m['gpu'] if 'gpu' in m else ''} · "
        f"load {m['load_average_1m']:.2f}",
        markup=False,
    )
    title = (
        f"{report.get('recipe', '')} stage {report['stage']}: batch {report['batch']} × "
        f"{tuple(report['input'])}, amp {report['amp']}, teacher {report['teacher_dtype']}, "
        f"median of {report['repeats']} × {report['steps']} steps"
    )
    table = Table(title=title)
    for col in ("mode", "img/s", "ms/step", "min–max ms", "peak MiB", "TFLOP/s", "MFU"):
        table.add_column(col, justify="left" if col == "mode" else "right")
    for row in report["modes"].values():
        if "unavailable" in row:
            table.add_row(row["label"], "-", "-", row["unavailable"], "-", "-", "-")
            continue
        mem = row["peak_mem_mib"]
        table.add_row(
            row["label"],
            rate_text(row["img_per_s"]),
            f"{row['step_ms']:.1f}",
            f"{row['step_ms_min']:.1f}–{row['step_ms_max']:.1f}",
            "-" if mem is None else f"{mem:.0f}",
            f"{row['tflops_per_s']:.3g}",
            f"{100 * row['mfu']:.1f} %" if "mfu" in row else "-",
        )
    output.print(table)
    ratios = "  ".join(f"{k} = {v:.3f}" for k, v in report["ratios"].items() if v is not None)
    output.print(f"step-time ratios: {ratios}", markup=False)
    loader = report["loader"]
    if loader and "skipped" not in loader:
        output.print(
            f"loader ({loader['num_workers']} workers): waits {loader['wait_ms_per_step']:.1f} ms of a "
            f"{loader['step_ms']:.1f} ms step ({100 * loader['wait_share']:.1f} %)",
            markup=False,
        )
        files = loader.get("files_worker_img_per_s")
        root = loader.get("data_root")
        hint = f": `{store_command(root, Path(root) / STORE_DIR)}`" if root else ""
        stored = f"; from its files: {files:.0f}" if files else f" (no frame store{hint})"
        output.print(
            f"one loader worker: {loader['worker_img_per_s']:.0f} images/s "
            f"({loader['served_from_store']}/{loader['size']} frames from a frame store){stored}",
            markup=False,
        )
    elif loader:
        output.print(f"loader: {loader['skipped']}", markup=False)
