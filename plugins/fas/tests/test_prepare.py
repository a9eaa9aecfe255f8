"""Face-location readers, cropping, and `fas prepare` (frame cache, manifest, resume, failures)."""

from __future__ import annotations

import argparse
import csv
import json
import shutil
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import pytest
from fixtures import (
    CORNER_BOX,
    FACE_XYWH,
    corrupt,
    make_casia,
    make_celeba_spoof,
    make_folder,
    make_msu,
    make_oulu,
    make_replay,
    write_corner_video,
)
from kdkit_fas import faces, mtcnn, prepare_cli
from kdkit_fas import prepare as prepare_module
from kdkit_fas.layouts import index_dataset
from kdkit_fas.plugin import fas_manifest
from kdkit_fas.prepare import PrepareError, prepare

from kdkit.cli import main
from kdkit.config.schema import DataSpec
from kdkit.data.frame_store import STORE_DIR, FrameStore
from kdkit.data.images import read_rgb
from kdkit.deploy.inputs import sample_indices


def manifest(out: Path) -> list[dict]:
    with (out / "manifest.csv").open(newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture(autouse=True)
def fresh_detector_cache():
    prepare_module._detector.cache_clear()
    yield
    prepare_module._detector.cache_clear()


# --- face-location readers and cropping ---------------------------------------------------------


def test_oulu_eye_file_gives_a_box_around_the_eyes_and_none_for_zero_rows(tmp_path: Path) -> None:
    path = tmp_path / "1_1_01_1.txt"
    path.write_text("0,100,200,140,200\r\n1,0,0,0,0\r\n")
    boxes = faces.read_oulu_eyes(path)
    assert boxes[1] is None
    x, y, w, h = boxes[0]  # d = 40: side 2.5 d, top 1 d above the eyes, centred between them
    assert (x, y, w, h) == (70, 160, 100, 100)


def test_xywh_msu_and_celeba_readers(tmp_path: Path) -> None:
    (tmp_path / "a.face").write_text("0 294 144 167 167\n1 0 0 0 0\n")
    assert faces.read_xywh(tmp_path / "a.face") == {0: (294, 144, 167, 167), 1: None}
    (tmp_path / "b.face").write_text("0, 10, 20, 110, 140, 40.5, 60.2, 80.1, 60.0\n1, 0, 0, 0, 0, 0, 0, 0, 0")
    assert faces.read_msu(tmp_path / "b.face") == {0: (10, 20, 100, 120), 1: None}
    (tmp_path / "c_BB.txt").write_text("56.0 112 112 56 0.99\n")
    assert faces.read_celeba_bb(tmp_path / "c_BB.txt", width=448, height=224) == (112, 112, 224, 56)
    (tmp_path / "d_BB.txt").write_text("10 10 2 50 0.5\n")
    assert faces.read_celeba_bb(tmp_path / "d_BB.txt", 224, 224) is None
    (tmp_path / "e.face").write_text("0 1 2\n")
    with pytest.raises(ValueError, match=r"e\.face:1: expected 5 numbers"):
        faces.read_xywh(tmp_path / "e.face")


def test_crop_face_is_square_inside_the_frame_and_takes_the_box_region() -> None:
    frame = np.zeros((100, 200, 3), np.uint8)
    frame[:, 150:] = 255  # the box sits in the bright right part
    crop = faces.crop_face(frame, (170, 80, 30, 30), scale=1.2, size=16)
    assert crop.shape == (16, 16, 3) and crop.min() == 255  # shifted inside, not padded
    whole = faces.crop_face(frame, (0, 0, 200, 100), scale=1.5, size=8)
    assert whole.shape == (8, 8, 3)  # capped at the shorter side


def test_detector_specs() -> None:
    full = faces.make_detector("full")
    face = full(np.zeros((5, 7, 3), np.uint8))
    assert (full.name, face.box, face.confidence, face.landmarks) == ("full", (0, 0, 7, 5), None, None)
    with pytest.raises(ValueError, match="unknown face detector 'bogus'; expected 'auto', 'mtcnn'"):
        faces.make_detector("bogus")
    with pytest.raises(ValueError, match="does not exist"):
        faces.make_detector("/nowhere/yunet.onnx")


def test_sample_indices_are_even_and_distinct() -> None:
    assert sample_indices(100, 4) == [12, 37, 62, 87]
    assert sample_indices(3, 8) == [0, 1, 2]


# --- prepare ------------------------------------------------------------------------------------


@pytest.mark.slow
def test_prepare_writes_frames_and_manifest_and_resumes(tmp_path: Path) -> None:
    root, out = make_oulu(tmp_path / "raw"), tmp_path / "out"
    report = prepare("oulu", root, out, protocol=4, fold=1, size=32, workers=2, progress=False)
    # 30 videos, 8 frames sampled each, frame 3 has an all-zero eye row in every eye file
    assert (report.videos, report.processed, report.skipped, report.failed) == (30, 30, 0, {})
    assert report.no_face_frames == 30 and report.frames == 210
    rows = manifest(out)
    assert len(rows) == 210 and not any(row["path"].endswith("/3.png") for row in rows)
    records = {r.video: r for r in index_dataset("oulu", root, protocol=4, fold=1)}
    for row in rows:
        record = records[row["video"]]
        assert (row["subject"], int(row["label"]), row["attack_type"], row["split"]) == (
            record.subject,
            record.label,
            record.attack_type,
            record.split,
        )
    assert cv2.imread(str(out / rows[0]["path"])).shape == (32, 32, 3)

    again = prepare("oulu", root, out, protocol=4, fold=1, size=32, workers=1, progress=False)
    assert (again.processed, again.skipped, again.frames, again.no_face_frames) == (0, 30, 210, 30)

    video_dir = out / "frames" / "test" / "1_3_36_1"
    shutil.rmtree(video_dir)
    stale = out / "frames" / "train" / "2_1_01_1"
    (stale / ".done.json").unlink()  # as if interrupted before its marker was written
    (stale / "junk.png").write_bytes(b"")
    third = prepare("oulu", root, out, protocol=4, fold=1, size=32, workers=1, progress=False)
    assert (third.processed, third.skipped) == (2, 28)
    assert manifest(out) == rows and not (stale / "junk.png").exists()

    with pytest.raises(PrepareError, match=r"other settings \(size 32 -> 24, recorded in .*prepare\.json"):
        prepare("oulu", root, out, protocol=4, fold=1, size=24, workers=1, progress=False)
    assert manifest(out) == rows  # refused: the earlier frames are untouched
    changed = prepare("oulu", root, out, protocol=4, fold=1, size=24, workers=1, progress=False, replace=True)
    assert changed.processed == 30  # replaced: the cache is rebuilt
    assert cv2.imread(str(out / rows[0]["path"])).shape == (24, 24, 3)


def test_prepare_reports_a_corrupt_video_by_name(tmp_path: Path) -> None:
    root = make_replay(tmp_path / "raw")
    bad = "client003_session01_webcam_authenticate_adverse_1"
    corrupt(root / "devel" / "real" / f"{bad}.mov")
    report = prepare("replay", root, tmp_path / "out", frames_per_video=2, size=16, workers=1, progress=False)
    assert list(report.failed) == [bad] and report.processed == 71
    assert bad in report.summary()
    videos = {row["video"] for row in manifest(tmp_path / "out")}
    assert bad not in videos and len(videos) == 71
    assert Counter(row["split"] for row in manifest(tmp_path / "out"))["dev"] == 23 * 2


def test_prepare_command_exits_1_naming_a_corrupt_video_and_prepares_the_rest(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = make_replay(tmp_path / "raw")
    bad = "client003_session01_webcam_authenticate_adverse_1"
    corrupt(root / "devel" / "real" / f"{bad}.mov")
    argv = ["fas", "prepare", "replay", "--root", str(root), "--out", str(tmp_path / "out")]
    options = ["--frames-per-video", "1", "--size", "16", "--workers", "1", "--no-progress"]
    assert main([*argv, *options]) == 1
    out, err = capsys.readouterr()
    assert f"failed: {bad}: not a readable video" in out and "1 video(s) could not be read" in out
    assert "error:" not in err  # a report, not an error: exit status 1 says some videos failed
    assert len({row["video"] for row in manifest(tmp_path / "out")}) == 71


def test_prepare_needs_a_detector_for_videos_without_face_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = make_casia(tmp_path / "raw", train_subjects=1)  # test_release/1 has no face files
    monkeypatch.setattr(faces, "haar_cascade_path", lambda: None)
    monkeypatch.setattr(mtcnn, "weights_folder", lambda: None)
    with pytest.raises(PrepareError, match=r"12 video\(s\).*no face-location file and no face detector"):
        prepare("casia", root, tmp_path / "out", workers=1, progress=False)

    prepare_module._detector.cache_clear()
    specs, scores = [], iter(np.linspace(0.5, 0.99, 24))

    class Fake:
        name = "fake"

        def __call__(self, image: np.ndarray) -> faces.Face:
            return faces.Face(FACE_XYWH, float(next(scores)))

    monkeypatch.setattr(faces, "make_detector", lambda spec: specs.append(spec) or Fake())
    report = prepare("casia", root, tmp_path / "out", frames_per_video=2, size=16, workers=1, progress=False)
    assert report.frames == 24 + 24  # frames 2 and 6 of 12 annotated train and 12 detected test videos
    # 'auto' is recorded, and used by the workers, as the detector it chose
    assert specs == ["auto", "fake"]
    assert json.loads((tmp_path / "out" / "prepare.json").read_text())["detector"] == "fake"
    rows = manifest(tmp_path / "out")
    annotated = [r for r in rows if r["split"] == "train"]
    detected = [r for r in rows if r["split"] == "test"]
    assert {(r["face_source"], r["face_score"]) for r in annotated} == {("xywh", "")}
    assert {r["face_source"] for r in detected} == {"fake"}
    # every frame its own confidence, in the order the frames were detected
    assert [float(r["face_score"]) for r in detected] == pytest.approx(np.linspace(0.5, 0.99, 24), abs=1e-6)


@pytest.mark.filterwarnings("ignore:MSU-MFSD")
def test_prepare_turns_upside_down_msu_videos_and_maps_their_boxes(tmp_path: Path) -> None:
    """The 6 upside-down MSU videos are turned by 180 degrees (not mirrored), and their `.face`
    boxes, which refer to the frames as stored, are turned with them: the crop holds the box's
    pixels of the stored frame, upright."""
    root = make_msu(tmp_path / "raw")
    x, y, w, h = CORNER_BOX
    for stem in ("real_client003_android_SD_scene01", "real_client002_android_SD_scene01"):
        write_corner_video(root / "scene01" / "real" / f"{stem}.mp4")
        rows = [f"{i}, {x}, {y}, {x + w}, {y + h}, 0, 0, 0, 0" for i in range(8)]  # stored coordinates
        (root / "scene01" / "real" / f"{stem}.face").write_text("\n".join(rows))
    prepare("msu", root, tmp_path / "out", frames_per_video=1, size=24, scale=1.0, workers=1, progress=False)
    turned = cv2.imread(str(tmp_path / "out/frames/train/real_client003_android_SD_scene01/0.png"))
    stored = cv2.imread(str(tmp_path / "out/frames/train/real_client002_android_SD_scene01/0.png"))
    # As stored, the block is the crop's top-left 12x16; turned, it is the bottom-right 12x16.
    assert stored[2:10, 2:14].mean() > 200 and stored[14:, :].mean() < 60 and stored[:, 18:].mean() < 60
    assert turned[14:22, 10:22].mean() > 200, "not turned by 180 degrees"
    assert turned[:10, :].mean() < 60 and turned[:, :6].mean() < 60, "mirrored, or the box was not turned"
    assert np.abs(turned.astype(int) - stored[::-1, ::-1]).mean() < 8  # the same pixels, turned


def test_turn_box_180_maps_a_box_of_the_stored_frame() -> None:
    frame = np.zeros((48, 64, 3), np.uint8)
    assert faces.turn_box_180((0, 0, 24, 24), frame.shape) == (40, 24, 24, 24)
    assert faces.turn_box_180((10, 5, 20, 30), frame.shape) == (34, 13, 20, 30)
    assert faces.turn_box_180(None, frame.shape) is None


@pytest.mark.slow
def test_prepare_image_sets(tmp_path: Path) -> None:
    report = prepare(
        "celeba_spoof", make_celeba_spoof(tmp_path / "c"), tmp_path / "co", size=16, workers=1, progress=False
    )
    # train/12 live has a too-small _BB box: its only frame has no face
    assert report.failed == {"train_12_live_120001": "no face in any sampled frame"}
    assert report.no_face_frames == 1 and report.frames == 11
    assert {row["path"] for row in manifest(tmp_path / "co")} >= {"frames/test/test_20_spoof_000004/0.png"}

    report = prepare(
        "folder", make_folder(tmp_path / "f"), tmp_path / "fo", frames_per_video=2, size=16, progress=False
    )
    assert report.frames == 7 * 2 + 1 and report.no_face_frames == 0


def test_prepare_rejects_bad_settings(tmp_path: Path) -> None:
    with pytest.raises(PrepareError, match="frames_per_video"):
        prepare("folder", tmp_path, tmp_path / "out", frames_per_video=0)
    with pytest.raises(PrepareError, match="unknown face detector"):
        prepare("folder", make_folder(tmp_path / "f"), tmp_path / "out", detector="bogus", progress=False)


def _args(**overrides: object) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    prepare_cli.add_arguments(parser)
    argv = [str(overrides.pop("dataset")), "--no-progress"]
    for key, value in overrides.items():
        argv += [f"--{key.replace('_', '-')}", str(value)]
    return parser.parse_args(argv)


def test_cli_returns_2_with_a_message_on_bad_input(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    command = ["fas", "prepare", "oulu", "--out", str(tmp_path / "o"), "--no-progress"]
    assert main([*command, "--root", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main([*command, "--root", str(tmp_path), "--protocol", "9"]) == 2
    assert "protocol" in capsys.readouterr().err


def test_cli_prepares_a_data_set(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root = make_folder(tmp_path / "raw")
    args = _args(dataset="folder", root=root, out=tmp_path / "o", frames_per_video=1, size=8, workers=1)
    assert prepare_cli.run(args) == 0
    assert "8 videos: 8 prepared" in capsys.readouterr().out
    assert len(manifest(tmp_path / "o")) == 8


def test_cli_store_writes_the_frame_store_training_reads(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    root, out = make_folder(tmp_path / "raw"), tmp_path / "o"
    argv = ["fas", "prepare", "folder", "--root", str(root), "--out", str(out), "--frames-per-video", "1"]
    argv += ["--size", "8", "--workers", "1", "--no-progress", "--store"]
    assert main(argv) == 0
    assert f"{out / STORE_DIR}: 8 frames of 8×8 px" in capsys.readouterr().out
    spec = DataSpec(dataset="fas_manifest", root=str(out), image_size=8)
    train = fas_manifest("train", spec)
    assert train.served_from_store == len(train) > 0  # every frame, with no decoding
    store = FrameStore(out / STORE_DIR)
    for row in manifest(out):
        assert np.array_equal(store.image(store.row(row["path"])), read_rgb(out / row["path"]))
    assert main(argv) == 0  # resumed: nothing prepared, the store kept
    assert f"{out / STORE_DIR}: up to date (8 frames)" in capsys.readouterr().out
    assert main([*argv, "--size", "12", "--replace"]) == 0  # frames rewritten: so is the store
    assert "8 frames of 12×12 px" in capsys.readouterr().out
    assert fas_manifest("train", spec).served_from_store == len(train)


def test_cli_refuses_other_settings_unless_replace_and_resumes_the_same(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    root, out = make_folder(tmp_path / "raw"), tmp_path / "o"
    argv = ["fas", "prepare", "folder", "--root", str(root), "--out", str(out), "--frames-per-video", "1"]
    argv += ["--workers", "1", "--no-progress"]
    assert main([*argv, "--size", "8"]) == 0
    before = manifest(out)
    capsys.readouterr()
    assert main([*argv, "--size", "12", "--detector", "full"]) == 2
    err = capsys.readouterr().err
    chosen = getattr(faces.make_detector("auto"), "name", "auto")  # prepare.json records what 'auto' chose
    assert f"holds frames prepared with other settings (size 8 -> 12; detector {chosen!r} -> 'full'" in err
    assert "pass --replace" in err and "Traceback" not in err
    assert manifest(out) == before and cv2.imread(str(out / before[0]["path"])).shape == (8, 8, 3)
    assert main([*argv, "--size", "8"]) == 0  # the same settings: resumed
    assert "8 videos: 0 prepared, 8 already done" in capsys.readouterr().out
    assert main([*argv, "--size", "12", "--replace"]) == 0
    assert "8 videos: 8 prepared" in capsys.readouterr().out
    assert manifest(out) == before and cv2.imread(str(out / before[0]["path"])).shape == (12, 12, 3)


def test_videos_read_without_a_face_are_not_called_unreadable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A detector that finds no face (Haar on CASIA, say) fails readable videos: the report says so
    and suggests another --detector, apart from the videos that could not be read."""
    root = make_casia(tmp_path / "raw", train_subjects=1, face_locations=False)
    corrupt(root / "test_release" / "1" / "HR_4.avi")

    class Blind:
        name = "haar"

        def __call__(self, image: np.ndarray) -> None:
            return None

    monkeypatch.setattr(faces, "make_detector", lambda spec: Blind())
    report = prepare("casia", root, tmp_path / "out", frames_per_video=1, size=16, workers=1, progress=False)
    summary = report.summary()
    assert len(report.failed) == 24 and len(report.faceless) == 23
    assert "1 video(s) could not be read" in summary
    assert "23 video(s) were read, but no face was found in any of their sampled frames" in summary
    assert "(named above; faces from: haar). Try another face detector: --detector mtcnn" in summary
