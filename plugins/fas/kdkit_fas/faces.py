"""Face locations: readers for the data sets' own annotation files, detectors, alignment and cropping.

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
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import cv2
import numpy as np

from kdkit_fas import mtcnn

Box = tuple[int, int, int, int]

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


@dataclass(frozen=True, eq=False)
class Face:
    """The face a detector keeps in a frame.

    `box` (x, y, w, h) in pixels; `confidence` the detector's score for it (None when it gives
    none: the whole frame, a data set's annotation file); `landmarks` (5, 2) as (x, y) of the two
    eyes, the nose tip and the two mouth corners, or None.
    """

    box: Box
    confidence: float | None = None
    landmarks: np.ndarray | None = None


class Detector(Protocol):
    """`detector(bgr_frame) -> Face | None`: the face kept (the largest one found), or None."""

    name: str

    def __call__(self, image: np.ndarray) -> Face | None: ...


def _face(box: Box | None, confidence: float | None, landmarks: np.ndarray | None = None) -> Face | None:
    return None if box is None else Face(box, confidence, landmarks)


def _largest(found: list[Face | None]) -> Face | None:
    # a FAS frame shows one subject; the largest face is theirs, not one in the background
    return max((f for f in found if f), key=lambda face: face.box[2] * face.box[3], default=None)


def _smallest_face(image: np.ndarray) -> int:
    """The smallest face side searched for: a tenth of the shorter side, at least 16 pixels."""
    return max(16, min(image.shape[:2]) // 10)


def full_frame(image: np.ndarray) -> Box:
    """The whole image as the face box (for data that is already cropped to the face)."""
    return 0, 0, image.shape[1], image.shape[0]


class FullFrameDetector:
    """The whole frame as the face ('full'), for data already cropped to the face."""

    name = "full"

    def __call__(self, image: np.ndarray) -> Face:
        """The whole image, without a confidence."""
        return Face(full_frame(image))


def haar_cascade_path() -> Path | None:
    """The frontal-face Haar cascade shipped with this OpenCV, or None.

    opencv-python 4.x ships it under `cv2.data.haarcascades`; OpenCV 5 builds have neither the
    cascade files nor `cv2.CascadeClassifier`.
    """
    folder = getattr(getattr(cv2, "data", None), "haarcascades", None)
    path = Path(folder or ".") / "haarcascade_frontalface_default.xml"
    return path if folder and path.is_file() and hasattr(cv2, "CascadeClassifier") else None


class HaarDetector:
    """OpenCV Viola-Jones frontal-face detector ('haar'); no landmarks.

    Its confidence is the cascade's level weight: the summed stage response of the last stage,
    unbounded and comparable only between Haar detections (higher = more face-like).
    """

    name = "haar"

    def __init__(self, cascade: Path) -> None:
        self._cascade = cv2.CascadeClassifier(str(cascade))
        if self._cascade.empty():
            raise ValueError(f"cannot load Haar cascade {cascade}")

    def __call__(self, image: np.ndarray) -> Face | None:
        """Largest detected face in a BGR image, or None."""
        gray = cv2.equalizeHist(cv2.cvtColor(image, cv2.COLOR_BGR2GRAY))
        smallest = _smallest_face(gray)
        boxes, _, weights = self._cascade.detectMultiScale3(
            gray, 1.1, 5, minSize=(smallest, smallest), outputRejectLevels=True
        )
        return _largest([_face(_box(*b), float(w)) for b, w in zip(boxes, weights, strict=True)])


class YuNetDetector:
    """OpenCV's `FaceDetectorYN` with a user-supplied YuNet ONNX model (a `.onnx` path): box,
    score and five landmarks per face."""

    name = "yunet"

    def __init__(self, model: Path, score_threshold: float = 0.7) -> None:
        if not model.is_file():
            raise ValueError(f"YuNet model file {model} does not exist")
        self._detector = cv2.FaceDetectorYN.create(str(model), "", (320, 320), score_threshold)

    def __call__(self, image: np.ndarray) -> Face | None:
        """Largest detected face in a BGR image, or None."""
        self._detector.setInputSize((image.shape[1], image.shape[0]))
        _, found = self._detector.detect(image)
        # a row: x, y, w, h, five (x, y) landmarks (eyes, nose tip, mouth corners), score
        rows = [] if found is None else found
        return _largest([_face(_box(*r[:4]), float(r[14]), r[4:14].reshape(5, 2).copy()) for r in rows])


class MtcnnDetector:
    """MTCNN ('mtcnn', `kdkit_fas.mtcnn`): box, probability and five landmarks per face.

    O-Net pulls the landmarks of a tilted face towards an upright one (the astronaut photograph
    turned by 15 degrees: eye line measured 2.3 degrees short), so a face tilted by more than
    REFINE_ABOVE degrees is detected again in the frame turned upright by that first estimate,
    and the second landmarks are mapped back into the frame.
    """

    name = "mtcnn"
    REFINE_ABOVE = 3.0

    def __init__(self) -> None:
        self._cascade = mtcnn.MTCNN()

    def __call__(self, image: np.ndarray) -> Face | None:
        """Largest detected face in a BGR image, or None."""
        face = self._detect(image)
        if face is None or abs(eye_angle(face.landmarks)) <= self.REFINE_ABOVE:
            return face
        matrix = levelling_matrix(face)
        upright = self._detect(cv2.warpAffine(image, matrix, image.shape[1::-1], flags=cv2.INTER_LINEAR))
        if upright is None:
            return face
        return _moved(upright, cv2.invertAffineTransform(matrix))

    def _detect(self, image: np.ndarray) -> Face | None:
        found = self._cascade.detect(cv2.cvtColor(image, cv2.COLOR_BGR2RGB), _smallest_face(image))
        return _largest([_face(_corners(*d.box), d.confidence, d.landmarks) for d in found])


def _corners(x1: float, y1: float, x2: float, y2: float) -> Box | None:
    return _box(x1, y1, x2 - x1, y2 - y1)


# the `face_source` of frames a detector cropped (any other source is a data set's annotation file)
DETECTOR_NAMES = frozenset(d.name for d in (FullFrameDetector, HaarDetector, YuNetDetector, MtcnnDetector))

NO_DETECTOR = (
    "no face detector is available: install the MTCNN weights "
    f"(`{mtcnn.INSTALL}`), use an OpenCV 4.x that ships its Haar cascade, or pass a YuNet .onnx "
    "path; 'full' takes the whole frame, for data already cropped to the face"
)


def make_detector(spec: str = "auto") -> Detector | None:
    """Build a face detector from `spec` (docs/fas.md, "Face detection").

    'auto': the best one installed: MTCNN when its weights are (facenet-pytorch), else the Haar
    cascade when this OpenCV ships one, else None; 'mtcnn' and 'haar': that detector or an error
    saying how to get it; 'full': the whole frame; a path to a `.onnx` file: OpenCV's YuNet
    detector with that model.
    """
    if spec == "full":
        return FullFrameDetector()
    if spec == "mtcnn" or (spec == "auto" and mtcnn.weights_folder() is not None):
        if mtcnn.weights_folder() is None:
            raise ValueError(f"the MTCNN weights are not installed; install them with `{mtcnn.INSTALL}`")
        return MtcnnDetector()
    if spec in ("auto", "haar"):
        cascade = haar_cascade_path()
        if cascade is None and spec == "haar":
            raise ValueError(f"this OpenCV ({cv2.__version__}) ships no Haar face cascade")
        return HaarDetector(cascade) if cascade else None
    if spec.lower().endswith(".onnx"):
        return YuNetDetector(Path(spec).expanduser())
    raise ValueError(
        f"unknown face detector {spec!r}; expected 'auto', 'mtcnn', 'haar', 'full' or a YuNet .onnx path"
    )


# --- alignment and cropping ---------------------------------------------------------------------


def eye_angle(landmarks: np.ndarray) -> float:
    """Angle in degrees of the line from the image-left eye to the image-right eye (image axes, y
    down: positive when the right one is lower). The eyes are ordered by x, whatever order a
    detector lists them in, so the angle stays within (-90, 90)."""
    (lx, ly), (rx, ry) = sorted(tuple(map(float, eye)) for eye in landmarks[:2])
    return math.degrees(math.atan2(ry - ly, rx - lx))


def levelling_matrix(face: Face) -> np.ndarray:
    """The 2x3 affine matrix that rotates a frame about the eyes' midpoint by `eye_angle`, so the
    eyes of `face` (which must have landmarks) become level: a similarity transform of scale 1."""
    centre = face.landmarks[:2].mean(0)
    return cv2.getRotationMatrix2D((float(centre[0]), float(centre[1])), eye_angle(face.landmarks), 1.0)


def _moved(face: Face, matrix: np.ndarray) -> Face:
    """`face` mapped by a 2x3 affine matrix (a rotation): the box's centre and the landmarks move,
    the box's size is kept."""
    x, y, w, h = face.box
    points = np.r_[[(x + w / 2, y + h / 2)], face.landmarks]
    (centre_x, centre_y), *landmarks = np.c_[points, np.ones(len(points))] @ matrix.T
    box = (round(centre_x - w / 2), round(centre_y - h / 2), w, h)
    return Face(box, face.confidence, np.array(landmarks))


def level_eyes(frame: np.ndarray, face: Face) -> tuple[np.ndarray, Face]:
    """The frame rotated about the eyes' midpoint so the eyes are level, and the face moved with it.

    The rotation of `levelling_matrix`; the frame keeps its size and the corners it turns in are
    black. The box's centre and the landmarks are rotated, the box's size is kept (`_moved`). A
    face without landmarks is returned as it is, with the frame unchanged.
    """
    if face.landmarks is None:
        return frame, face
    matrix = levelling_matrix(face)
    turned = cv2.warpAffine(frame, matrix, frame.shape[1::-1], flags=cv2.INTER_LINEAR, borderValue=0)
    return turned, _moved(face, matrix)


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


def align_and_crop(frame: np.ndarray, face: Face, scale: float = 1.2, size: int = 224) -> np.ndarray:
    """The face crop of `kdkit fas prepare` and `kdkit predict`: the eyes levelled when the face has
    landmarks (`level_eyes`), then the square crop of `crop_face`. Any channel order."""
    frame, face = level_eyes(frame, face)
    return crop_face(frame, face.box, scale, size)
