"""Layout indexers against fake trees with the real names and protocol-file formats."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
from fixtures import make_casia, make_celeba_spoof, make_folder, make_msu, make_oulu, make_replay
from kdkit_fas.layouts import LAYOUTS, LayoutError, VideoRecord, index_dataset


def counts(records: list[VideoRecord]) -> Counter:
    """(split, label) -> number of records."""
    return Counter((r.split, r.label) for r in records)


@pytest.fixture(scope="module")
def oulu(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_oulu(tmp_path_factory.mktemp("oulu"))


# --- OULU-NPU -----------------------------------------------------------------------------------


def test_oulu_without_protocol_indexes_every_video_by_folder(oulu: Path) -> None:
    records = index_dataset("oulu", oulu)
    # 2 phones x 3 sessions x 2 users x 5 files per split; file 1 is live
    assert counts(records) == {(s, 1): 12 for s in ("train", "dev", "test")} | {
        (s, 0): 48 for s in ("train", "dev", "test")
    }
    record = next(r for r in records if r.video == "2_3_36_4")
    assert (record.subject, record.split, record.attack_type) == ("36", "test", "replay/1")
    assert record.face == oulu / "Test_files" / "2_3_36_4.txt" and record.face_format == "oulu_eyes"


def test_oulu_protocol_1_reads_minus_two_tokens_and_types_from_file_field(oulu: Path) -> None:
    records = index_dataset("oulu", oulu, protocol=1)
    assert counts(records) == {
        ("train", 1): 8,
        ("train", 0): 32,
        ("dev", 1): 8,
        ("dev", 0): 32,
        ("test", 1): 4,
        ("test", 0): 16,
    }
    test = [r for r in records if r.split == "test"]
    assert {r.video.split("_")[1] for r in test} == {"3"}  # session 3 only
    assert "-2," in (oulu / "Protocols/Protocol_1/Test.txt").read_text()
    assert Counter(r.attack_type for r in test) == {
        "live": 4,
        "print/1": 4,
        "print/2": 4,
        "replay/1": 4,
        "replay/2": 4,
    }


def test_oulu_protocol_2_reads_a_crlf_file(oulu: Path) -> None:
    assert b"\r\n" in (oulu / "Protocols/Protocol_2/Train.txt").read_bytes()
    records = index_dataset("oulu", oulu, protocol="2")
    by_split = {s: {r.video[-1] for r in records if r.split == s} for s in ("train", "dev", "test")}
    assert by_split == {"train": {"1", "2", "4"}, "dev": {"1", "2", "4"}, "test": {"1", "3", "5"}}
    assert len([r for r in records if r.split == "train"]) == 36


@pytest.mark.parametrize("fold", [1, 2])
def test_oulu_protocol_3_fold_tests_on_its_phone(oulu: Path, fold: int) -> None:
    records = index_dataset("oulu", oulu, protocol=3, fold=fold)
    phones = {s: {r.video[0] for r in records if r.split == s} for s in ("train", "dev", "test")}
    other = str(3 - fold)
    assert phones == {"train": {other}, "dev": {other}, "test": {str(fold)}}
    assert len(records) == 90


def test_oulu_protocol_4_combines_session_phone_and_pai(oulu: Path) -> None:
    records = index_dataset("oulu", oulu, protocol=4, fold=1)
    assert Counter(r.split for r in records) == {"train": 12, "dev": 12, "test": 6}
    test = [r for r in records if r.split == "test"]
    assert {r.video[:3] for r in test} == {"1_3"} and {r.attack_type for r in test} == {
        "live",
        "print/2",
        "replay/2",
    }


@pytest.mark.parametrize(
    ("protocol", "fold", "message"),
    [(5, None, "protocol"), (3, None, "needs a fold"), (4, 7, "fold"), (1, 2, "no folds"), (None, 1, "fold")],
)
def test_oulu_rejects_bad_protocols_and_folds(
    oulu: Path, protocol: object, fold: object, message: str
) -> None:
    with pytest.raises(LayoutError, match=message):
        index_dataset("oulu", oulu, protocol=protocol, fold=fold)


def test_oulu_missing_protocol_file_names_the_expected_path(tmp_path: Path) -> None:
    (tmp_path / "Train_files").mkdir()
    with pytest.raises(LayoutError, match=r"Protocols/Protocol_3/Train_2\.txt"):
        index_dataset("oulu", tmp_path, protocol=3, fold=2)


def test_oulu_label_token_contradicting_the_file_field_is_an_error(tmp_path: Path) -> None:
    for group in ("Train", "Dev", "Test"):
        path = tmp_path / "Protocols" / "Protocol_1" / f"{group}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("+1,1_1_01_2\n")
    with pytest.raises(LayoutError, match=r"Train\.txt:1: label \+1 contradicts"):
        index_dataset("oulu", tmp_path, protocol=1)


def test_oulu_listed_video_missing_on_disk(tmp_path: Path) -> None:
    for group in ("Train", "Dev", "Test"):
        path = tmp_path / "Protocols" / "Protocol_1" / f"{group}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("+1,1_1_01_1\n")
    with pytest.raises(LayoutError, match=r"3 listed video\(s\) missing.*1_1_01_1\.avi"):
        index_dataset("oulu", tmp_path, protocol=1)


# --- CASIA-FASD ---------------------------------------------------------------------------------


def test_casia_subjects_include_the_split_and_labels_follow_names(tmp_path: Path) -> None:
    records = index_dataset("casia", make_casia(tmp_path))
    assert counts(records) == {("train", 1): 15, ("train", 0): 45, ("test", 1): 3, ("test", 0): 9}
    assert {r.subject for r in records if r.split == "test"} == {"test_1"}
    assert "train_1" in {r.subject for r in records}  # folder '1' in both releases, distinct subjects
    by_name = {r.video: r for r in records}
    assert by_name["test_1_HR_1"].label == 1 and by_name["test_1_5"].attack_type == "print/cut"
    assert (
        by_name["train_2_HR_2"].attack_type == "print/warped" and by_name["train_2_8"].attack_type == "replay"
    )
    assert by_name["train_1_1"].face_format == "xywh" and by_name["test_1_1"].face_format == "detect"


def test_casia_holdout_moves_every_fifth_train_subject_to_dev(tmp_path: Path) -> None:
    records = index_dataset("casia", make_casia(tmp_path), protocol="holdout")
    assert {r.subject for r in records if r.split == "dev"} == {"train_5"}
    assert Counter(r.split for r in records) == {"train": 48, "dev": 12, "test": 12}
    with pytest.raises(LayoutError, match="'official'"):
        index_dataset("casia", tmp_path, protocol=2)


# --- Replay-Attack ------------------------------------------------------------------------------


def test_replay_splits_types_and_unique_support_ids(tmp_path: Path) -> None:
    records = index_dataset("replay", make_replay(tmp_path))
    assert counts(records) == {(s, y): 4 if y else 20 for s in ("train", "dev", "test") for y in (0, 1)}
    assert {r.subject for r in records if r.split == "dev"} == {"003"}
    train = [r for r in records if r.split == "train"]
    assert Counter(r.attack_type for r in train) == {
        "live": 4,
        "print": 4,
        "replay/highdef_photo": 4,
        "replay/highdef_video": 4,
        "replay/mobile_photo": 4,
        "replay/mobile_video": 4,
    }
    ids = {r.video for r in train}
    assert "hand_attack_print_client001_session01_highdef_photo_adverse" in ids
    assert "fixed_attack_print_client001_session01_highdef_photo_adverse" in ids
    assert all(r.face and r.face.is_file() and r.face_format == "xywh" for r in records)


# --- MSU-MFSD -----------------------------------------------------------------------------------


def test_msu_reads_crlf_lists_and_marks_upside_down_videos(tmp_path: Path) -> None:
    root = make_msu(tmp_path)
    assert not (root / "train_sub_list.txt").read_bytes().endswith(b"\n")
    with pytest.warns(UserWarning, match="neither subject list"):
        records = index_dataset("msu", root)
    assert counts(records) == {("train", 1): 4, ("train", 0): 12, ("test", 1): 2, ("test", 0): 6}
    assert {r.subject for r in records if r.split == "train"} == {"002", "003"}
    assert [r.video for r in records if r.upside_down] == ["real_client003_android_SD_scene01"]
    by_name = {r.video: r for r in records}
    assert by_name["attack_client001_laptop_SD_printed_photo_scene01"].path.suffix == ".mov"
    assert by_name["attack_client002_android_SD_ipad_video_scene01"].attack_type == "replay/ipad"
    assert all(r.face_format == "msu" for r in records)


def test_msu_missing_subject_list_names_it(tmp_path: Path) -> None:
    (tmp_path / "scene01").mkdir()
    with pytest.raises(LayoutError, match="train_sub_list.txt"):
        index_dataset("msu", tmp_path)


# --- CelebA-Spoof -------------------------------------------------------------------------------


def test_celeba_spoof_inverts_index_43_and_names_spoof_types(tmp_path: Path) -> None:
    records = index_dataset("celeba_spoof", make_celeba_spoof(tmp_path))
    assert counts(records) == {("train", 1): 5, ("train", 0): 5, ("test", 1): 1, ("test", 0): 1}
    by_name = {r.video: r for r in records}
    live, spoof = by_name["train_10_live_100001"], by_name["train_14_spoof_140002"]
    assert (live.label, live.attack_type, live.subject) == (1, "live", "10")
    assert (spoof.label, spoof.attack_type) == (0, "mask/3d")
    assert by_name["test_20_spoof_000004"].attack_type == "print/a4"
    assert live.face == live.path.with_name("100001_BB.txt") and live.face_format == "celeba_bb"


def test_celeba_spoof_holdout_and_bad_label_vectors(tmp_path: Path) -> None:
    root = make_celeba_spoof(tmp_path)
    records = index_dataset("celeba_spoof", root, protocol="holdout")
    assert {r.subject for r in records if r.split == "dev"} == {"14"}
    (root / "metas/intra_test/test_label.json").write_text('{"Data/test/20/live/000003.png": [0, 0]}')
    with pytest.raises(LayoutError, match="000003.png.*44-int"):
        index_dataset("celeba_spoof", root)
    with pytest.raises(LayoutError, match="protocol1"):
        index_dataset("celeba_spoof", root, protocol="protocol1")


# --- folder layout and registry -----------------------------------------------------------------


def test_folder_aliases_meta_attack_types_and_single_images(tmp_path: Path) -> None:
    records = index_dataset("folder", make_folder(tmp_path))
    assert counts(records) == {
        (s, y): 2 if s == "train" else 1 for s in ("train", "dev", "test") for y in (0, 1)
    }
    by_name = {r.video: r for r in records}
    assert by_name["s002_replay0"].attack_type == "replay" and by_name["s003_print0"].split == "dev"
    assert by_name["fake_still"].attack_type == "spoof" and by_name["fake_still"].path.is_file()
    assert by_name["s004_live0"].subject == "s004" and all(r.face_format == "full" for r in records)


def test_index_dataset_errors(tmp_path: Path) -> None:
    with pytest.raises(LayoutError, match="Did you mean 'casia'"):
        index_dataset("casai", tmp_path)
    with pytest.raises(LayoutError, match="does not exist"):
        index_dataset("replay", tmp_path / "nowhere")
    (tmp_path / "train").mkdir()
    with pytest.raises(LayoutError, match="found no videos"):
        index_dataset("folder", tmp_path)
    with pytest.raises(LayoutError, match="no protocols"):
        index_dataset("folder", tmp_path, protocol=1)
    assert set(LAYOUTS) == {"oulu", "casia", "replay", "msu", "siw", "celeba_spoof", "folder"}


def test_folder_meta_video_ids_must_be_safe_and_unique(tmp_path: Path) -> None:
    root = make_folder(tmp_path)
    meta = (root / "meta.csv").read_text()
    (root / "meta.csv").write_text(meta.replace(",s001_print0,", ",../../escape,"))
    with pytest.raises(LayoutError, match="plain file names.*escape"):
        index_dataset("folder", root)
    (root / "meta.csv").write_text(meta.replace(",s001_print0,", ",s001_live0,"))
    with pytest.raises(LayoutError, match="not unique.*s001_live0"):
        index_dataset("folder", root)
