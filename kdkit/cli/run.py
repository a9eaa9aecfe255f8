"""`kdkit run`, `kdkit validate` and `kdkit info`: the commands that take a recipe."""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import shlex
from pathlib import Path

from rich.table import Table

from kdkit.cli.arguments import add_launcher_args, add_recipe_args, launcher_overrides
from kdkit.config.loading import load_recipe
from kdkit.config.schema import ModelSpec, Recipe
from kdkit.data.datasets import example_input
from kdkit.errors import RunFailed, UsageError
from kdkit.models.factory import build_model
from kdkit.models.info import model_cost
from kdkit.training.trainer import TrainingInterrupted
from kdkit.utils.checkpoint import check_output_dir
from kdkit.utils.gpus import multi_gpu_hint, visible_gpus
from kdkit.utils.lock import exclusive
from kdkit.utils.runlog import console, output
from kdkit.utils.workers import Interrupted


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register `kdkit run`, `kdkit validate` and `kdkit info`."""
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
        help="continue the run in --out (default: the newest runs/<name> or runs/<name>-N) from its "
        "checkpoints; with a changed recipe, the stages the change touches (and those reading them) "
        "run again and the others are kept",
    )
    add_launcher_args(p)
    p.add_argument("--wait", action="store_true", help="with --launcher slurm: wait until the job ends")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("validate", help="check a recipe: types, models, taps and adapter shapes (dry run)")
    add_recipe_args(p)
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("info", help="parameters, MiB and GFLOPs of every model of a recipe")
    add_recipe_args(p)
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=cmd_info)


def cmd_run(args: argparse.Namespace) -> int:
    """`kdkit run`: validate everything, then run the stages.

    Under `torchrun --nproc_per_node=N -m kdkit run ...` every process runs this with DDP
    (see docs/scaling.md); rank 0 picks the run directory and alone writes and prints."""
    from kdkit.run.checks import check_recipe
    from kdkit.run.pipeline import RecipeRun
    from kdkit.run.resume import plan_resume
    from kdkit.utils import distributed

    recipe = load_recipe(args.recipe, args.overrides + launcher_overrides(args))
    if recipe.launcher.kind == "slurm":
        return _submit(args, recipe)
    hint = multi_gpu_hint(visible_gpus(), recipe.train.device, str(args.recipe))
    if hint:
        console.print(hint, markup=False)
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
                # Every rank reads the saved recipe before rank 0 replaces it (after main_first).
                plan = plan_resume(out, recipe) if args.resume else None
                with distributed.main_first():  # rank 0 first: checking may generate the data set
                    checked = check_recipe(recipe, generate=True, source=str(args.recipe))
                    if plan is not None and distributed.is_main():  # before any rank looks for done.json
                        plan.apply(out)
                if distributed.is_main():
                    check_output_dir(out, checked.bytes_to_write(recipe))
                console.print(f"run directory: {out}")
                RecipeRun(recipe, out).run(resume=args.resume)
            except (TrainingInterrupted, Interrupted) as exc:
                raise _continue_run(exc, args, out) from None
        console.print(f"done: {out / 'summary.json'}")
    return 0


def _submit(args: argparse.Namespace, recipe: Recipe) -> int:
    """`kdkit run --launcher slurm`: submit the run as a SLURM job; print its id and logs (and wait)."""
    from kdkit.run.slurm import run_complete, submit_run, wait_for

    out = _run_dir(recipe.name, args.out, args.resume)
    job = submit_run(recipe, out, args.resume, str(args.recipe), args.command_line)
    console.print(f"submitted SLURM job {job.job_id}: {recipe.name} into {out}", markup=False)
    console.print(f"  output: {job.stdout}\n  errors: {job.stderr}", markup=False)
    if not args.wait:
        console.print(f"follow it with: squeue --jobs {job.job_id}; tail -f {job.stdout}", markup=False)
        return 0
    state = wait_for([job.job_id]).get(job.job_id, "no longer in squeue")
    if not run_complete(recipe, out):
        sets = [word for override in args.overrides for word in ("--set", override)]
        again = shlex.join(["kdkit", "run", str(args.recipe), *sets, "--out", str(out), "--resume"])
        raise RunFailed(
            f"SLURM job {job.job_id} ended ({state}) before the run was complete; see {job.stderr}; "
            f"continue it from its last checkpoint with: {again} --launcher slurm"
        )
    console.print(f"done: {out / 'summary.json'}", markup=False)
    return 0


def _continue_run(exc: TrainingInterrupted | Interrupted, args: argparse.Namespace, out: Path) -> Interrupted:
    """The interruption of `kdkit run` as one line: what was saved and the exact command that continues."""
    saved = str(exc).partition(" Continue with")[0].rstrip(".")  # the trainer's own advice is generic
    if not (out / "recipe.yaml").exists():  # stopped before the run started: nothing to resume
        return Interrupted(f"{saved}; nothing was written; start again with: {args.command_line}", exc.signum)
    sets = [word for override in args.overrides for word in ("--set", override)]
    again = shlex.join(["kdkit", "run", str(args.recipe), *sets, "--out", str(out), "--resume"])
    return Interrupted(f"{saved}; completed stages are kept in {out}; continue with: {again}", exc.signum)


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
    from kdkit.run.checks import check_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    # Generates the data set the recipe asks for, as `run` would: validate checks the data run reads.
    for table in check_recipe(recipe, generate=True, source=str(args.recipe)).tables:
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
