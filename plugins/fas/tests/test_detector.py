"""Face detection: MTCNN on a real photograph (scikit-image's astronaut), 'auto' and its fallbacks,
eye levelling, per-frame confidence in the manifest, and `kdkit predict`'s crop = `prepare`'s."""

from __future__ import annotations

import csv
import json
import sys
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from fixtures import FOURCC, make_casia, make_folder, write_image
from kdkit_fas import faces, mtcnn
from kdkit_fas import prepare as prepare_module
from kdkit_fas.data import frames_from_manifest
from kdkit_fas.plugin import face_crop, prepared_crop_options
from kdkit_fas.prepare import MANIFEST_COLUMNS, prepare
from skimage import data

from kdkit.cli import main
from kdkit.config.schema import DataSpec
from kdkit.deploy.inputs import iter_video_frames

# The astronaut's face, checked by hand on the 512x512 photograph: forehead to chin, ear to ear.
ASTRONAUT_FACE = (181, 62, 268, 172)  # x1, y1, x2, y2


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """MTCNN's small convolutions gain nothing from intra-op threads, and on a busy 2-core machine
    OpenMP's hand-offs make them ~10x slower (as tests/conftest.py says for the tiny models)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def detector() -> faces.Detector:
    return faces.make_detector("mtcnn")


@pytest.fixture(scope="module")
def astronaut() -> np.ndarray:
    return cv2.cvtColor(data.astronaut(), cv2.COLOR_RGB2BGR)  # the detectors take BGR frames


def iou(box: faces.Box, corners: tuple[int, int, int, int]) -> float:
    """Intersection over union of an (x, y, w, h) box and an (x1, y1, x2, y2) one."""
    x, y, w, h = box
    a1, b1, a2, b2 = corners
    inter = max(0, min(x + w, a2) - max(x, a1)) * max(0, min(y + h, b2) - max(y, b1))
    return inter / (w * h + (a2 - a1) * (b2 - b1) - inter)


def rotated(image: np.ndarray, degrees: float) -> np.ndarray:
    """`image` turned counter-clockwise (as displayed) about its centre."""
    height, width = image.shape[:2]
    matrix = cv2.getRotationMatrix2D((width / 2, height / 2), degrees, 1.0)
    return cv2.warpAffine(image, matrix, (width, height))


def test_mtcnn_finds_the_astronaut_with_landmarks_and_confidence(
    detector: faces.Detector, astronaut: np.ndarray
) -> None:
    face = detector(astronaut)
    assert detector.name == "mtcnn" and face is not None
    assert iou(face.box, ASTRONAUT_FACE) > 0.7 and face.confidence > 0.9
    x, y, w, h = face.box
    assert face.landmarks.shape == (5, 2)
    assert ((face.landmarks >= (x, y)) & (face.landmarks <= (x + w, y + h))).all()
    (left_eye, right_eye, nose, left_mouth, right_mouth) = face.landmarks
    assert left_eye[0] < nose[0] < right_eye[0] and left_mouth[0] < right_mouth[0]
    assert max(left_eye[1], right_eye[1]) < nose[1] < min(left_mouth[1], right_mouth[1])
    assert "facenet_pytorch" not in sys.modules  # only its weight files are read, never its code


def test_no_face_in_a_cat_or_a_flat_image(detector: faces.Detector) -> None:
    assert detector(cv2.cvtColor(data.chelsea(), cv2.COLOR_RGB2BGR)) is None
    assert detector(np.full((240, 320, 3), 128, np.uint8)) is None


def test_haar_gives_the_face_and_its_level_weight(astronaut: np.ndarray) -> None:
    haar = faces.make_detector("haar")
    face = haar(astronaut)
    assert iou(face.box, ASTRONAUT_FACE) > 0.5 and face.confidence > 0 and face.landmarks is None
    assert haar(np.full((240, 320, 3), 128, np.uint8)) is None


def test_auto_is_mtcnn_then_haar_then_none(monkeypatch: pytest.MonkeyPatch) -> None:
    assert faces.make_detector("auto").name == "mtcnn"
    monkeypatch.setattr(mtcnn, "weights_folder", lambda: None)
    assert faces.make_detector("auto").name == "haar"
    monkeypatch.setattr(faces, "haar_cascade_path", lambda: None)
    assert faces.make_detector("auto") is None
    with pytest.raises(ValueError, match="no face detector is available: install the MTCNN weights"):
        face_crop()


def test_missing_mtcnn_weights_name_the_install_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mtcnn, "weights_folder", lambda: None)
    install = r"`pip install --no-deps facenet-pytorch==2\.6\.0`"
    with pytest.raises(ValueError, match=f"MTCNN weights are not installed; install them with {install}"):
        faces.make_detector("mtcnn")
    with pytest.raises(FileNotFoundError, match=install.strip("`")):
        mtcnn.MTCNN()


def test_eye_angle_does_not_depend_on_the_order_of_the_eyes() -> None:
    eyes = np.array([[10.0, 20.0], [30.0, 40.0]])
    assert faces.eye_angle(eyes) == pytest.approx(45) == faces.eye_angle(eyes[::-1])


def test_level_eyes_turns_about_the_eye_centre_and_moves_the_face_with_the_frame() -> None:
    frame = np.zeros((100, 120, 3), np.uint8)
    landmarks = np.array([[40.0, 40.0], [60.0, 50.0], [50.0, 60.0], [42.0, 70.0], [58.0, 75.0]])
    face = faces.Face((30, 30, 40, 50), 0.9, landmarks)
    turned, moved = faces.level_eyes(frame, face)
    assert turned.shape == frame.shape
    assert moved.landmarks[0, 1] == pytest.approx(moved.landmarks[1, 1])  # level
    assert moved.landmarks[:2].mean(0) == pytest.approx(landmarks[:2].mean(0))  # about the eye centre

    def distances(points: np.ndarray) -> np.ndarray:
        return np.linalg.norm(points[:, None] - points[None], axis=2)

    assert distances(moved.landmarks) == pytest.approx(distances(landmarks))  # a rotation: no scaling
    assert moved.box[2:] == (40, 50) and moved.confidence == 0.9
    plain = faces.Face((30, 30, 40, 50))
    assert faces.level_eyes(frame, plain) == (frame, plain)  # no landmarks: nothing turns


def test_alignment_levels_the_eyes_of_a_tilted_astronaut(
    detector: faces.Detector, astronaut: np.ndarray
) -> None:
    upright = faces.eye_angle(detector(astronaut).landmarks)  # the photograph's own tilt, ~2.6 degrees
    tilted = detector(rotated(astronaut, 15))
    assert faces.eye_angle(tilted.landmarks) == pytest.approx(upright - 15, abs=1)
    crop = faces.align_and_crop(rotated(astronaut, 15), tilted, scale=1.2, size=224)
    again = detector(crop)
    assert crop.shape == (224, 224, 3) and again.confidence > 0.9
    assert abs(faces.eye_angle(again.landmarks)) < 2
    assert iou(again.box, (0, 0, 224, 224)) > 0.4  # the face fills the crop (its side: 1.2 x the box's)


def write_video(path: Path, frame: np.ndarray, frames: int = 3) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    height, width = frame.shape[:2]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*FOURCC[path.suffix]), 25, (width, height))
    for _ in range(frames):
        writer.write(frame)
    writer.release()
    return path


def test_prepare_records_the_confidence_per_frame_and_predict_crops_the_same(
    tmp_path: Path, astronaut: np.ndarray
) -> None:
    root = make_casia(tmp_path / "raw", train_subjects=1)  # test_release/1 has no face files
    for video in (root / "test_release" / "1").glob("*.avi"):  # the astronaut, tilted: levelled
        write_video(video, cv2.resize(rotated(astronaut, 10), (256, 256), interpolation=cv2.INTER_AREA))
    out = tmp_path / "out"
    prepare_module._detector.cache_clear()
    prepare("casia", root, out, frames_per_video=1, size=64, scale=1.4, workers=1, progress=False)
    with (out / "manifest.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    detected = [row for row in rows if row["split"] == "test"]
    assert len(detected) == 12 and {row["face_source"] for row in detected} == {"mtcnn"}
    assert all(float(row["face_score"]) > 0.9 for row in detected)
    assert {row["face_score"] for row in rows if row["split"] == "train"} == {""}

    options = prepared_crop_options(DataSpec(dataset="fas_manifest", root=str(out)))
    assert options == {"detector": "mtcnn", "scale": 1.4, "size": 64}
    video = root / "test_release" / "1" / "HR_1.avi"
    [(_, rgb)] = iter_video_frames(video, 1)  # the frame `kdkit predict` scores
    predicted = face_crop(**options)(rgb)
    row = next(row for row in detected if row["video"].endswith("HR_1"))
    prepared = cv2.cvtColor(cv2.imread(str(out / row["path"])), cv2.COLOR_BGR2RGB)
    assert predicted.shape == prepared.shape == (64, 64, 3)
    assert np.abs(predicted.astype(int) - prepared).max() <= 1


def test_manifests_without_face_columns_still_load(tmp_path: Path) -> None:
    """Manifests written before face_source / face_score existed."""
    lines = [",".join(MANIFEST_COLUMNS)]
    for k, label in enumerate((0, 1)):
        write_image(tmp_path / f"{k}.png")
        lines.append(f"{k}.png,v{k},s{k},{label},{'live' if label else 'print'},train")
    (tmp_path / "manifest.csv").write_text("\n".join(lines) + "\n")
    records = frames_from_manifest(tmp_path, "train")
    assert [(r["path"], r["label"]) for r in records] == [("0.png", 0), ("1.png", 1)]
    assert prepared_crop_options(DataSpec(dataset="fas_manifest", root=str(tmp_path))) == {}


def test_prepare_command_takes_the_detector_and_the_scale(tmp_path: Path) -> None:
    out = tmp_path / "out"
    argv = ["fas", "prepare", "folder", "--root", str(make_folder(tmp_path / "raw", frames=1))]
    argv += ["--out", str(out), "--size", "8", "--workers", "1", "--no-progress"]
    assert main([*argv, "--detector", "full", "--scale", "1.5"]) == 0
    settings = json.loads((out / "prepare.json").read_text())
    assert (settings["detector"], settings["scale"]) == ("full", 1.5)
    assert main([*argv, "--detector", "full", "--scale", "0.5", "--replace"]) == 2  # scale must be >= 1
