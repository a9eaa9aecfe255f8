"""`kdkit export CHECKPOINT --format onnx|torchscript --out FILE`.

Exports the network of a `model.pt` (the student alone: no adapters, no teacher) with a dynamic
batch axis, input `input` (N, C, S, S) and two outputs, `logits` (N, classes) and `score`
(N,) = softmax(logits)[:, 1]; the preprocessing and calibration go into the file as metadata
(ONNX metadata_props, TorchScript extra file `kdkit.json`). The export is written to a temporary
file, checked against the checkpoint's network on random inputs at two batch sizes, and only
then renamed to `--out`; a mismatch is an error (exit status 1) and leaves no file. It prints
the input preparer `kdkit predict` will apply, and a warning when that cannot be built as
recorded (e.g. a cross-domain model whose data sets were cropped differently).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from rich.markup import escape

from kdkit.deploy.export import FORMATS, TOLERANCE, VERIFY_BATCH_SIZES, export_model
from kdkit.deploy.inputs import make_preparer
from kdkit.registry import RegistryError
from kdkit.utils.runlog import console, output


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register `kdkit export`."""
    p = subparsers.add_parser(
        "export",
        help="export a trained model.pt to ONNX or TorchScript (verified, with preprocessing metadata)",
        description=__doc__.split("\n\n")[1],
    )
    p.add_argument("checkpoint", type=Path, help="RUN/<stage>/model.pt")
    p.add_argument("--format", choices=FORMATS, default="onnx", help="default: onnx")
    p.add_argument("--out", type=Path, required=True, help="file to write, e.g. student.onnx")
    p.set_defaults(func=cmd_export)


def cmd_export(args: argparse.Namespace) -> int:
    """`kdkit export`: 0 exported and verified, 1 export or verification failed, 2 bad input."""
    report = export_model(args.checkpoint, args.format, args.out)  # ExportError: exit status 1
    meta = report.metadata
    size = meta["image_size"]
    threshold = "none recorded"
    if meta["threshold"] is not None:
        threshold = f"{meta['threshold']:.6g} (from {meta['threshold_source']})"
    output.print(
        f"exported {report.format}: {report.path}\n"
        f"  {report.mib:.2f} MiB, {report.parameters:,} parameters\n"
        f"  input {meta['channels']}×{size}×{size} {meta['color']}, mean {meta['mean']}, std {meta['std']}\n"
        f"  verified at batch sizes {', '.join(map(str, VERIFY_BATCH_SIZES))}: "
        f"max |score difference| {report.max_score_diff:.2e} (< {TOLERANCE:g})\n"
        f"  decision threshold: {threshold}\n"
        f"  input preparer: {_preparer_text(meta)}",
        markup=False,
        soft_wrap=True,
    )
    problem = _preparer_problem(meta)
    if problem:
        console.print(
            f"[yellow]warning:[/yellow] kdkit predict cannot prepare inputs as recorded: {escape(problem)}"
        )
    return 0


def _preparer_text(meta: dict[str, Any]) -> str:
    """The input preparer the export records, with its options (what `kdkit predict` applies)."""
    if meta["input_preparer"] is None:
        return "none (whole images)"
    return f"{meta['input_preparer']} {json.dumps(meta['input_preparer_options'])}"


def _preparer_problem(meta: dict[str, Any]) -> str | None:
    """Why the recorded preparer cannot be built as recorded (e.g. the model's data sets were
    prepared differently and a choice is needed, or a detector is not installed here), or None."""
    try:
        make_preparer(meta["input_preparer"], meta["input_preparer_options"])
    except (RegistryError, ValueError) as exc:
        return str(exc)
    return None
