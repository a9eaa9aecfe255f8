"""Image and video files → the model's input batch, as training and evaluation prepared it.

A file becomes RGB frames (an image: one; a video: K frames spread evenly, as `kdkit fas prepare`
samples them), an *input preparer* may cut each frame down to what the model was trained on (a
face crop, say; registered by plugins in `INPUT_PREPARERS`), and every frame is then resized to
the model's input size, scaled to [0, 1] and normalised with its mean/std — the evaluation
transform of kdkit's image data sets.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import v2

from kdkit.data.images import IMAGE_EXTS, ImageError, read_rgb
from kdkit.registry import INPUT_PREPARERS

VIDEO_EXTS = (".avi", ".mov", ".mp4", ".mkv", ".webm")
Preparer = Callable[[np.ndarray], "np.ndarray | None"]


class InputError(ValueError):
    """One input file that cannot be scored; `kdkit predict` reports it and goes on."""


def expand_inputs(paths: list[Path]) -> list[Path]:
    """Files as given; folders replaced by their image and video files (recursive, sorted).

    A missing path or a folder without media stays in the list, so that reading it reports it.
    """
    out: list[Path] = []
    for path in paths:
        media = (
            sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_EXTS + VIDEO_EXTS)
            if path.is_dir()
            else []
        )
        out += media or [path]
    return out


def sample_indices(count: int, k: int) -> list[int]:
    """`k` frame indices spread evenly over `count` frames (the centre of k equal segments)."""
    if count <= k:
        return list(range(count))
    return [(2 * i + 1) * count // (2 * k) for i in range(k)]


def read_frames(path: Path, k: int) -> list[np.ndarray]:
    """RGB uint8 (H, W, 3) frames of an image (one, decoded by `kdkit.data.images.read_rgb`: every image
    mode, EXIF-upright) or a video (`k` evenly spaced ones)."""
    if path.is_dir():
        raise InputError("a folder without image or video files")
    if not path.exists():
        raise InputError("no such file or folder")
    if path.suffix.lower() in VIDEO_EXTS:
        return [frame for _, frame in iter_video_frames(path, k)]
    try:
        return [read_rgb(path)]
    except ImageError as exc:
        raise InputError(exc.reason) from None


def _open_video(path: Path) -> Any:
    try:
        import cv2
    except ImportError:
        raise InputError("reading videos needs OpenCV (pip install opencv-python-headless)") from None
    capture = cv2.VideoCapture(str(path))
    if not capture.isOpened():
        raise InputError("not a readable video")
    capture.set(cv2.CAP_PROP_ORIENTATION_AUTO, 0)  # frames as stored (annotations refer to those)
    return capture


def iter_video_frames(
    path: Path, k: int, pick: Callable[[int], list[int]] | None = None
) -> Iterator[tuple[int, np.ndarray]]:
    """Yield `(index, RGB uint8 frame)` for `k` evenly spaced frames of a video (or the frames
    `pick(frame count)` names), decoding it once (plus a counting pass when the container reports
    no frame count). Frames before the last wanted one are grabbed, only wanted ones retrieved,
    and reading stops after the last one; sequential grabbing rather than seeking, which was
    slower on long-GOP H.264. Used by `kdkit predict` and by data preparation, so both see the
    same frames; raises `InputError` when nothing decodes."""
    capture = _open_video(path)  # says what to install when OpenCV is missing
    import cv2

    count = int(capture.get(cv2.CAP_PROP_FRAME_COUNT))
    if count <= 0:  # containers without a frame count: count by decoding, then start again
        while capture.grab():
            count += 1
        capture.release()
        capture = _open_video(path)
    wanted, index, found = set(pick(count) if pick else sample_indices(count, k)), 0, 0
    try:
        while wanted and index <= max(wanted) and capture.grab():
            if index in wanted:
                ok, frame = capture.retrieve()
                if ok:
                    found += 1
                    yield index, cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)
            index += 1
    finally:
        capture.release()
    if not found:
        raise InputError("no decodable frames in the video")


def make_preparer(name: str | None, options: dict[str, Any]) -> Preparer | None:
    """The registered input preparer `name` built with `options`; None (whole image) for None/'none'."""
    if name in (None, "none"):
        return None
    factory = INPUT_PREPARERS.get(name)
    try:
        return factory(**options)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"input preparer {name!r} with options {options}: {exc}") from None


def to_batch(frames: list[np.ndarray], metadata: dict[str, Any]) -> np.ndarray:
    """Frames → a float32 (N, C, S, S) batch: resize to S, scale to [0, 1], normalise.

    The same torchvision steps, in the same order, as the evaluation transform of the image
    data sets (resizing the uint8 image, then converting), so scores match evaluation's.
    """
    size = metadata["image_size"]
    transform = v2.Compose(
        [
            v2.ToImage(),
            v2.Resize((size, size), antialias=True),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(metadata["mean"], metadata["std"]),
        ]
    )
    grey = metadata["channels"] == 1
    images = [np.array(Image.fromarray(f).convert("L")) if grey else f for f in frames]
    return torch.stack([transform(image) for image in images]).numpy()
