"""`kdkit eval CHECKPOINT [--recipe R] [--set KEY=VALUE ...] [--split test] [--out DIR]`.

Re-evaluates a trained `model.pt` on a split with the recipe's evaluator, exactly as the
pipeline's evaluate stage does (the dev split 'val' is always predicted too: evaluators fix
thresholds there), and writes what that stage writes — the evaluator's files (scores, plots)
plus `metrics.json` and `calibration.json` — into `--out` (default `RUN/<stage>/eval-<split>/`).
Without `--recipe`, the recipe recorded in the checkpoint is used; `--set` overrides either,
e.g. `--set data.root=/data/other-copy`. When the split holds data the model was trained on (a
data set's `seen_in_training` hook says so, e.g. a cross-domain model tested on a protocol whose
target was one of its sources), the results are labelled as not held out and a warning names why.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from rich.markup import escape

from kdkit.cli.arguments import add_set_arg
from kdkit.config.loading import apply_overrides, load_recipe
from kdkit.config.schema import Recipe, RecipeError
from kdkit.config.validation import parse_recipe
from kdkit.deploy.modelfile import load_checkpoint
from kdkit.errors import UsageError
from kdkit.evaluation.comparison import results_table
from kdkit.evaluation.scoring import evaluate_model
from kdkit.registry import DATASETS
from kdkit.run.build import make_evaluator
from kdkit.utils.checkpoint import atomic_write_text
from kdkit.utils.device import autocast, resolve_device
from kdkit.utils.runlog import console, output


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register `kdkit eval`."""
    p = subparsers.add_parser(
        "eval",
        help="re-evaluate a trained model.pt on a split with the recipe's evaluator",
        description=__doc__.split("\n\n", 1)[1],
    )
    p.add_argument("checkpoint", type=Path, help="RUN/<stage>/model.pt")
    p.add_argument("--recipe", type=Path, help="recipe YAML (default: the one recorded in the checkpoint)")
    add_set_arg(p)
    p.add_argument("--split", default="test", help="split to report (default test)")
    p.add_argument("--out", type=Path, help="output folder (default: RUN/<stage>/eval-<split>)")
    p.set_defaults(func=cmd_eval)


def cmd_eval(args: argparse.Namespace) -> int:
    """`kdkit eval`: 0 evaluated, 2 bad input (checkpoint, recipe, data)."""
    network, ckpt = load_checkpoint(args.checkpoint)
    if args.recipe is not None:
        recipe = load_recipe(args.recipe, args.overrides)
    elif not isinstance(ckpt.get("recipe"), dict):
        raise UsageError(f"{args.checkpoint} records no recipe; pass --recipe RECIPE.yaml")
    else:
        recipe = parse_recipe(
            apply_overrides(ckpt["recipe"], args.overrides), f"{args.checkpoint} (its recipe)"
        )
    _check_same_input(recipe, ckpt["data"], args.checkpoint)
    out = args.out or Path(args.checkpoint).parent / f"eval-{args.split}"
    name = ckpt.get("stage") or Path(args.checkpoint).parent.name
    evaluator = make_evaluator(recipe)
    try:
        device = resolve_device(recipe.train.device)
        autocast(device, recipe.train.amp)  # fp16 without CUDA is refused here, not mid-way
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    results = evaluate_model(network, recipe, args.split, out, evaluator, name)
    seen = _seen_in_training(recipe, ckpt, args.split)
    record = {"checkpoint": str(args.checkpoint), "split": args.split, "metrics": results}
    if seen:
        record["not_held_out"] = seen
    atomic_write_text(json.dumps(record, indent=2), out / "metrics.json")
    keys = getattr(evaluator, "summary_keys", None)
    table = results_table({name: results}, args.split, keys, getattr(evaluator, "mode", "max"))
    for reason in seen:
        console.print(f"[yellow]warning:[/yellow] not a held-out result: {escape(reason)}", soft_wrap=True)
    if seen:  # the table's "strict" claims held-out data
        table.title = f"results on {args.split} — NOT HELD OUT: the model was trained on some of this data"
    output.print(table)
    console.print(f"written: {out}", markup=False)
    return 0


def _seen_in_training(recipe: Recipe, ckpt: dict[str, Any], split: str) -> list[str]:
    """Why `split` of the recipe's data is not held out from the model (one reason per line, from
    the data set's `seen_in_training(trained, evaluated, split)` hook); [] when it is, or when the
    data set has no such hook or the checkpoint records no readable recipe."""
    factory = DATASETS.get(recipe.data.dataset) if recipe.data.dataset in DATASETS else None
    check = getattr(factory, "seen_in_training", None)
    if check is None or not isinstance(ckpt.get("recipe"), dict):
        return []
    try:
        trained = parse_recipe(ckpt["recipe"], "the checkpoint's recipe")
    except RecipeError:  # written by another kdkit version: nothing to compare with
        return []
    stage = next((s for s in trained.plan if s.name == ckpt.get("stage")), None)
    return check(stage.data if stage else trained.data, recipe.data, split)


def _check_same_input(recipe: Recipe, data: dict[str, Any], checkpoint: Path) -> None:
    """The model must see its inputs as in training: same image size and normalisation."""
    for key in ("image_size", "mean", "std"):
        if getattr(recipe.data, key) != data[key]:
            raise UsageError(
                f"data.{key}: the recipe says {getattr(recipe.data, key)!r} but {checkpoint} was trained "
                f"with {data[key]!r}; evaluate with the training recipe (or --set data.{key}=...)"
            )
