"""Command-line arguments that several `kdkit` commands share (run, validate, info, ablate, bench,
eval): the recipe file and its `--set` overrides. The commands import them from here; this module
imports nothing of theirs."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_recipe_args(parser: argparse.ArgumentParser) -> None:
    """The positional recipe file and repeatable `--set KEY=VALUE` overrides (`args.overrides`)."""
    parser.add_argument("recipe", type=Path, help="recipe YAML file")
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
