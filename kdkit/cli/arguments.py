"""Command-line arguments that several `kdkit` commands share (run, validate, info, ablate, bench,
eval): the recipe file and its `--set` overrides. The commands import them from here; this module
imports nothing of theirs."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_recipe_args(parser: argparse.ArgumentParser, optional: bool = False) -> None:
    """The positional recipe file (`optional`: may be left out) and repeatable `--set KEY=VALUE`
    overrides (`args.overrides`)."""
    parser.add_argument("recipe", type=Path, nargs="?" if optional else None, help="recipe YAML file")
    add_set_arg(parser)


def add_set_arg(parser: argparse.ArgumentParser) -> None:
    """Repeatable `--set KEY=VALUE` recipe overrides, collected in `args.overrides`."""
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a recipe value, e.g. --set train.lr=1e-3 (repeatable)",
    )


# Flags that set keys of the recipe's `launcher` section (`kdkit.config.schema.LauncherSpec`).
LAUNCHER_FLAGS = {
    "launcher": "kind",
    "partition": "partition",
    "time": "time",
    "nodes": "nodes",
    "gpus_per_node": "gpus_per_node",
    "cpus_per_task": "cpus_per_task",
    "mem": "mem",
    "slurm_folder": "folder",
}


def add_launcher_args(parser: argparse.ArgumentParser) -> None:
    """`--launcher local|slurm` and the SLURM job's resources; each overrides the recipe's `launcher`
    key of the same name (docs/scaling.md, "A SLURM cluster")."""
    group = parser.add_argument_group("launcher (the recipe's launcher: section)")
    group.add_argument("--launcher", choices=["local", "slurm"], help="run here or as SLURM jobs (submitit)")
    group.add_argument("--partition", help="SLURM partition (default: the cluster's)")
    group.add_argument("--time", type=int, metavar="MINUTES", help="time limit per job (default 60)")
    group.add_argument("--nodes", type=int, help="nodes per run (default 1)")
    group.add_argument("--gpus-per-node", type=int, metavar="N", help="GPUs per node, a process each")
    group.add_argument("--cpus-per-task", type=int, metavar="N", help="CPU cores per process (default 1)")
    group.add_argument("--mem", help="memory per node, e.g. 32G")
    group.add_argument("--slurm-folder", metavar="DIR", help="submitit's job files and logs (default slurm)")
    group.add_argument(
        "--sbatch",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="another sbatch option, e.g. --sbatch account=lab (repeatable)",
    )


def launcher_overrides(args: argparse.Namespace) -> list[str]:
    """The launcher flags given, as `--set` overrides of the recipe's `launcher` section."""
    given = {key: getattr(args, flag) for flag, key in LAUNCHER_FLAGS.items()}
    # JSON is YAML: a string stays a string (--mem 4000 is not the integer 4000)
    overrides = [f"launcher.{key}={json.dumps(value)}" for key, value in given.items() if value is not None]
    return overrides + [f"launcher.sbatch.{option}" for option in args.sbatch]
