"""The model files kdkit deploys — a training checkpoint (`model.pt`) or its ONNX / TorchScript
export — behind one interface: `open_model(path)` returns their metadata and a function from an
input batch to the outputs `logits` and `score` (= softmax(logits)[:, 1], P(class 1)).

The metadata (docs/deployment.md) is everything a deployment needs besides the weights: input
size, channels, mean/std, label names, the input preparer, the calibrated threshold, provenance.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from kdkit import __version__
from kdkit.config.schema import ModelSpec
from kdkit.evaluation.calibration import find_calibration
from kdkit.models.factory import build_model, load_state_dict_checked
from kdkit.plugins import load_plugins
from kdkit.registry import DATASETS
from kdkit.utils.checkpoint import CheckpointError, file_sha256, load_file

METADATA_FORMAT = 1  # version of the metadata layout below
TORCHSCRIPT_METADATA = "kdkit.json"  # the TorchScript `_extra_files` entry holding the metadata
INPUT_NAME, OUTPUT_NAMES = "input", ("logits", "score")

Outputs = dict[str, np.ndarray]  # 'logits' (N, C) and 'score' (N,), float32


@dataclass
class DeployedModel:
    """An opened model file: what it is, its metadata, and `run(batch) -> {'logits', 'score'}`."""

    path: Path
    kind: str  # 'checkpoint' | 'onnx' | 'torchscript'
    metadata: dict[str, Any]
    run: Callable[[np.ndarray], Outputs]


class ScoredNetwork(nn.Module):
    """A classifier with a second output: `score` = softmax(logits)[:, 1], P(class 1)."""

    def __init__(self, network: nn.Module) -> None:
        super().__init__()
        self.network = network

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`(logits (N, C), score (N,))`."""
        logits = self.network(images)
        return logits, torch.softmax(logits, dim=1)[:, 1]


# ------------------------------------------------------------------------------ checkpoints
def load_checkpoint(path: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """The network of a kdkit `model.pt` (rebuilt from its `spec`, in eval mode) and the raw file."""
    path = Path(path)
    load_plugins()  # the spec may name a plugin's model, the data a plugin's data set
    ckpt = load_file(path)
    if not isinstance(ckpt, dict) or ckpt.get("kind") != "model" or not {"spec", "data"} <= ckpt.keys():
        kind = ckpt.get("kind") if isinstance(ckpt, dict) else type(ckpt).__name__
        raise CheckpointError(
            f"{path}: not a kdkit model checkpoint (kind {kind!r}; expected a RUN/<stage>/model.pt "
            "written by `kdkit run`, with 'spec' and 'data' entries; last.pt is resume state)"
        )
    try:
        spec = ModelSpec(**ckpt["spec"])
    except TypeError as exc:
        raise CheckpointError(f"{path}: unreadable model spec {ckpt['spec']!r} ({exc})") from None
    network = build_model(dataclasses.replace(spec, weights=None, pretrained=False), where=f"{path}: spec")
    load_state_dict_checked(network, ckpt["model"], str(path))
    return network.eval(), ckpt


def checkpoint_metadata(path: str | Path, network: nn.Module, ckpt: dict[str, Any]) -> dict[str, Any]:
    """The deployment metadata of a checkpoint (see docs/deployment.md for every key)."""
    data = ckpt["data"]
    size = int(data["image_size"])
    channels = _input_channels(network, len(data["mean"]))
    try:
        with torch.no_grad():
            logits = network(torch.zeros(1, channels, size, size))
    except RuntimeError as exc:
        raise CheckpointError(
            f"{path}: the network does not take the recorded input {channels}×{size}×{size} ({exc})"
        ) from None
    if logits.ndim != 2 or logits.shape[1] < 2:
        raise CheckpointError(
            f"{path}: expected a classifier with (N, C >= 2) logits, got shape {tuple(logits.shape)}"
        )
    factory = DATASETS.get(data["dataset"]) if data["dataset"] in DATASETS else None
    calibration = find_calibration(Path(path))
    return {
        "kdkit_format": METADATA_FORMAT,
        "kdkit_version": __version__,
        "recipe": (ckpt.get("recipe") or {}).get("name"),
        "stage": ckpt.get("stage"),
        "model": ckpt["spec"]["name"],
        "epoch": ckpt.get("epoch"),
        "source_sha256": file_sha256(path),
        "dataset": data["dataset"],
        "image_size": size,
        "channels": channels,
        "color": {1: "L", 3: "RGB"}.get(channels),  # PIL mode of the input image; None: neither
        "mean": _per_channel(data["mean"], channels),
        "std": _per_channel(data["std"], channels),
        "num_classes": int(logits.shape[1]),
        "class_names": list(getattr(factory, "class_names", [])) or None,
        "score": "softmax(logits)[:, 1]",
        "input_preparer": getattr(factory, "input_preparer", None),
        "input_preparer_options": data.get("input_preparer_options") or {},
        "threshold": calibration.threshold if calibration else None,
        "thresholds": calibration.thresholds if calibration else {},
        "threshold_source": calibration.source if calibration else None,
    }


def _input_channels(network: nn.Module, fallback: int) -> int:
    """Input channels of the first convolution (a ViT's patch embedding), else `fallback`."""
    return next((m.in_channels for m in network.modules() if isinstance(m, nn.Conv2d)), fallback)


def _per_channel(values: list[float], channels: int) -> list[float]:
    """Mean/std per input channel: one value is repeated, extra values are dropped (as `digits` does)."""
    values = [float(v) for v in values]
    return values * channels if len(values) == 1 else values[:channels]


# ------------------------------------------------------------------------------ any model file
def open_model(path: str | Path, kind: str | None = None) -> DeployedModel:
    """Open a checkpoint, an ONNX file or a TorchScript file (`kind` None: decided from the file)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found")
    kind = kind or _kind_of(path)
    if kind == "onnx":
        return _open_onnx(path)
    if kind == "torchscript":
        return _open_torchscript(path)
    network, ckpt = load_checkpoint(path)
    return DeployedModel(path, "checkpoint", checkpoint_metadata(path, network, ckpt), _torch_runner(network))


def _kind_of(path: Path) -> str:
    if path.suffix.lower() == ".onnx":
        return "onnx"
    # TorchScript archives are zip files with a code/ folder; kdkit checkpoints have none.
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            if any("/code/" in name for name in archive.namelist()):
                return "torchscript"
    return "checkpoint"


def _torch_runner(module: nn.Module) -> Callable[[np.ndarray], Outputs]:
    scored = module if isinstance(module, torch.jit.ScriptModule) else ScoredNetwork(module).eval()

    def run(batch: np.ndarray) -> Outputs:
        with torch.no_grad():
            logits, score = scored(torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32)))
        return {"logits": logits.float().numpy(), "score": score.float().numpy()}

    return run


def _open_torchscript(path: Path) -> DeployedModel:
    extra = {TORCHSCRIPT_METADATA: ""}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # TorchScript is deprecated, still supported
            module = torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
    except RuntimeError as exc:
        raise CheckpointError(
            f"{path}: not a loadable TorchScript file ({str(exc).splitlines()[0]})"
        ) from None
    if not extra[TORCHSCRIPT_METADATA]:
        raise CheckpointError(
            f"{path}: a TorchScript file without kdkit metadata; export it with `kdkit export`"
        )
    return DeployedModel(path, "torchscript", json.loads(extra[TORCHSCRIPT_METADATA]), _torch_runner(module))


def _open_onnx(path: Path) -> DeployedModel:
    import onnxruntime

    try:
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own exception types for unreadable graphs
        raise CheckpointError(f"{path}: not a loadable ONNX model ({str(exc).splitlines()[0]})") from None
    props = session.get_modelmeta().custom_metadata_map
    if "kdkit_format" not in props:
        raise CheckpointError(f"{path}: an ONNX model without kdkit metadata; export it with `kdkit export`")
    metadata = {key: _json_or_text(value) for key, value in props.items()}

    def run(batch: np.ndarray) -> Outputs:
        feed = {INPUT_NAME: np.ascontiguousarray(batch, dtype=np.float32)}
        return dict(zip(OUTPUT_NAMES, session.run(list(OUTPUT_NAMES), feed), strict=True))

    return DeployedModel(path, "onnx", metadata, run)


def _json_or_text(value: str) -> Any:
    """kdkit writes every metadata value as JSON; other tools' entries stay text."""
    try:
        return json.loads(value)
    except ValueError:
        return value
