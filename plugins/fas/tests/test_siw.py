"""SiW: indexing its tree (names, quirks, protocols 1-3, Bob's dev subjects), its `.face` files,
and `fas prepare` on the fixture (splits per protocol, protocol 1's first 60 training frames)."""

from __future__ import annotations

import csv
import json
from collections import Counter
from pathlib import Path

import pytest
from fixtures import SIW_VIDEOS, make_siw
from kdkit_fas.layouts import LayoutError, index_dataset, read_siw_face
from kdkit_fas.prepare import prepare

LIVE = {"1-1-1-1", "2-1-1-1"}
PRINT = {"1-2-1-1", "1-2-2-2"}
REPLAY = {"1-3-1-1": "1", "1-3-2-1": "2", "1-3-3-2": "3", "1-3-4-2": "4"}  # name -> medium
SPLIT_OF = {"003": "dev", "008": "train", "001": "test", "153": "test"}


@pytest.fixture(scope="module")
def siw_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_siw(tmp_path_factory.mktemp("siw"))


def _index(root: Path, protocol: object = None, fold: object = None):
    with pytest.warns(UserWarning, match=r"SiW: skipped 1 file.*008-1-2-1-2\.mov"):
        return index_dataset("siw", root, protocol, fold)


def _expected(train_side: set[str], test_side: set[str]) -> dict[str, str]:
    """video id -> split for the fixture, given the name fields each side keeps."""
    return {
        f"{subject}-{name}": split
        for subject, split in SPLIT_OF.items()
        for name in SIW_VIDEOS
        if name in (test_side if split == "test" else train_side)
    }


def test_every_video_is_indexed_with_its_label_type_subject_and_split(siw_root: Path) -> None:
    records = {r.video: r for r in _index(siw_root)}
    assert {video: r.split for video, r in records.items()} == _expected(set(SIW_VIDEOS), set(SIW_VIDEOS))
    quirk = records["153-2-1-1-1"]  # stored as 153-2-1-1-1.m.mov
    assert quirk.path.name == "153-2-1-1-1.m.mov" and quirk.face.name == "153-2-1-1-1.m.face"
    assert (quirk.label, quirk.attack_type, quirk.subject) == (1, "live", "153")
    assert (records["001-1-2-2-2"].label, records["001-1-2-2-2"].attack_type) == (0, "print/2")
    assert records["003-1-3-4-2"].attack_type == "replay/4" and records["003-1-3-4-2"].split == "dev"
    assert {r.face_format for r in records.values()} == {"siw"}
    assert {r.max_frames for r in records.values()} == {None}


def test_protocol_1_limits_only_the_train_videos_to_60_frames(siw_root: Path) -> None:
    records = _index(siw_root, 1)
    assert len(records) == 32
    assert {r.video for r in records if r.max_frames == 60} == {f"008-{n}" for n in SIW_VIDEOS}


@pytest.mark.parametrize("medium", ["1", "2", "3", "4"])
def test_protocol_2_leaves_one_replay_medium_out_and_drops_prints(siw_root: Path, medium: str) -> None:
    records = _index(siw_root, 2, medium)
    kept = {n for n, m in REPLAY.items() if m != medium}
    held_out = {n for n, m in REPLAY.items() if m == medium}
    assert {r.video: r.split for r in records} == _expected(LIVE | kept, LIVE | held_out)


@pytest.mark.parametrize(("fold", "train", "test"), [(1, PRINT, set(REPLAY)), (2, set(REPLAY), PRINT)])
def test_protocol_3_trains_on_one_species_and_tests_on_the_other(
    siw_root: Path, fold: int, train: set[str], test: set[str]
) -> None:
    records = _index(siw_root, "3", fold)
    assert {r.video: r.split for r in records} == _expected(LIVE | train, LIVE | test)


@pytest.mark.parametrize(
    ("protocol", "fold", "message"),
    [
        (None, 1, "a fold needs protocol 2 or 3"),
        (1, 1, "protocol 1 has no folds"),
        (2, None, r"protocol 2 needs a fold \(1-4\)"),
        (2, 5, "unknown SiW protocol 2 fold 5; expected one of 1, 2, 3, 4"),
        (3, 3, "unknown SiW protocol 3 fold 3; expected one of 1, 2"),
        (4, None, "unknown SiW protocol 4"),
    ],
)
def test_bad_protocols_and_folds_are_named(siw_root: Path, protocol, fold, message: str) -> None:
    with pytest.raises(LayoutError, match=message):
        index_dataset("siw", siw_root, protocol, fold)


def test_face_file_rows_are_corner_boxes_per_frame(tmp_path: Path) -> None:
    path = tmp_path / "001-1-1-1-1.face"
    path.write_text("785 425 1070 710\r\n0 0 0 0\n\n10,20,110,220\n")
    assert read_siw_face(path) == {0: (785, 425, 285, 285), 1: None, 2: (10, 20, 100, 200)}
    path.write_text("1 2 3\n")
    with pytest.raises(ValueError, match=r"001-1-1-1-1\.face: row 1: expected 4 numbers"):
        read_siw_face(path)


def _prepared(out: Path) -> tuple[dict[str, str], dict[str, int]]:
    """video -> split from the manifest, and video -> sampled frames without a face (markers)."""
    with (out / "manifest.csv").open(newline="") as handle:
        splits = {row["video"]: row["split"] for row in csv.DictReader(handle)}
    no_face = {
        marker.parent.name: json.loads(marker.read_text())["no_face"]
        for marker in out.glob("frames/*/*/.done.json")
    }
    return splits, no_face


@pytest.mark.parametrize(("protocol", "fold"), [(1, None), (2, 1), (2, 2), (2, 3), (2, 4), (3, 1), (3, 2)])
def test_prepare_puts_each_protocols_videos_in_their_splits(
    siw_root: Path, tmp_path: Path, protocol: int, fold: int | None
) -> None:
    with pytest.warns(UserWarning, match="SiW: skipped 1 file"):
        report = prepare(
            "siw", siw_root, tmp_path / "out", protocol, fold, size=16, workers=1, progress=False
        )
    expected = {r.video: r.split for r in _index(siw_root, protocol, fold)}
    splits, no_face = _prepared(tmp_path / "out")
    assert report.failed == {} and splits == expected
    # the .face rows are all zero from frame 60 on; uniform K=8 over 70 frames samples frame 65,
    # over protocol 1's first 60 training frames it does not
    limited = {video for video, split in expected.items() if protocol == 1 and split == "train"}
    assert {video: n for video, n in no_face.items() if n} == dict.fromkeys(set(expected) - limited, 1)
    assert limited == ({f"008-{n}" for n in SIW_VIDEOS} if protocol == 1 else set())
    assert Counter(splits.values())["dev"] > 0  # Bob's dev subject 003
