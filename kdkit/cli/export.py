"""`kdkit export CHECKPOINT --format onnx|torchscript --out FILE`.

Exports the network of a `model.pt` (the student alone: no adapters, no teacher) with a dynamic
batch axis, input `input` (N, C, S, S) and two outputs, `logits` (N, classes) and `score`
(N,) = softmax(logits)[:, 1]; the preprocessing and calibration go into the file as metadata
(ONNX metadata_props, TorchScript extra file `kdkit.json`). The export is written to a temporary
file, checked against the checkpoint's network on random inputs at two batch sizes, and only
then renamed to `--out`; a mismatch is an error (exit status 1) and leaves no file.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from kdkit.deploy.export import FORMATS, TOLERANCE, VERIFY_BATCH_SIZES, export_model
from kdkit.runlog import output


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
        f"  decision threshold: {threshold}",
        markup=False,
        soft_wrap=True,
    )
    return 0
