"""`kdkit bench RECIPE`: what distillation costs next to training the student alone.

This module reads the command's arguments and prints the report; the measurement (the modes, how
they are timed, peak memory, FLOPs, the loader) is `kdkit.run.benchmark`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch
from rich.table import Table

from kdkit.cli.arguments import add_recipe_args
from kdkit.config.loading import load_recipe
from kdkit.config.schema import RecipeError
from kdkit.data.frame_store import STORE_DIR, store_command
from kdkit.run.benchmark import MODES, run_bench
from kdkit.training.display import rate_text
from kdkit.utils.runlog import output


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
    _print_teachers(report.get("teachers", []))  # absent from reports of kdkit 0.2
    _print_loader(report["loader"])


def _print_teachers(teachers: list[dict[str, Any]]) -> None:
    """One line per teacher: its forward time and share of (b)'s step (measured when (b) ran)."""
    for k, row in enumerate(teachers):
        trained = f" (stage {row['stage']})" if row["stage"] else ""
        measured = (
            f"{row['forward_ms']:.1f} ms/step, {100 * row['share_of_distill_step']:.0f} % of (b)'s step"
            if "forward_ms" in row
            else "not timed (mode distill not run)"
        )
        output.print(
            f"teacher {k} {row['model']}{trained}: forward {row['forward_gflops_per_image']:.3g} "
            f"GFLOPs/image, {measured}",
            markup=False,
        )


def _print_loader(loader: dict[str, Any] | None) -> None:
    """The loader measurement's lines: the wait per step and one worker's images/s, or why it was skipped."""
    if not loader:
        return
    if "skipped" in loader:
        output.print(f"loader: {loader['skipped']}", markup=False)
        return
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
