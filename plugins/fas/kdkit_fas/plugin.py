"""Entry point: `register(registries)` adds the FAS datasets, evaluator, `kdkit fas` commands and
the `face_crop` input preparer of `kdkit predict`.

Found by kdkit through the `kdkit.plugins` entry-point group (see plugins/fas/pyproject.toml).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from kdkit.data import DataError
from kdkit.recipe import DataSpec
from kdkit.registry import Registries
from kdkit_fas import faces, metrics_cli, prepare_cli, synth_cli
from kdkit_fas.data import FrameDataset, frames_from_folder, frames_from_manifest
from kdkit_fas.evaluator import FasEvaluator
from kdkit_fas.synth import generate

SUBCOMMANDS = {
    "synth": (synth_cli, "write a synthetic FAS data set (live faces, print and replay attacks)"),
    "prepare": (prepare_cli, "decode a real FAS data set once into face crops and a manifest"),
    "metrics": (metrics_cli, "APCER/BPCER/ACER/HTER/EER/AUC from a scores CSV"),
}


def _root(spec: DataSpec) -> Path:
    if not spec.root:
        raise DataError(
            f"data.root: the {spec.dataset!r} data set needs a root folder; "
            "set it in the recipe or with --set data.root=/path/to/data"
        )
    return Path(spec.root).expanduser()


def _check_options(spec: DataSpec, allowed: set[str]) -> None:
    unknown = sorted(set(spec.options) - allowed)
    if unknown:
        raise DataError(
            f"data.options: unknown option(s) {unknown} for {spec.dataset!r}; valid: {sorted(allowed)}"
        )


def _frames(records: list[dict[str, Any]], root: Path, split: str, spec: DataSpec) -> FrameDataset:
    return FrameDataset(records, root, spec.image_size, spec.mean, spec.std, train=split == "train")


def fas_folder(split: str, spec: DataSpec) -> FrameDataset:
    """Frames in the plain layout `<root>/<split>/<live|spoof>/<video>/*.png` (also `kdkit fas synth`
    output). With `options.synth: {n_subjects, frames, size, seed}` the synthetic set is generated
    into `root` first when it is absent, so a recipe runs anywhere."""
    _check_options(spec, {"synth"})
    root = _root(spec)
    synth = spec.options.get("synth")
    if synth is not None and not (root / "meta.csv").exists():
        if not isinstance(synth, dict):
            raise DataError(
                f"data.options.synth: expected a mapping of `kdkit fas synth` options, got {synth!r}"
            )
        try:
            generate(root, **synth)
        except (TypeError, ValueError, FileExistsError) as exc:
            raise DataError(f"data.options.synth: {exc}") from None
    if not root.is_dir():
        raise DataError(
            f"data.root: {root} does not exist (expected a folder in the layout "
            "<split>/<live|spoof>/<video>/*.png, e.g. made by `kdkit fas synth --out DIR`)"
        )
    return _frames(frames_from_folder(root, split), root, split, spec)


def fas_manifest(split: str, spec: DataSpec) -> FrameDataset:
    """Face crops written by `kdkit fas prepare` (its `manifest.csv` under `root`)."""
    _check_options(spec, set())
    root = _root(spec)
    return _frames(frames_from_manifest(root, split), root, split, spec)


# What `kdkit predict` reads from a data set factory: the label names (1 = bona fide) and how a
# raw image becomes a frame like the data set's own. fas_folder frames are used as they are.
CLASS_NAMES = ("attack", "live")
fas_folder.class_names = CLASS_NAMES  # type: ignore[attr-defined]
fas_manifest.class_names = CLASS_NAMES  # type: ignore[attr-defined]
fas_manifest.input_preparer = "face_crop"  # type: ignore[attr-defined]


def face_crop(
    detector: str = "auto", scale: float = 1.2, size: int = 224
) -> Callable[[np.ndarray], np.ndarray | None]:
    """The face crop of `kdkit fas prepare` (same detector, scale and size defaults) for `kdkit predict`:
    RGB frame → RGB face crop, or None when no face is found. `detector='full'` keeps the whole frame."""
    find = faces.make_detector(detector)
    if find is None:
        raise ValueError(
            f"this OpenCV ({cv2.__version__}) ships no Haar face cascade: pass detector=<YuNet .onnx path>, "
            "or detector=full for images already cropped to the face"
        )

    def prepare(rgb: np.ndarray) -> np.ndarray | None:
        box = find(cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))  # OpenCV's detectors take BGR
        return None if box is None else faces.crop_face(rgb, box, scale, size)

    return prepare


def add_fas_command(subparsers: argparse._SubParsersAction) -> None:
    """`kdkit fas {synth,prepare,metrics}`."""
    fas = subparsers.add_parser("fas", help="face anti-spoofing tools (synthetic data, preparation, metrics)")
    group = fas.add_subparsers(dest="fas_command", required=True, metavar="FAS_COMMAND")
    for name, (module, text) in SUBCOMMANDS.items():
        parser = group.add_parser(name, help=text, description=text)
        module.add_arguments(parser)
        parser.set_defaults(func=module.run)


def register(registries: Registries) -> None:
    """Register everything the FAS plugin provides."""
    registries.datasets.add("fas_folder", fas_folder)
    registries.datasets.add("fas_manifest", fas_manifest)
    registries.evaluators.add("fas", FasEvaluator)
    registries.commands.add("fas", add_fas_command)
    registries.input_preparers.add("face_crop", face_crop)
