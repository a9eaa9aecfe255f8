"""`kdkit ablate`: one recipe, a grid of variants, every variant run with every seed, compared fairly.

This module reads the command's arguments; the engine that runs the grid is `kdkit.run.ablation`
(the output folder, the baseline, shared train stages, failed and interrupted runs), the variants
and each run's recipe are `kdkit.run.variants`, the report is `kdkit.run.ablation_report`.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from kdkit.cli.arguments import add_launcher_args, add_recipe_args, launcher_overrides
from kdkit.config.loading import apply_overrides, read_yaml
from kdkit.config.schema import LauncherSpec
from kdkit.config.validation import parse_launcher, parse_recipe
from kdkit.errors import UsageError
from kdkit.run.ablation import Ablation, run_ablation
from kdkit.run.gpu_runs import ablation_gpus
from kdkit.run.variants import combine, expand_grid, read_variants
from kdkit.utils.runlog import console


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register `kdkit ablate`."""
    p = subparsers.add_parser(
        "ablate",
        help="compare variants of a recipe (adapters, stages, loss weights) over several seeds",
        description="Run the cartesian product of every --vary with every seed, everything else identical, "
        "and write ablation.csv/.json/.md/.png. Re-running the same command continues it.",
    )
    add_recipe_args(p, optional=True)  # not with --collect
    p.add_argument(
        "--variants",
        type=Path,
        metavar="FILE",
        help="a YAML file of named variants, NAME: {KEY: VALUE, ...} (recipe keys as for --set), "
        "e.g. a list of methods; combined with every --vary",
    )
    p.add_argument(
        "--vary",
        action="append",
        default=[],
        metavar="KEY=V1,V2,...",
        help="a recipe key and its values (YAML; commas inside [...] or {...} do not split), "
        "e.g. distill.adapter=covariance,projection,none (repeatable: the grid is the product)",
    )
    p.add_argument("--seeds", default="0,1,2", help="seeds every variant runs with (default 0,1,2)")
    p.add_argument("--out", type=Path, help="ablation folder (default runs/ablation-<recipe name>)")
    p.add_argument(
        "--jobs",
        type=int,
        help="runs at the same time, each its own process (default: one per GPU set, else 1)",
    )
    add_gpu_args(p)
    p.add_argument("--stage", help="the stage whose model is compared (default: the last distill stage)")
    p.add_argument(
        "--no-baseline",
        action="store_true",
        help="leave out the baseline (the compared stage's student trained without a teacher, same data, "
        "schedule and seed), which is otherwise trained once per seed and compared with every variant",
    )
    p.add_argument(
        "--teacher-per-seed",
        action="store_true",
        help="train the teacher (every train stage but the compared one) again for every seed; by "
        "default it is trained once, with the recipe's seed, and every seed of every variant uses it",
    )
    add_launcher_args(p)
    p.add_argument(
        "--collect",
        type=Path,
        metavar="OUT",
        help="write the report of the ablation submitted into OUT with --launcher slurm from its "
        "finished runs (and name those still queued or failed)",
    )
    p.set_defaults(func=cmd_ablate)


def cmd_ablate(args: argparse.Namespace) -> int:
    """`kdkit ablate`: check every variant, run what is not done yet, then write the report (a
    `RunFailed`, exit status 1, names the runs that failed)."""
    if args.jobs is not None and args.jobs < 1:
        raise UsageError(f"--jobs {args.jobs}: expected at least 1")
    if args.collect is not None:
        return _collect(args.collect)
    if args.recipe is None:
        raise UsageError("kdkit ablate: give the recipe (or --collect OUT)")
    base = apply_overrides(read_yaml(args.recipe), args.overrides + launcher_overrides(args))
    launcher = parse_launcher(base.pop("launcher", {}), str(args.recipe))
    if launcher.kind == "slurm" and (args.gpus is not None or args.gpus_per_run != 1):
        raise UsageError(
            "--gpus and --gpus-per-run share out this machine's GPUs; with --launcher slurm each "
            "run's job asks SLURM for its GPUs: use --gpus-per-node"
        )
    if launcher.kind == "slurm":
        return _submit(_ablation(args, base), launcher)
    run_ablation(_ablation(args, base))
    return 0


def _submit(ablation: Ablation, launcher: LauncherSpec) -> int:
    """`kdkit ablate --launcher slurm`: submit what is not done or queued yet, or, when every run is
    complete, write the report."""
    from kdkit.run.slurm import submit_ablation

    out, submitted = submit_ablation(ablation, launcher)
    if not submitted:  # every run is complete or still queued
        return _collect(out)
    for job in submitted:
        console.print(f"submitted SLURM job {job.job_id}: {job.name} (output: {job.stdout})", markup=False)
    console.print(f"when they are done: kdkit ablate --collect {out} (or this command again)", markup=False)
    return 0


def _collect(out: Path) -> int:
    """`kdkit ablate --collect OUT`: the report of a submitted ablation."""
    from kdkit.run.slurm import collect_ablation

    console.print(f"report: {collect_ablation(out)}", markup=False)
    return 0


def add_gpu_args(p: argparse.ArgumentParser) -> None:
    """`--gpus` and `--gpus-per-run`: which GPUs the runs use, each run on GPUs of its own."""
    p.add_argument(
        "--gpus",
        metavar="0,1,...|all|none",
        help="GPUs the runs share out, each run on its own (CUDA_VISIBLE_DEVICES); default: every "
        "visible GPU when CUDA is available; none: no GPU assignment",
    )
    p.add_argument(
        "--gpus-per-run",
        type=int,
        default=1,
        metavar="N",
        help="GPUs of each run (default 1); with N > 1 a run is a DDP run of N processes",
    )


def _ablation(args: argparse.Namespace, base: dict[str, Any]) -> Ablation:
    """The ablation the arguments ask for (`base`: the recipe with its overrides, without its
    launcher); a `UsageError` or `RecipeError` names a bad one."""
    if not args.vary and args.variants is None:
        raise UsageError(
            "kdkit ablate: give the variants to compare: --vary KEY=V1,V2,... or --variants FILE"
        )
    named = read_variants(args.variants) if args.variants else []
    variants = combine(named, expand_grid(args.vary) if args.vary else [])
    recipe = parse_recipe(base, str(args.recipe))
    gpus = ablation_gpus(recipe, args.gpus, args.gpus_per_run, args.jobs)
    return Ablation(
        recipe=args.recipe,
        base=base,
        variants=variants,
        seeds=parse_seeds(args.seeds),
        command_line=args.command_line,
        overrides=args.overrides,
        vary=args.vary,
        variants_file=args.variants,
        out=args.out,
        jobs=gpus.jobs,
        gpu_sets=gpus.sets,
        stage=args.stage,
        baseline=not args.no_baseline,
        teacher_per_seed=args.teacher_per_seed,
    )


def parse_seeds(text: str) -> list[int]:
    """`'0,1,2'` → `[0, 1, 2]` (distinct non-negative integers)."""
    try:
        seeds = [int(s) for s in text.split(",")]
    except ValueError:
        raise UsageError(f"--seeds {text!r}: expected comma-separated integers, e.g. 0,1,2") from None
    if len(set(seeds)) != len(seeds) or any(s < 0 for s in seeds):
        raise UsageError(f"--seeds {text!r}: expected distinct non-negative integers")
    return seeds
