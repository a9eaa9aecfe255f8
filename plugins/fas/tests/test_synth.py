"""Tests of ``kdkit fas synth``: layout, splits, determinism, safe writes, and that the classes are
not separable by colour statistics while high-frequency attack cues are."""

from __future__ import annotations

import csv
import json
import os
import re
from pathlib import Path

import cv2
import numpy as np
import pytest
from kdkit_fas import synth
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from kdkit.cli import main

SMALL = {"n_subjects": 3, "frames": 2, "size": 16}


def _meta(root: Path) -> list[dict[str, str]]:
    with (root / "meta.csv").open(newline="") as fh:
        return list(csv.DictReader(fh))


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def big_set(tmp_path_factory) -> Path:
    """Enough subjects (16 in test) for the frame-level accuracies to mean something."""
    out = tmp_path_factory.mktemp("synth") / "set"
    synth.generate(out, n_subjects=80, frames=2, size=32, seed=0, workers=2, progress=False)
    return out


def test_layout_and_meta_match_disk(tmp_path: Path) -> None:
    out = tmp_path / "set"
    summary = synth.generate(out, n_subjects=5, frames=3, size=24, seed=1, progress=False)
    rows = _meta(out)
    assert list(rows[0]) == list(synth.META_COLUMNS)
    on_disk = {p.relative_to(out).as_posix() for p in out.rglob("*.png")}
    assert on_disk == {r["path"] for r in rows}
    assert {p.name for p in out.iterdir()} == {"train", "dev", "test", "meta.csv", "synth.json"}
    for r in rows:
        split, folder, video, _ = r["path"].split("/")
        assert (split, video) == (r["split"], r["video"])
        assert folder == ("live" if r["label"] == "1" else "spoof")
        assert (r["label"] == "1") == (r["attack_type"] == "live")
        assert r["attack_type"] in synth.VIDEOS_PER_SUBJECT
        assert video.startswith(r["subject"] + "_")
    img = cv2.imread(str(out / rows[0]["path"]), cv2.IMREAD_UNCHANGED)
    assert img.shape == (24, 24, 3) and img.dtype == np.uint8
    per_video = {}
    for r in rows:
        per_video.setdefault(r["video"], []).append(r)
    assert len(per_video) == 5 * sum(synth.VIDEOS_PER_SUBJECT.values())
    assert all(len(v) == 3 for v in per_video.values())
    live = sum(r["label"] == "1" for r in rows)
    assert live * 2 == len(rows) == summary.total_frames  # 2 live : 1 print : 1 replay
    info = json.loads((out / "synth.json").read_text())
    assert info["params"] == {"n_subjects": 5, "frames": 3, "size": 24, "seed": 1}
    assert info["counts"]["frames"] == summary.frames
    assert not list(tmp_path.glob(".set*")), "temporary folder left behind"


def test_subjects_are_disjoint_across_splits(big_set: Path) -> None:
    subjects = {s: set() for s in synth.SPLITS}
    for r in _meta(big_set):
        subjects[r["split"]].add(r["subject"])
    assert [len(subjects[s]) for s in synth.SPLITS] == [48, 16, 16]
    assert not subjects["train"] & subjects["dev"]
    assert not subjects["train"] & subjects["test"]
    assert not subjects["dev"] & subjects["test"]


@pytest.mark.slow
def test_same_seed_same_bytes_whatever_the_workers(tmp_path: Path) -> None:
    synth.generate(tmp_path / "a", **SMALL, seed=3, workers=1, progress=False)
    synth.generate(tmp_path / "b", **SMALL, seed=3, workers=2, progress=False)
    synth.generate(tmp_path / "c", **SMALL, seed=4, workers=1, progress=False)
    a, b, c = (_files(tmp_path / n) for n in "abc")
    assert a == b
    pngs = [k for k in a if k.endswith(".png")]
    assert all(c.get(k) != a[k] for k in pngs)


def test_rerun_is_a_no_op(tmp_path: Path) -> None:
    out = tmp_path / "set"
    synth.generate(out, **SMALL, progress=False)
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    again = synth.generate(out, **SMALL, workers=2, progress=False)
    assert again.reused
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == stamps


def test_refuses_to_touch_other_content(tmp_path: Path) -> None:
    out = tmp_path / "set"
    synth.generate(out, **SMALL, progress=False)
    before = _files(out)
    with pytest.raises(FileExistsError, match="other parameters"):
        synth.generate(out, **{**SMALL, "frames": 3}, progress=False)
    (out / "meta.csv").write_text("path,split,video,subject,label,attack_type\n")
    with pytest.raises(FileExistsError, match="incomplete"):
        synth.generate(out, **SMALL, progress=False)
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "holiday.jpg").write_bytes(b"x")
    with pytest.raises(FileExistsError, match="no readable synth.json"):
        synth.generate(foreign, **SMALL, progress=False)
    assert [p.name for p in foreign.iterdir()] == ["holiday.jpg"]
    assert {k: v for k, v in _files(out).items() if k != "meta.csv"} == {
        k: v for k, v in before.items() if k != "meta.csv"
    }


def test_failure_leaves_nothing_behind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*_args):
        raise RuntimeError("disk full")

    monkeypatch.setattr(synth, "_video", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        synth.generate(tmp_path / "set", **SMALL, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_empty_out_folder_is_filled(tmp_path: Path) -> None:
    (tmp_path / "set").mkdir()
    summary = synth.generate(tmp_path / "set", **SMALL, progress=False)
    assert not summary.reused and (tmp_path / "set" / "meta.csv").is_file()


@pytest.mark.parametrize(
    "key, value", [("n_subjects", 2), ("frames", 0), ("size", 8), ("seed", -1), ("workers", 0)]
)
def test_bad_parameters_are_named(tmp_path: Path, key: str, value: int) -> None:
    with pytest.raises(ValueError, match=key):
        synth.generate(tmp_path / "set", **{**SMALL, key: value}, progress=False)
    assert not (tmp_path / "set").exists()


@pytest.fixture(scope="module")
def features(big_set: Path) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """Per-frame colour statistics (mean, std per channel) and high-frequency energy, labels, splits."""
    root, colour, high = big_set, [], []
    rows = _meta(root)
    for r in rows:
        img = cv2.imread(str(root / r["path"]))[..., ::-1].astype(np.float32) / 255
        colour.append(np.concatenate([img.mean((0, 1)), img.std((0, 1))]))
        lap = np.abs(cv2.Laplacian(img, cv2.CV_32F)).mean((0, 1))
        power = np.abs(np.fft.fft2(img, axes=(0, 1))) ** 2
        freq = np.abs(np.fft.fftfreq(img.shape[0]))
        radius = np.maximum(freq[:, None], freq[None, :])
        band = power[radius > 0.25].sum(0) / power[radius > 0].sum(0)
        high.append(np.log(np.concatenate([lap, band])))
    labels = np.array([int(r["label"]) for r in rows])
    splits = np.array([r["split"] for r in rows])
    return {"colour": np.array(colour), "high": np.array(high)}, labels, splits


def _test_accuracy(x: np.ndarray, labels: np.ndarray, splits: np.ndarray) -> float:
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000))
    model.fit(x[splits == "train"], labels[splits == "train"])
    return float((model.predict(x[splits == "test"]) == labels[splits == "test"]).mean())


def test_colour_statistics_do_not_separate_the_classes(features) -> None:
    feats, labels, splits = features
    assert labels.mean() == 0.5
    assert _test_accuracy(feats["colour"], labels, splits) < 0.8


def test_high_frequency_attack_cues_are_learnable(features) -> None:
    feats, labels, splits = features
    colour = _test_accuracy(feats["colour"], labels, splits)
    high = _test_accuracy(feats["high"], labels, splits)
    assert high >= 0.75
    assert high >= colour + 0.15


def test_cli_writes_then_refuses_a_different_set(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    options = ["--n-subjects", "3", "--frames", "1", "--size", "16"]
    argv = ["fas", "synth", "--out", str(tmp_path / "set"), *options]
    assert main(argv) == 0
    assert "train" in capsys.readouterr().out
    assert len(_meta(tmp_path / "set")) == 12
    assert main([*argv, "--seed", "1"]) == 2
    assert "other parameters" in capsys.readouterr().err


def test_split_sizes_can_be_chosen_and_a_split_left_empty(tmp_path: Path) -> None:
    summary = synth.generate(
        tmp_path / "pool", **{**SMALL, "n_subjects": 5}, dev_subjects=1, test_subjects=0, progress=False
    )
    assert summary.subjects == {"train": 4, "dev": 1, "test": 0}
    assert not (tmp_path / "pool" / "test").exists()
    info = json.loads((tmp_path / "pool" / "synth.json").read_text())
    assert info["params"]["dev_subjects"] == 1 and info["params"]["test_subjects"] == 0


@pytest.mark.parametrize(
    ("sizes", "match"),
    [
        (
            {"dev_subjects": 3, "test_subjects": 2},
            "3 dev \\+ 2 test subjects leave none of the 5 for training",
        ),
        ({"dev_subjects": -1}, "dev_subjects must be an integer >= 0"),
        ({"test_subjects": 1.5}, "test_subjects must be an integer >= 0"),
    ],
)
def test_bad_split_sizes_are_named(tmp_path: Path, sizes: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        synth.generate(tmp_path / "set", **{**SMALL, "n_subjects": 5}, **sizes, progress=False)
    assert not (tmp_path / "set").exists()


def test_the_largest_size_the_memory_check_names_fits(monkeypatch: pytest.MonkeyPatch) -> None:
    """On a (pretended) 3 GiB machine the size the refusal proposes passes and the next one is refused,
    its message naming the supersampled canvas the renderer draws on."""
    pages = {"SC_PAGE_SIZE": 4096, "SC_PHYS_PAGES": 3 * 2**30 // 4096}
    real_sysconf = os.sysconf
    monkeypatch.setattr(os, "sysconf", lambda name: pages.get(name) or real_sysconf(name))
    with pytest.raises(ValueError, match=r"the largest size that fits is \d+") as refused:
        synth._check_memory(4096, workers=2)
    largest = int(re.search(r"fits is (\d+)", str(refused.value))[1])
    synth._check_memory(largest, workers=2)
    with pytest.raises(ValueError, match=f"size {largest + 1} needs .* canvas {2 * (largest + 1)}² px each"):
        synth._check_memory(largest + 1, workers=2)
