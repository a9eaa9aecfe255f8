"""`kdkit predict MODEL INPUT... [--json] [--threshold T]`: score image and video files.

MODEL is a `model.pt`, or an ONNX / TorchScript file written by `kdkit export`. INPUT is an image,
a video or a folder (its images and videos, recursively). Each input gets `score` = P(class 1)
(P(live) for face anti-spoofing; for a video, the mean over K evenly sampled frames) and a
decision at the model's calibrated threshold (or `--threshold`).

Exit status: 0 every input was scored; 1 some input could not be read or scored (each is reported
by name, the others are still scored); 2 bad arguments (model file, threshold, preparer).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from rich.markup import escape
from rich.table import Table

from kdkit.config.loading import parse_options
from kdkit.deploy.inputs import Preparer, expand_inputs, make_preparer
from kdkit.deploy.modelfile import open_model
from kdkit.deploy.predict import Prediction, Predictor
from kdkit.errors import UsageError
from kdkit.registry import RegistryError
from kdkit.utils.runlog import console, output


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register `kdkit predict`."""
    p = subparsers.add_parser(
        "predict",
        help="score image/video files with a model.pt or an exported ONNX/TorchScript model",
        description=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("model", type=Path, help="RUN/<stage>/model.pt, or a file written by `kdkit export`")
    p.add_argument("inputs", type=Path, nargs="+", metavar="INPUT", help="image, video or folder")
    p.add_argument("--json", action="store_true", help="print one JSON object per input (JSON Lines)")
    p.add_argument(
        "--threshold", type=float, help="decide at this P(class 1) instead of the calibrated threshold"
    )
    p.add_argument("--frames", type=int, default=8, help="frames sampled evenly per video (default 8)")
    p.add_argument(
        "--preparer",
        help="input preparer (default: the one the model's data set names, e.g. face_crop; "
        "'none' = the whole image)",
    )
    p.add_argument(
        "--prepare-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="option of the input preparer, e.g. detector=full (repeatable)",
    )
    p.set_defaults(func=cmd_predict)


def cmd_predict(args: argparse.Namespace) -> int:
    """`kdkit predict`: see the module docstring for the exit status."""
    if args.frames < 1:
        raise UsageError(f"--frames: expected a positive number of frames, got {args.frames}")
    model = open_model(args.model)
    meta = model.metadata
    if meta["channels"] not in (1, 3):
        raise UsageError(
            f"{args.model}: predict reads grey or RGB images; the model takes {meta['channels']}"
        )
    threshold = resolve_threshold(meta, args.threshold)
    predictor = Predictor(model, threshold, _preparer(meta, args.preparer, args.prepare_option), args.frames)
    results = [predictor(path) for path in expand_inputs(args.inputs)]
    for result in results:
        if result.error:
            console.print(f"[red]error:[/red] {escape(result.path)}: {escape(result.error)}", soft_wrap=True)
    if args.json:
        for result in results:
            print(json.dumps({k: v for k, v in asdict(result).items() if v is not None or k != "error"}))
    else:
        output.print(_table(results, predictor, args.threshold is not None))
    return 1 if any(r.error for r in results) else 0


def resolve_threshold(metadata: dict[str, Any], requested: float | None) -> float | None:
    """The decision threshold on P(class 1): `--threshold`, else the calibrated one, else 0.5.

    None for models with more than two classes, which are decided by their most probable class.
    """
    if metadata["num_classes"] != 2:
        if requested is not None:
            raise UsageError(
                f"--threshold: applies to two-class models; this one has {metadata['num_classes']} classes"
            )
        return None
    if requested is not None:
        if not 0.0 <= requested <= 1.0:
            raise UsageError(f"--threshold: expected a probability in [0, 1], got {requested}")
        return requested
    return metadata["threshold"] if metadata["threshold"] is not None else 0.5


def _preparer(metadata: dict[str, Any], name: str | None, options: list[str]) -> Preparer | None:
    recorded = name is None
    name = metadata.get("input_preparer") if recorded else name
    parsed = parse_options(options, "--prepare-option")
    if recorded:  # as the training frames were prepared; --prepare-option overrides
        parsed = {**metadata.get("input_preparer_options", {}), **parsed}
    try:
        return make_preparer(name, parsed)
    except RegistryError as exc:
        hint = (
            f" The model's data set {metadata['dataset']!r} names it: install the plugin that provides "
            "it, or pass --preparer none to score whole images."
            if recorded
            else ""
        )
        raise UsageError(f"--preparer: {exc}{hint}") from None
    except ValueError as exc:
        raise UsageError(f"--preparer: {exc}") from None


def _table(results: list[Prediction], predictor: Predictor, requested: bool) -> Table:
    meta, threshold = predictor.model.metadata, predictor.threshold
    if threshold is None:
        rule = "most probable class"
    elif requested:
        rule = f"threshold {threshold:.4g} (--threshold)"
    elif meta["threshold"] is not None:
        rule = f"calibrated threshold {threshold:.4g}"
    else:
        rule = f"threshold {threshold:.4g} (no calibration recorded)"
    table = Table(title=f"{meta.get('recipe') or ''} {meta.get('stage') or ''}: decision by {rule}".strip())
    table.add_column("input", overflow="fold")
    table.add_column("frames", justify="right")
    table.add_column(f"P({predictor.names[1]})", justify="right")
    table.add_column("decision")
    for r in results:
        if r.error:
            table.add_row(escape(r.path), "-", "-", f"[red]error: {escape(r.error)}[/red]")
        else:
            table.add_row(escape(r.path), str(r.frames), f"{r.score:.4f}", escape(str(r.decision)))
    return table
