"""The `kdkit` command line.

Exit status: 0 success, 1 a run failed (diverged, data/model problem found while running),
2 bad input (recipe, arguments, files), 128 + signal interrupted (130 Ctrl-C, 143 SIGTERM).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import re
import shlex
import sys
from pathlib import Path

from rich.markup import escape
from rich.table import Table

from kdkit import __version__
from kdkit.arguments import add_recipe_args
from kdkit.checkpoint import CheckpointError, OutputDirError, check_output_dir
from kdkit.data import DataError, example_input
from kdkit.errors import RunFailed, UsageError
from kdkit.info import model_cost
from kdkit.lock import exclusive
from kdkit.models import ModelError, build_model
from kdkit.plugins import load_plugins
from kdkit.recipe import ModelSpec, RecipeError, diff_keys, load_recipe, parse_options, read_yaml
from kdkit.registry import COMMANDS, RegistryError
from kdkit.runlog import console, output, progress_settings
from kdkit.trainer import TrainingDiverged, TrainingInterrupted
from kdkit.workers import Interrupted, WorkerError, stop_on_signals

# Core commands that live in their own module; each module has `add_parser(subparsers)`.
COMMAND_MODULES: tuple[str, ...] = (
    "kdkit.deploy.export",
    "kdkit.deploy.predict",
    "kdkit.deploy.evaluate",
    "kdkit.ablate",
    "kdkit.bench",
)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every core and plugin subcommand."""
    parser = argparse.ArgumentParser(prog="kdkit", description="Knowledge distillation for PyTorch.")
    parser.add_argument("--version", action="version", version=f"kdkit {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "run", help="run a recipe (all its stages)", description="Run every stage of a recipe."
    )
    add_recipe_args(p)
    p.add_argument(
        "--out", type=Path, help="run directory (default: runs/<recipe name>[-N], never overwritten)"
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --out (default: the newest runs/<name>*) from its checkpoints",
    )
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("validate", help="check a recipe: types, models, taps and adapter shapes (dry run)")
    add_recipe_args(p)
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("info", help="parameters, MiB and GFLOPs of every model of a recipe")
    add_recipe_args(p)
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("taps", help="list the hookable module paths of a model with their output shapes")
    p.add_argument("model", help="a timm or registered model name")
    p.add_argument("--img-size", type=int, default=224, help="input image size (default 224)")
    p.add_argument("--in-chans", type=int, default=3)
    p.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="model option, e.g. --option depth=4 (repeatable)",
    )
    p.set_defaults(func=cmd_taps)

    p = sub.add_parser("plugins", help="list installed plugins and what they registered")
    p.set_defaults(func=cmd_plugins)

    for module in COMMAND_MODULES:
        importlib.import_module(module).add_parser(sub)
    for name in COMMANDS:  # plugin commands
        COMMANDS.get(name)(sub)
    return parser


# ------------------------------------------------------------------------------------ commands
def cmd_run(args: argparse.Namespace) -> int:
    """`kdkit run`: validate everything, then run the stages.

    Under `torchrun --nproc_per_node=N -m kdkit run ...` every process runs this with DDP
    (see docs/scaling.md); rank 0 picks the run directory and alone writes and prints."""
    from kdkit import distributed
    from kdkit.pipeline import RecipeRun

    recipe = load_recipe(args.recipe, args.overrides)
    with distributed.session():
        try:
            out = _run_dir(recipe.name, args.out, args.resume) if distributed.is_main() else None
        except UsageError as exc:
            out = exc
        out = distributed.broadcast_object(out)
        if isinstance(out, UsageError):
            raise out
        if distributed.is_main():
            check_output_dir(out)  # before checking, which may take a while (generating data)
        # One writer per run directory: rank 0 alone writes it, so it alone holds the lock.
        with exclusive(out, args.command_line) if distributed.is_main() else contextlib.nullcontext():
            try:
                if args.resume:
                    _check_same_recipe(recipe.to_dict(), out / "recipe.yaml")
                run = RecipeRun(recipe, out)
                with distributed.main_first():  # rank 0 first: checking may generate the data set
                    run.check(generate=True)
                if distributed.is_main():
                    check_output_dir(out, run.bytes_to_write())
                console.print(f"run directory: {out}")
                run.run(resume=args.resume)
            except (TrainingInterrupted, Interrupted) as exc:
                raise _continue_run(exc, args, out) from None
        console.print(f"done: {out / 'summary.json'}")
    return 0


def _continue_run(exc: TrainingInterrupted | Interrupted, args: argparse.Namespace, out: Path) -> Interrupted:
    """The interruption of `kdkit run` as one line: what was saved and the exact command that continues."""
    saved = str(exc).partition(" Continue with")[0].rstrip(".")  # the trainer's own advice is generic
    if not (out / "recipe.yaml").exists():  # stopped before the run started: nothing to resume
        return Interrupted(f"{saved}; nothing was written; start again with: {args.command_line}", exc.signum)
    sets = [word for override in args.overrides for word in ("--set", override)]
    again = shlex.join(["kdkit", "run", str(args.recipe), *sets, "--out", str(out), "--resume"])
    return Interrupted(f"{saved}; completed stages are kept in {out}; continue with: {again}", exc.signum)


def _check_same_recipe(resolved: dict, saved_path: Path) -> None:
    """A resumed run must continue the same experiment: refuse a changed recipe."""
    saved = read_yaml(saved_path)
    changed = sorted(diff_keys(saved, resolved))
    if changed:
        raise UsageError(
            f"--resume: the recipe differs from the one this run started with ({saved_path}) at "
            f"{', '.join(changed[:8])}; resume with the same recipe and --set options, e.g. "
            f"kdkit run {saved_path} --out {saved_path.parent} --resume"
        )


def _run_dir(name: str, out: Path | None, resume: bool) -> Path:
    """Pick the run directory without ever overwriting an earlier run."""
    if out is not None:
        has_run = (out / "recipe.yaml").exists()
        if resume and not has_run:
            raise UsageError(f"--resume: {out} holds no run to resume (no recipe.yaml)")
        if not resume and has_run:
            raise UsageError(
                f"--out: {out} already holds a run; pass --resume to continue it or choose another --out"
            )
        return out
    base = Path("runs")
    # runs/<name> and runs/<name>-N only: `kdfas*` would also match runs/kdfas-demo
    own = re.compile(rf"{re.escape(name)}(-[0-9]+)?")
    existing = sorted(
        (p for p in base.glob(f"{name}*") if own.fullmatch(p.name) and (p / "recipe.yaml").exists()),
        key=lambda p: p.stat().st_mtime,
    )
    if resume:
        if not existing:
            raise UsageError(f"--resume: no earlier run of {name!r} under {base}/; pass --out DIR")
        return existing[-1]
    candidate, n = base / name, 1
    while candidate.exists():
        n += 1
        candidate = base / f"{name}-{n}"
    return candidate


def cmd_validate(args: argparse.Namespace) -> int:
    """`kdkit validate`: everything `run` checks before training, plus the tap/adapter tables."""
    from kdkit.pipeline import RecipeRun

    recipe = load_recipe(args.recipe, args.overrides)
    # Generates the data set the recipe asks for, as `run` would: validate checks the data run reads.
    for table in RecipeRun(recipe, Path("unused")).check(generate=True):
        output.print(table)
    output.print(f"[green]{args.recipe}: valid[/green] ({len(recipe.pipeline)} stages)")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    """`kdkit info`: cost of every model in the recipe at the recipe's image size. Reads no data:
    the example input is zeros of data.image_size and the data's channels."""
    recipe = load_recipe(args.recipe, args.overrides)
    example = example_input(recipe.data)
    rows = {}
    for key, spec in recipe.models.items():
        # Cost does not depend on weights: build without them so info works before weights exist.
        model = build_model(ModelSpec(spec.name, spec.options), where=f"models.{key}")
        rows[key] = {"model": spec.name, **model_cost(model, example)}
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    table = Table(title=f"{recipe.name}: models at {recipe.data.image_size} px")
    for col in ("model", "architecture", "params (M)", "MiB (fp32)", "GFLOPs / image"):
        table.add_column(col, justify="left" if col in ("model", "architecture") else "right")
    for key, row in rows.items():
        table.add_row(
            key, row["model"], f"{row['params_M']:.3f}", f"{row['MiB']:.2f}", f"{row['GFLOPs']:.4f}"
        )
    output.print(table)
    return 0


def cmd_taps(args: argparse.Namespace) -> int:
    """`kdkit taps MODEL`: hookable paths and output shapes for one forward pass."""
    import torch

    from kdkit.taps import list_taps

    for flag, value in (("--img-size", args.img_size), ("--in-chans", args.in_chans)):
        if value < 1:
            raise UsageError(f"{flag}: expected a positive integer, got {value}")
    options = parse_options(args.option, "--option")
    # Build for the example's size and channels (timm ViTs fix img_size when built); models
    # without an img_size option (CNNs) are built without it.
    try:
        spec = ModelSpec(args.model, {"img_size": args.img_size, "in_chans": args.in_chans, **options})
        model = build_model(spec, where="model")
    except ModelError:
        model = build_model(ModelSpec(args.model, {"in_chans": args.in_chans, **options}), where="model")
    example = torch.zeros(1, args.in_chans, args.img_size, args.img_size)
    table = Table(title=f"{args.model}: module outputs for a 1×{args.in_chans}×{args.img_size}² input")
    table.add_column("path")
    table.add_column("output shape", justify="right")
    for path, shape in list_taps(model, example):
        table.add_row(path, str(shape))
    output.print(table)
    return 0


def cmd_plugins(args: argparse.Namespace) -> int:
    """`kdkit plugins`: installed plugins and their load status."""
    plugins = load_plugins()
    if not plugins:
        output.print("no plugins installed (entry-point group 'kdkit.plugins')")
        return 0
    table = Table(title="kdkit plugins")
    for col in ("name", "distribution", "version", "entry point", "status"):
        table.add_column(col)
    for info in plugins.values():
        table.add_row(
            info.name,
            info.distribution,
            info.version,
            info.target,
            f"[red]{info.error}[/red]" if info.error else "[green]loaded[/green]",
        )
    output.print(table)
    from kdkit.registry import Registries

    regs = Registries()
    for kind in ("models", "datasets", "evaluators", "adapters", "feature_criteria", "commands"):
        output.print(f"{kind}: {', '.join(getattr(regs, kind).names())}", markup=False, soft_wrap=True)
    return 0


# ------------------------------------------------------------------------------------ entry
def _error(exc: Exception) -> None:
    console.print("[red]error:[/red]", escape(str(exc)), soft_wrap=True)


def main(argv: list[str] | None = None) -> int:
    """Console entry point; returns the exit status."""
    # A SIGTERM stops a command as a Ctrl-C does, except in torchrun's ranks (their stop stays collective);
    # installed here once for every command, plugin commands included.
    single = int(os.environ.get("WORLD_SIZE", "1")) <= 1
    try:
        with stop_on_signals() if single else contextlib.nullcontext():
            for info in load_plugins().values():
                if info.error:
                    console.print(
                        f"[yellow]warning: plugin {info.name!r} failed to load: {info.error}[/yellow]"
                    )
            args = build_parser().parse_args(argv)
            progress_settings()  # a bad $KDKIT_PROGRESS_* is bad input, refused before any work
            # As typed, for messages that say how to continue and for the lock files naming a writer.
            args.command_line = shlex.join(["kdkit", *(sys.argv[1:] if argv is None else argv)])
            return args.func(args)
    except (
        RecipeError,
        UsageError,
        ModelError,
        DataError,
        CheckpointError,
        OutputDirError,
        RegistryError,
    ) as exc:
        _error(exc)
        return 2
    except (TrainingDiverged, WorkerError, RunFailed) as exc:
        _error(exc)
        return 1
    except OSError as exc:  # disk full, permission denied, ... while writing: name the file, no traceback
        where = f"{exc.filename}: " if exc.filename else ""
        _error(OSError(f"{where}{exc.strerror or exc}"))
        return 1
    except (TrainingInterrupted, Interrupted) as exc:  # one line: what was saved, how to continue
        console.print(f"[yellow]interrupted:[/yellow] {escape(str(exc))}", soft_wrap=True)
        return 128 + exc.signum
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/yellow]")
        return 130


if __name__ == "__main__":
    sys.exit(main())
