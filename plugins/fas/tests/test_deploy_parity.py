"""A deployed FAS model scores what evaluation scored, for every way its frames were prepared.

For each path (the folder layout through `kdkit fas prepare`, a video data set through `prepare`,
a cross-domain set), a tiny student is trained and evaluated by `kdkit run`, exported to ONNX,
and the raw images/videos behind the test frames are scored by `kdkit predict`: the scores must
equal the evaluator's (scores_test.csv; a video's = the mean of its frames) and the decisions
must be the same.
"""

from __future__ import annotations

import csv
import json
import shutil
import warnings
from collections import defaultdict
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml
from fixtures import FOURCC, FRAMES, HEIGHT, WIDTH, face_image, make_casia, make_folder, make_msu, make_replay
from kdkit_fas.layouts import VideoRecord, image_files, index_dataset
from kdkit_fas.prepare import prepare

from kdkit.cli import main

SAMPLED = 2  # frames per video; predict samples as many
VIT = {"img_size": 32, "patch_size": 8, "num_classes": 2, "depth": 1, "embed_dim": 16, "num_heads": 2}


def _vary(root: Path, seed: int = 0) -> Path:
    """Give every image and video under `root` its own noisy pixels (the fixtures draw one face
    everywhere), so that scores differ and none sits on the dev threshold, where a 1e-7
    difference between ONNX and PyTorch would flip a decision."""
    rng = np.random.default_rng(seed)

    def noisy() -> np.ndarray:
        return np.clip(face_image() + rng.normal(0, 40, (HEIGHT, WIDTH, 3)), 0, 255).astype(np.uint8)

    for path in sorted(root.rglob("*")):
        if path.suffix in FOURCC:
            writer = cv2.VideoWriter(
                str(path), cv2.VideoWriter_fourcc(*FOURCC[path.suffix]), 25, (WIDTH, HEIGHT)
            )
            for _ in range(FRAMES):
                writer.write(noisy())
            writer.release()
        elif path.suffix in (".png", ".jpg"):
            cv2.imwrite(str(path), noisy())
    return root


def _recipe(data: dict) -> dict:
    """One student trained for a step, then evaluated on test (threshold from dev)."""
    return {
        "name": "parity",
        "seed": 0,
        "plugins": ["fas"],
        "data": {"image_size": 32, "batch_size": 8, "num_workers": 0, "mean": [0.5] * 3, "std": [0.5] * 3}
        | data,
        "models": {"student": {"name": "vit_tiny_patch16_224", "options": VIT, "pretrained": False}},
        "train": {"epochs": 1, "max_steps_per_epoch": 1, "warmup_epochs": 0, "device": "cpu", "amp": "none"},
        "evaluator": "fas",
        "pipeline": [
            {"name": "student", "do": "train", "model": "student"},
            {"name": "test", "do": "evaluate", "runs": ["student"]},
        ],
    }


def _train_and_export(base: Path, data: dict) -> Path:
    """Run the recipe on `data` under `base`; return the exported ONNX file."""
    recipe = base / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(_recipe(data)))
    assert main(["run", str(recipe), "--out", str(base / "run")]) == 0
    onnx = base / "student.onnx"
    assert main(["export", str(base / "run" / "student" / "model.pt"), "--out", str(onnx)]) == 0
    return onnx


def _evaluated(onnx: Path) -> dict[str, float]:
    """The evaluator's video-level P(live) of every test video (the mean of its frame scores)."""
    frames = defaultdict(list)
    with (onnx.parent / "run" / "test" / "student" / "scores_test.csv").open(newline="") as handle:
        for row in csv.DictReader(handle):
            frames[row["video"]].append(float(row["score"]))
    return {video: float(np.mean(scores)) for video, scores in frames.items()}


def _raw_input(record: VideoRecord) -> Path:
    """The file predict is given for a record: its video or image, or its folder's one image."""
    return image_files(record.path)[0] if record.path.is_dir() else record.path


def _assert_predict_matches_eval(
    onnx: Path, inputs: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    """`kdkit predict` on the raw inputs (video id -> file) gives the evaluator's scores and decisions."""
    evaluated = _evaluated(onnx)
    assert set(inputs) == set(evaluated) and len(inputs) >= 2
    capsys.readouterr()
    assert main(["predict", str(onnx), *map(str, inputs.values()), "--frames", str(SAMPLED), "--json"]) == 0
    rows = {row["path"]: row for row in map(json.loads, capsys.readouterr().out.splitlines())}
    threshold = json.loads((onnx.parent / "run" / "summary.json").read_text())["test"]["results"]["student"][
        "test/threshold"
    ]
    for video, path in inputs.items():
        row = rows[str(path)]
        assert row["score"] == pytest.approx(evaluated[video], abs=1e-5), video
        assert row["decision"] == ("live" if evaluated[video] >= threshold else "attack"), video
        assert row["threshold"] == pytest.approx(threshold)


def test_folder_layout_prepared_as_crops_is_scored_as_evaluated(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """prepare.json names the detector 'auto' chose (mtcnn here, or haar) while every frame was taken
    whole (face_source full): predict must take the whole frame too, as training and eval saw it."""
    raw = _vary(make_folder(tmp_path / "raw", frames=1))
    prepare("folder", raw, tmp_path / "prepared", frames_per_video=1, size=32, workers=1, progress=False)
    assert json.loads((tmp_path / "prepared" / "prepare.json").read_text())["detector"] != "full"
    onnx = _train_and_export(tmp_path, {"dataset": "fas_manifest", "root": str(tmp_path / "prepared")})
    inputs = {r.video: _raw_input(r) for r in index_dataset("folder", raw) if r.split == "test"}
    _assert_predict_matches_eval(onnx, inputs, capsys)


def test_videos_prepared_by_a_detector_are_scored_as_evaluated(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Replay-Attack without its face-location files: every frame cropped by the detector; predict
    samples the same frames of each video and crops them the same way."""
    raw = _vary(make_replay(tmp_path / "raw"))
    shutil.rmtree(raw / "face-locations")
    prepared = tmp_path / "prepared"
    prepare(
        "replay", raw, prepared, frames_per_video=SAMPLED, size=32, workers=1, progress=False, detector="full"
    )
    onnx = _train_and_export(tmp_path, {"dataset": "fas_manifest", "root": str(prepared)})
    inputs = {r.video: r.path for r in index_dataset("replay", raw) if r.split == "test"}
    _assert_predict_matches_eval(onnx, inputs, capsys)


@pytest.fixture(scope="module")
def cross_domain(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Path]]:
    """A model of M_I_to_C, exported: the sources M and I cropped from their annotation files
    (their prepare.json names mtcnn, never used), the target C by the 'full' detector."""
    base = tmp_path_factory.mktemp("cross_domain")
    raws = {
        "M": ("msu", make_msu, "mtcnn"),
        "I": ("replay", make_replay, "mtcnn"),
        "C": ("casia", lambda root: make_casia(root, train_subjects=1, face_locations=False), "full"),
    }
    roots = {}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "MSU-MFSD: skipped")  # the fixture's unlisted subject 099
        for letter, (layout, make, detector) in raws.items():
            roots[letter] = base / layout
            _vary(make(base / f"raw-{layout}"))
            settings = {"frames_per_video": SAMPLED, "size": 32, "workers": 1, "progress": False}
            prepare(layout, base / f"raw-{layout}", roots[letter], detector=detector, **settings)
    roots_text = {k: str(v) for k, v in roots.items()}
    options = {"protocol": "M_I_to_C", "roots": roots_text, "mixed_preparation": True}  # detectors differ
    return _train_and_export(base, {"dataset": "fas_domains", "root": None, "options": options}), roots


def test_a_cross_domain_model_is_scored_as_evaluated(
    cross_domain: tuple[Path, dict[str, Path]], capsys: pytest.CaptureFixture[str]
) -> None:
    onnx, _ = cross_domain
    raw = onnx.parent / "raw-casia"
    inputs = {f"C:{r.video}": r.path for r in index_dataset("casia", raw)}  # the target: all of it
    _assert_predict_matches_eval(onnx, inputs, capsys)


# --- what the deployed crop is derived from ------------------------------------------------------


def _prepared_folder(root: Path, detector: str, face_sources: list[str], size: int = 32) -> Path:
    """A stand-in `kdkit fas prepare` output: its settings and a manifest with these face sources."""
    root.mkdir(parents=True)
    (root / "prepare.json").write_text(json.dumps({"detector": detector, "scale": 1.2, "size": size}))
    rows = [f"frames/{i}.png,v{i},s{i},{i % 2},live,train,{source}," for i, source in enumerate(face_sources)]
    header = "path,video,subject,label,attack_type,split,face_source,face_score"
    (root / "manifest.csv").write_text("\n".join([header, *rows]) + "\n")
    return root


def test_the_recorded_detector_is_the_one_that_cropped_the_frames(tmp_path: Path) -> None:
    """Not the detector prepare.json names: frames taken whole were not cropped by it, and frames
    cropped from annotation files fall back to it (prepare's choice for a video without one)."""
    from kdkit_fas.plugin import prepared_crop_options

    from kdkit.config.schema import DataSpec

    def recorded(name: str, detector: str, sources: list[str]) -> dict:
        return prepared_crop_options(
            DataSpec("fas_manifest", root=str(_prepared_folder(tmp_path / name, detector, sources)))
        )

    assert recorded("folder", "haar", ["full"] * 3) == {"detector": "full", "scale": 1.2, "size": 32}
    assert recorded("annotated", "mtcnn", ["xywh"] * 3)["detector"] == "mtcnn"
    assert recorded("mixed", "haar", ["xywh", "haar", "haar"])["detector"] == "haar"


def test_a_cross_domain_model_whose_sets_were_cropped_differently_asks_which(tmp_path: Path) -> None:
    """Its options are recorded per set; predict refuses to guess (exit status 2 naming each set's
    crop), and takes a set's crop (`source=`) or an explicit detector."""
    from kdkit_fas.plugin import domains_crop_options

    from kdkit.cli.predict import _preparer
    from kdkit.config.schema import DataSpec
    from kdkit.errors import UsageError
    from kdkit.plugins import load_plugins

    load_plugins()  # registers face_crop
    roots = {
        "M": _prepared_folder(tmp_path / "M", "mtcnn", ["msu"]),  # annotation files only: no detector
        "I": _prepared_folder(tmp_path / "I", "haar", ["haar"]),
        "C": _prepared_folder(tmp_path / "C", "full", ["full"]),
    }
    spec = DataSpec(
        "fas_domains", options={"protocol": "M_I_to_C", "roots": {k: str(v) for k, v in roots.items()}}
    )
    options = domains_crop_options(spec)
    assert options == {
        "sources": {
            "M": {"scale": 1.2, "size": 32},
            "I": {"scale": 1.2, "size": 32, "detector": "haar"},
            "C": {"scale": 1.2, "size": 32, "detector": "full"},
        }
    }
    metadata = {"dataset": "fas_domains", "input_preparer": "face_crop", "input_preparer_options": options}
    with pytest.raises(UsageError) as refused:
        _preparer(metadata, None, [])
    message = str(refused.value)
    assert (
        "prepared with different face crops (M: scale 1.2, size 32; I: scale 1.2, size 32, detector haar;"
        in message
    )
    assert "--prepare-option source=M|I|C, or give --prepare-option detector=..." in message
    frame = np.random.default_rng(0).integers(0, 255, (40, 30, 3), dtype=np.uint8)
    assert _preparer(metadata, None, ["source=C"])(frame).shape == (32, 32, 3)
    assert _preparer(metadata, None, ["detector=full", "size=8"])(frame).shape == (8, 8, 3)
    roots["C"].joinpath("manifest.csv").write_text(roots["I"].joinpath("manifest.csv").read_text())
    roots["C"].joinpath("prepare.json").write_text(roots["I"].joinpath("prepare.json").read_text())
    assert domains_crop_options(spec) == {"scale": 1.2, "size": 32, "detector": "haar"}  # M agrees with any


# --- results that are not held out ---------------------------------------------------------------


def test_a_target_that_was_a_training_source_is_named() -> None:
    from kdkit_fas.plugin import domains_seen_in_training

    from kdkit.config.schema import DataSpec

    def spec(protocol: str) -> DataSpec:
        return DataSpec("fas_domains", options={"protocol": protocol})

    assert domains_seen_in_training(spec("O_C_I_to_M"), spec("O&M&I->C"), "test") == [
        "test domain C (CASIA-FASD) was a training source of this model (trained on O_C_I_to_M: O, C, I)"
    ]
    assert domains_seen_in_training(spec("O_C_I_to_M"), spec("O_C_I_to_M"), "test") == []
    assert (
        domains_seen_in_training(spec("O_C_I_to_M"), spec("O_M_I_to_C"), "val") == []
    )  # dev: never trained on
    assert domains_seen_in_training(DataSpec("fas_manifest"), spec("O_M_I_to_C"), "test") == []


def test_eval_on_data_the_model_trained_on_says_it_is_not_held_out(
    cross_domain: tuple[Path, dict[str, Path]], capsys: pytest.CaptureFixture[str]
) -> None:
    onnx, _ = cross_domain
    out = onnx.parent / "eval-train"
    assert (
        main(
            ["eval", str(onnx.parent / "run" / "student" / "model.pt"), "--split", "train", "--out", str(out)]
        )
        == 0
    )
    printed, err = capsys.readouterr()
    assert (
        "warning: not a held-out result: train domain M (MSU-MFSD) was a training source of this model" in err
    )
    assert "train domain I (Replay-Attack)" in err
    assert "results on train — NOT HELD OUT" in printed and "strict" not in printed.split("for comparison")[0]
    assert len(json.loads((out / "metrics.json").read_text())["not_held_out"]) == 2
