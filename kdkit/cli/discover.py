"""`kdkit taps MODEL` and `kdkit plugins`: what a model offers to hook, what plugins added."""

from __future__ import annotations

import argparse

from rich.table import Table

from kdkit.config.loading import parse_options
from kdkit.config.schema import ModelSpec
from kdkit.errors import UsageError
from kdkit.models.factory import ModelError, build_model
from kdkit.plugins import load_plugins
from kdkit.utils.runlog import output


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register `kdkit taps` and `kdkit plugins`."""
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


def cmd_taps(args: argparse.Namespace) -> int:
    """`kdkit taps MODEL`: hookable paths and output shapes for one forward pass."""
    import torch

    from kdkit.distill.taps import list_taps

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
    for kind in (
        "models",
        "datasets",
        "evaluators",
        "adapters",
        "feature_criteria",
        "logit_losses",
        "group_methods",
        "teacher_combiners",
        "commands",
    ):
        output.print(f"{kind}: {', '.join(getattr(regs, kind).names())}", markup=False, soft_wrap=True)
    return 0
