"""Deploying a FAS student: ONNX export, `kdkit predict` on frames and a video, `kdkit eval`.

The done-when: the exported student's P(live) for a test frame equals the evaluator's score for
that frame (scores_test.csv) within 1e-4, and its decision uses the dev-EER threshold of the run.
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
from kdkit_fas.data import frames_from_folder
from kdkit_fas.plugin import face_crop
from test_plugin import DemoRun, tiny_demo_run

from kdkit.cli import main
from kdkit.deploy.inputs import sample_indices
from kdkit.deploy.modelfile import open_model
from kdkit.registry import DATASETS, INPUT_PREPARERS
from kdkit.utils.runlog import console


@pytest.fixture(autouse=True)
def wide_console(monkeypatch: pytest.MonkeyPatch) -> None:
    """Wide enough that rich never wraps a file name the tests look for."""
    monkeypatch.setattr(console, "_width", 250)


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> DemoRun:
    """The tiny kdfas-demo run test_plugin.py reads too."""
    return tiny_demo_run(tmp_path_factory)


@pytest.fixture(scope="module")
def run(demo_run: DemoRun) -> Path:
    """Its run folder (teacher, distilled student, test evaluation); the data sets are beside it."""
    return demo_run.root / "run"


@pytest.fixture(scope="module")
def student_onnx(tmp_path_factory: pytest.TempPathFactory, run: Path) -> Path:
    """The distilled student exported to ONNX."""
    out = tmp_path_factory.mktemp("fas-onnx") / "student.onnx"
    assert main(["export", str(run / "student_kd" / "model.pt"), "--out", str(out)]) == 0
    return out


def _evaluator_scores(run: Path) -> list[tuple[Path, float, str]]:
    """(frame path, evaluator's P(live), video) for every test frame, in the evaluator's order."""
    root = run.parent / "synth"
    with open(run / "test" / "student_kd" / "scores_test.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    records = frames_from_folder(root, "test")
    assert [r["video"] for r in records] == [row["video"] for row in rows]
    return [(root / r["path"], float(row["score"]), r["video"]) for r, row in zip(records, rows, strict=True)]


def _predict_json(args: list[str], capsys: pytest.CaptureFixture[str]) -> dict[str, dict]:
    assert main(["predict", *args, "--json"]) == 0
    return {row["path"]: row for row in map(json.loads, capsys.readouterr().out.splitlines())}


def test_export_records_the_dev_eer_threshold_and_the_label_convention(run: Path, student_onnx: Path) -> None:
    meta = open_model(student_onnx).metadata
    reported = json.loads((run / "test" / "student_kd" / "metrics_test.json").read_text())
    assert meta["threshold"] == pytest.approx(reported["video"]["threshold"])
    assert meta["thresholds"]["frame_threshold"] == pytest.approx(reported["frame"]["threshold"])
    assert meta["threshold_source"] == str((run / "test" / "student_kd" / "calibration.json").resolve())
    assert meta["class_names"] == ["attack", "live"] and meta["score"] == "softmax(logits)[:, 1]"
    assert meta["input_preparer"] is None  # fas_folder frames are face crops already: no crop
    assert (meta["image_size"], meta["mean"], meta["std"]) == (32, [0.5] * 3, [0.5] * 3)


def test_onnx_scores_match_the_evaluator_on_test_frames(
    run: Path, student_onnx: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    frames = _evaluator_scores(run)
    chosen = {video: (path, score) for path, score, video in frames}  # the last frame of every video
    assert len(chosen) >= 3
    rows = _predict_json([str(student_onnx), *(str(p) for p, _ in chosen.values())], capsys)
    threshold = open_model(student_onnx).metadata["threshold"]
    for path, score in chosen.values():
        row = rows[str(path)]
        assert abs(row["score"] - score) < 1e-4, path
        assert row["decision"] == ("live" if row["score"] >= threshold else "attack")
        assert row["threshold"] == threshold and row["frames"] == 1


def test_a_video_is_the_mean_of_its_sampled_frames(
    run: Path, student_onnx: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    video = next(video for _, _, video in _evaluator_scores(run) if "live" in video)
    sources = [path for path, _, v in _evaluator_scores(run) if v == video]
    clip = tmp_path / "clip.avi"
    writer = cv2.VideoWriter(str(clip), cv2.VideoWriter_fourcc(*"MJPG"), 10, (32, 32))
    for i in range(6):
        writer.write(cv2.imread(str(sources[i % len(sources)])))
    writer.release()

    # Decode the clip independently; score the frames predict should sample (1, 3, 5 of 6) as images.
    capture, decoded = cv2.VideoCapture(str(clip)), []
    while (frame := capture.read()[1]) is not None:
        decoded.append(frame)
    assert len(decoded) == 6 and sample_indices(6, 3) == [1, 3, 5]
    images = []
    for index in sample_indices(6, 3):
        images.append(tmp_path / f"frame{index}.png")
        cv2.imwrite(str(images[-1]), decoded[index])
    rows = _predict_json([str(student_onnx), str(clip), *map(str, images), "--frames", "3"], capsys)
    assert rows[str(clip)]["frames"] == 3
    expected = np.mean([rows[str(p)]["score"] for p in images])
    assert rows[str(clip)]["score"] == pytest.approx(expected, abs=1e-5)


def test_face_crop_preparer_is_what_prepared_data_asks_for(
    student_onnx: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert "face_crop" in INPUT_PREPARERS
    assert DATASETS.get("fas_manifest").input_preparer == "face_crop"
    frame = np.zeros((40, 60, 3), dtype=np.uint8)
    frame[:, 10:50] = 200
    crop = face_crop(detector="full", size=48)(frame)
    assert crop.shape == (48, 48, 3) and crop[24, 24, 0] == 200  # centred square of the frame
    assert face_crop(detector="haar")(frame) is None  # no face in a flat image

    blank = tmp_path / "blank.png"
    cv2.imwrite(str(blank), np.full((64, 64, 3), 128, dtype=np.uint8))
    assert main(["predict", str(student_onnx), str(blank), "--preparer", "face_crop"]) == 1
    assert "nothing to score" in capsys.readouterr().err
    assert (
        main(
            [
                "predict",
                str(student_onnx),
                str(blank),
                "--preparer",
                "face_crop",
                "--prepare-option",
                "detector=full",
            ]
        )
        == 0
    )
    assert (
        main(
            [
                "predict",
                str(student_onnx),
                str(blank),
                "--prepare-option",
                "detector=bogus",
                "--preparer",
                "face_crop",
            ]
        )
        == 2
    )


def test_eval_reproduces_the_evaluate_stage(
    run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = shutil.copytree(run, tmp_path / "run")  # eval writes beside the checkpoint
    checkpoint = run / "student_kd" / "model.pt"
    assert main(["eval", str(checkpoint)]) == 0
    assert "results on test" in (printed := capsys.readouterr().out) and "hter ↓" in printed
    out = run / "student_kd" / "eval-test"
    metrics = json.loads((out / "metrics.json").read_text())["metrics"]
    stage = json.loads((run / "summary.json").read_text())["test"]["results"]["student_kd"]
    # The same test subjects: the same resamples (and no interval in either over these 3 subjects).
    assert metrics.pop("resampling") == stage.pop("resampling")
    assert metrics.pop("intervals", None) == stage.pop("intervals", None)
    assert metrics == pytest.approx(stage, abs=1e-9)
    for name in ("scores_test.csv", "scores_val.csv", "metrics_test.json", "roc_det_test.png"):
        assert (out / name).is_file()
    assert (out / "scores_test.csv").read_text() == (
        run / "test" / "student_kd" / "scores_test.csv"
    ).read_text()
    calibration = json.loads((out / "calibration.json").read_text())
    assert calibration["thresholds"]["threshold"] == pytest.approx(stage["test/threshold"])


def test_eval_on_the_dev_split_shows_the_dev_metrics(
    run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The evaluator's headline keys are written for 'test'; on another split the table shows that
    split's metrics (it used to print '-' in every metric cell)."""
    checkpoint = run / "student_kd" / "model.pt"
    assert main(["eval", str(checkpoint), "--split", "val", "--out", str(tmp_path / "eval-val")]) == 0
    printed = capsys.readouterr().out
    metrics = json.loads((tmp_path / "eval-val" / "metrics.json").read_text())["metrics"]
    row = next(line for line in printed.splitlines() if "student_kd" in line)
    assert "results on val" in printed and "hter ↓" in printed
    assert f"{metrics['val/hter']:.4f}" in row and " - " not in row


def test_predict_prepares_files_with_the_settings_the_training_frames_were_prepared_with(
    tmp_path: Path,
) -> None:
    """A model trained on `kdkit fas prepare` output records its detector/scale/size; predict's
    preparer uses them, and --prepare-option overrides one."""
    from kdkit.cli.predict import _preparer
    from kdkit.config.schema import DataSpec
    from kdkit.plugins import load_plugins
    from kdkit.run.pipeline import _data_meta

    load_plugins()
    (tmp_path / "prepare.json").write_text(json.dumps({"detector": "full", "scale": 1.0, "size": 16}))
    recorded = _data_meta(DataSpec("fas_manifest", root=str(tmp_path), image_size=16))
    assert recorded["input_preparer_options"] == {"detector": "full", "scale": 1.0, "size": 16}
    metadata = {"dataset": "fas_manifest", "input_preparer": "face_crop", **recorded}
    frame = np.random.default_rng(0).integers(0, 255, (40, 30, 3), dtype=np.uint8)
    assert _preparer(metadata, None, [])(frame).shape == (16, 16, 3)
    assert _preparer(metadata, None, ["size=8"])(frame).shape == (8, 8, 3)
