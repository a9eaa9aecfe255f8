"""Export a trained `model.pt` to ONNX or TorchScript, verified against the checkpoint.

The network of a `model.pt` (the student alone: no adapters, no teacher) gets a dynamic batch
axis, input `input` (N, C, S, S) and two outputs, `logits` (N, classes) and `score` (N,) =
softmax(logits)[:, 1]; the preprocessing and calibration go into the file as metadata (ONNX
metadata_props, TorchScript extra file `kdkit.json`). The export is written to a temporary file,
checked on random inputs at two batch sizes, and only then renamed: a mismatch is an
`ExportError` and leaves no file. `kdkit export` (kdkit.cli.export) is its command.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kdkit.deploy.modelfile import (
    INPUT_NAME,
    OUTPUT_NAMES,
    TORCHSCRIPT_METADATA,
    ScoredNetwork,
    checkpoint_metadata,
    load_checkpoint,
    open_model,
)
from kdkit.errors import RunFailed, UsageError
from kdkit.models.factory import count_parameters
from kdkit.utils.checkpoint import atomic_path

FORMATS = ("onnx", "torchscript")
# `kdkit predict` tells the formats apart by the extension (.onnx) and the archive's contents
EXTENSIONS = {"onnx": (".onnx",), "torchscript": (".pt", ".pth", ".ts", ".torchscript")}
TOLERANCE = 1e-4  # max |score difference| allowed between the export and the checkpoint
VERIFY_BATCH_SIZES = (1, 3)
ONNX_OPSET = 17


class ExportError(RunFailed):
    """An export that failed, or whose outputs or metadata differ from the checkpoint's."""


@dataclass
class ExportReport:
    """What `export_model` wrote and measured."""

    path: Path
    format: str
    mib: float  # file size
    parameters: int
    max_score_diff: float  # worst |score(export) - score(checkpoint)| over the verification batches
    metadata: dict[str, Any]


def export_model(checkpoint: Path, fmt: str, out: Path) -> ExportReport:
    """Export, verify and atomically write the network of `checkpoint` (see the module docstring)."""
    if fmt not in FORMATS:
        raise UsageError(f"--format: expected one of {', '.join(FORMATS)}, got {fmt!r}")
    out = Path(out)
    if out.suffix.lower() not in EXTENSIONS[fmt]:
        raise UsageError(
            f"--out {out}: {fmt} files end in {' or '.join(EXTENSIONS[fmt])}, not "
            f"{out.suffix or '(none)'!r}; rename it or choose the other --format"
        )
    if out.exists() and out.resolve() == Path(checkpoint).resolve():
        raise UsageError(f"--out {out}: is the checkpoint being exported; choose another file name")
    if fmt == "onnx" and not all(importlib.util.find_spec(m) for m in ("onnx", "onnxruntime")):
        raise UsageError("--format onnx needs onnx and onnxruntime: pip install 'kdkit[export]'")
    network, ckpt = load_checkpoint(checkpoint)
    metadata = checkpoint_metadata(checkpoint, network, ckpt)
    size, channels = metadata["image_size"], metadata["channels"]
    example = torch.zeros(2, channels, size, size)
    with atomic_path(out) as tmp:
        try:
            WRITERS[fmt](ScoredNetwork(network).eval(), example, tmp, metadata)
        except Exception as exc:  # the exporters raise many error types; all mean "no export"
            raise ExportError(
                f"{out}: {fmt} export of {metadata['model']} failed, nothing written: {exc}"
            ) from exc
        try:
            diff = verify_export(network, tmp, fmt, metadata)
        except ExportError as exc:  # it names the temporary file, which is removed
            raise ExportError(
                f"{out}: export failed its check, nothing written: " + str(exc).replace(f"{tmp}: ", "")
            ) from None
    return ExportReport(out, fmt, out.stat().st_size / 2**20, count_parameters(network), diff, metadata)


def verify_export(network: nn.Module, path: Path, fmt: str, metadata: dict[str, Any]) -> float:
    """Run the exported file and the network on the same random batches (two batch sizes).

    Returns the largest |score difference|; raises `ExportError` when it reaches `TOLERANCE`,
    when an output has the wrong shape, or when the metadata read back differs.
    """
    exported = open_model(path, kind=fmt)
    if exported.metadata != metadata:
        raise ExportError(f"{path}: the metadata read back differs from the metadata written")
    size, channels = metadata["image_size"], metadata["channels"]
    generator = torch.Generator().manual_seed(0)
    worst = 0.0
    for n in VERIFY_BATCH_SIZES:
        batch = torch.randn(n, channels, size, size, generator=generator)
        with torch.no_grad():
            expected = torch.softmax(network(batch), dim=1)[:, 1].numpy()
        outputs = exported.run(batch.numpy())
        if outputs["score"].shape != (n,) or outputs["logits"].shape != (n, metadata["num_classes"]):
            raise ExportError(
                f"{path}: batch size {n} gave outputs of shape {outputs['logits'].shape} and "
                f"{outputs['score'].shape}; expected ({n}, {metadata['num_classes']}) and ({n},)"
            )
        diff = float(abs(outputs["score"] - expected).max())
        if not diff < TOLERANCE:  # also catches NaN
            raise ExportError(
                f"{path}: at batch size {n} the exported scores differ from the checkpoint's by up to "
                f"{diff:.3g} (tolerance {TOLERANCE:g})"
            )
        worst = max(worst, diff)
    return worst


@contextlib.contextmanager
def _quiet_tracing() -> Iterator[None]:
    """Silence the tracer's warnings (shape asserts become constants, deprecation notices):
    the verification at two batch sizes is what tells whether the export generalises."""
    with warnings.catch_warnings():
        for category in (torch.jit.TracerWarning, DeprecationWarning, FutureWarning, UserWarning):
            warnings.simplefilter("ignore", category)
        yield


def write_onnx(scored: nn.Module, example: torch.Tensor, path: Path, metadata: dict[str, Any]) -> None:
    """ONNX (opset 17, dynamic batch axis) with every metadata value JSON-encoded in metadata_props."""
    import onnx

    batch_axis = {name: {0: "batch"} for name in (INPUT_NAME, *OUTPUT_NAMES)}
    with _quiet_tracing():
        torch.onnx.export(
            scored,
            (example,),
            str(path),
            input_names=[INPUT_NAME],
            output_names=list(OUTPUT_NAMES),
            dynamic_axes=batch_axis,
            opset_version=ONNX_OPSET,
            dynamo=False,  # the TorchScript-based exporter: no onnxscript dependency
        )
    model = onnx.load(str(path))
    onnx.helper.set_model_props(model, {key: json.dumps(value) for key, value in metadata.items()})
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def write_torchscript(scored: nn.Module, example: torch.Tensor, path: Path, metadata: dict[str, Any]) -> None:
    """A traced TorchScript module with the metadata as the extra file `kdkit.json`."""
    with _quiet_tracing():
        traced = torch.jit.trace(scored, example)
        torch.jit.save(traced, str(path), _extra_files={TORCHSCRIPT_METADATA: json.dumps(metadata)})


WRITERS = {"onnx": write_onnx, "torchscript": write_torchscript}
