"""Face locations: readers for the data sets' own annotation files, detectors, and cropping.

A box is `(x, y, w, h)` in pixels (top-left corner, width, height) of the frame as stored on
disk; `None` means no face was found in that frame. Formats (docs/fas.md, "Data sets"):

- 'oulu_eyes'  OULU-NPU `<video>.txt`: `frame,x1,y1,x2,y2` eye centres, all-zero row = none;
- 'xywh'       Replay-Attack / CASIA (Bob) `.face`: `frame x y w h`, all-zero row = none;
- 'msu'        MSU-MFSD `.face`: `frame, x1, y1, x2, y2, leye_x, leye_y, reye_x, reye_y`
               with (x2, y2) the bottom-right corner;
- 'celeba_bb'  CelebA-Spoof `<image>_BB.txt`: first line `x y w h score` in 224x224 coordinates.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np

Box = tuple[int, int, int, int]
Detector = Callable[[np.ndarray], "Box | None"]

# Face box from the two eye centres, in units of the inter-ocular distance d: a square of side
# 2.5 d centred horizontally between the eyes, its top 1.0 d above them, so the eyes sit at 40 %
# of the height and the chin (about 1.5 d below the eyes) is inside.
EYE_BOX_SIDE = 2.5
EYE_BOX_ABOVE = 1.0


def _rows(path: Path, columns: int) -> list[list[float]]:
    """Numeric rows (comma and/or space separated) with at least `columns` values each."""
    rows = []
    for number, line in enumerate(Path(path).read_text(encoding="utf-8-sig").splitlines(), 1):
        if not line.strip():
            continue
        try:
            values = [float(v) for v in re.split(r"[,\s]+", line.strip())]
        except ValueError:
            values = []
        if len(values) < columns:
            raise ValueError(f"{path}:{number}: expected {columns} numbers per line, got {line.strip()!r}")
        rows.append(values)
    return rows


def _box(x: float, y: float, w: float, h: float) -> Box | None:
    return (round(x), round(y), round(w), round(h)) if w >= 1 and h >= 1 else None


def eyes_to_box(x1: float, y1: float, x2: float, y2: float) -> Box | None:
    """Square face box from two eye centres (geometry: EYE_BOX_SIDE, EYE_BOX_ABOVE)."""
    distance = math.hypot(x2 - x1, y2 - y1)  # in-plane tilt does not shrink the box
    if distance < 1:
        return None
    side = EYE_BOX_SIDE * distance
    centre_x, centre_y = (x1 + x2) / 2, (y1 + y2) / 2
    return _box(centre_x - side / 2, centre_y - EYE_BOX_ABOVE * distance, side, side)


def read_oulu_eyes(path: Path) -> dict[int, Box | None]:
    """OULU-NPU eye file → {frame: box}; all-zero rows (failed detection) map to None."""
    return {
        int(r[0]): None if not any(r[1:5]) else eyes_to_box(*r[1:5])
        for r in _rows(path, 5)  # frame, x1, y1, x2, y2
    }


def read_xywh(path: Path) -> dict[int, Box | None]:
    """Replay-Attack / CASIA `.face` (`frame x y w h`) → {frame: box}; zero rows map to None."""
    return {int(r[0]): _box(*r[1:5]) for r in _rows(path, 5)}


def read_msu(path: Path) -> dict[int, Box | None]:
    """MSU-MFSD `.face` (`frame, x1, y1, x2, y2, eyes...`) → {frame: box}; zero rows map to None."""
    return {int(r[0]): _box(r[1], r[2], r[3] - r[1], r[4] - r[2]) for r in _rows(path, 5)}


def turn_box_180(box: Box | None, shape: tuple[int, ...]) -> Box | None:
    """The box a frame of `shape` (height, width, ...) turned by 180 degrees has where `box` had
    its content: (W - x - w, H - y - h, w, h)."""
    if box is None:
        return None
    x, y, w, h = box
    return shape[1] - x - w, shape[0] - y - h, w, h


def read_celeba_bb(path: Path, width: int, height: int) -> Box | None:
    """CelebA-Spoof `_BB.txt` → box in the real image of size `width` x `height`, clamped.

    Boxes narrower or lower than 3 (in 224 coordinates) are treated as no detection.
    """
    x, y, w, h = _rows(path, 4)[0][:4]
    if w < 3 or h < 3:
        return None
    sx, sy = width / 224, height / 224
    left, top = min(max(x * sx, 0), width - 1), min(max(y * sy, 0), height - 1)
    right, bottom = min((x + w) * sx, width), min((y + h) * sy, height)
    return _box(left, top, right - left, bottom - top)


FRAME_READERS: dict[str, Callable[[Path], dict[int, Box | None]]] = {
    "oulu_eyes": read_oulu_eyes,
    "xywh": read_xywh,
    "msu": read_msu,
}


def read_face_track(path: Path, face_format: str) -> dict[int, Box | None]:
    """Per-frame boxes of a video's face-location file in `face_format` (a key of FRAME_READERS)."""
    if face_format not in FRAME_READERS:
        raise ValueError(f"unknown face-location format {face_format!r}; expected {', '.join(FRAME_READERS)}")
    return FRAME_READERS[face_format](path)


# --- detectors ----------------------------------------------------------------------------------


def _largest(boxes: np.ndarray | tuple) -> Box | None:
    if boxes is None or len(boxes) == 0:
        return None
    x, y, w, h = max((tuple(b[:4]) for b in boxes), key=lambda b: b[2] * b[3])
    return _box(x, y, w, h)


def full_frame(image: np.ndarray) -> Box:
    """The whole image as the face box (for data that is already cropped to the face)."""
    return 0, 0, image.shape[1], image.shape[0]


def haar_cascade_path() -> Path | None:
    """The frontal-face Haar cascade shipped with this OpenCV, or None.

    opencv-python 4.x ships it under `cv2.data.haarcascades`; OpenCV 5 builds have neither the
    cascade files nor `cv2.CascadeClassifier`.
    """
    folder = getattr(getattr(cv2, "data", None), "haarcascades", None)
    path = Path(folder or ".") / "haarcascade_frontalface_default.xml"
    return path if folder and path.is_file() and hasattr(cv2, "CascadeClassifier") else None


class HaarDetector:
    """OpenCV Viola-Jones frontal-face detector; returns the largest face."""

    def __init__(self, cascade: Path) -> None:
        self._cascade = cv2.CascadeClassifier(str(cascade))
        if self._cascade.empty():
            raise ValueError(f"cannot load Haar cascade {cascade}")

    def __call__(self, image: np.ndarray) -> Box | None:
        """Largest detected face in a BGR image, or None."""
        gray = cv2.equalizeHist(cv2.cvtColor(image, cv2.COLOR_BGR2GRAY))
        smallest = max(16, min(gray.shape) // 10)
        return _largest(self._cascade.detectMultiScale(gray, 1.1, 5, minSize=(smallest, smallest)))


class YuNetDetector:
    """OpenCV's `FaceDetectorYN` with a user-supplied YuNet ONNX model; returns the largest face."""

    def __init__(self, model: Path, score_threshold: float = 0.7) -> None:
        if not model.is_file():
            raise ValueError(f"YuNet model file {model} does not exist")
        self._detector = cv2.FaceDetectorYN.create(str(model), "", (320, 320), score_threshold)

    def __call__(self, image: np.ndarray) -> Box | None:
        """Largest detected face in a BGR image, or None."""
        self._detector.setInputSize((image.shape[1], image.shape[0]))
        _, faces = self._detector.detect(image)
        return _largest(faces)


def make_detector(spec: str = "auto") -> Detector | None:
    """Build a face detector from `spec`.

    'auto': the Haar cascade when this OpenCV ships one, else None (no detector available);
    'haar': the Haar cascade or an error; 'full': the whole frame (pre-cropped data);
    a path to a `.onnx` file: OpenCV's YuNet detector with that model.
    """
    if spec == "full":
        return full_frame
    if spec in ("auto", "haar"):
        cascade = haar_cascade_path()
        if cascade is None and spec == "haar":
            raise ValueError(f"this OpenCV ({cv2.__version__}) ships no Haar face cascade")
        return HaarDetector(cascade) if cascade else None
    if spec.lower().endswith(".onnx"):
        return YuNetDetector(Path(spec).expanduser())
    raise ValueError(f"unknown face detector {spec!r}; expected 'auto', 'haar', 'full' or a YuNet .onnx path")


# --- cropping -----------------------------------------------------------------------------------


def crop_face(frame: np.ndarray, box: Box, scale: float = 1.2, size: int = 224) -> np.ndarray:
    """Square crop of side `scale * max(w, h)` centred on `box`, moved inside the frame, resized.

    The square is shifted (not padded) to stay inside the frame and shrunk to the frame's
    shorter side when larger, so the face is never distorted.
    """
    height, width = frame.shape[:2]
    x, y, w, h = box
    side = min(max(2, round(max(w, h) * scale)), width, height)
    left = min(max(round(x + w / 2 - side / 2), 0), width - side)
    top = min(max(round(y + h / 2 - side / 2), 0), height - side)
    crop = frame[top : top + side, left : left + side]
    interpolation = cv2.INTER_AREA if side > size else cv2.INTER_LINEAR
    return cv2.resize(crop, (size, size), interpolation=interpolation)
