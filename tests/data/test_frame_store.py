"""kdkit.data.frame_store and `kdkit store`: stored frames equal the decoded files, stale or damaged
stores are refused with the command that rewrites them, and an interrupted write leaves no store."""

from __future__ import annotations

import json
import os
import pickle
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from kdkit.cli.entry import run
from kdkit.data import frame_store
from kdkit.data.augment import resize_rgb
from kdkit.data.frame_store import (
    IMAGES,
    INDEX,
    STORE_DIR,
    FrameStore,
    StoreError,
    human_size,
    image_files,
    open_store,
    update_store,
    write_store,
)
from kdkit.data.images import read_rgb
from kdkit.utils.workers import Interrupted


def image_folder(root: Path, size: tuple[int, int] = (20, 16)) -> Path:
    """PNG, JPEG and greyscale PNG frames in nested folders, plus a file that is no image."""
    rng = np.random.default_rng(0)
    for i, name in enumerate(["a/0.png", "a/1.jpg", "b/c/2.png", "b/3.png"]):
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
        image = Image.fromarray(pixels).convert("L") if i == 3 else Image.fromarray(pixels)
        image.save(path)
    (root / "a" / "notes.txt").write_text("not an image")
    return root


def test_stored_frames_equal_the_decoded_files(tmp_path: Path) -> None:
    root = image_folder(tmp_path / "frames")
    paths = image_files(root)
    assert [p.relative_to(root).as_posix() for p in paths] == ["a/0.png", "a/1.jpg", "b/3.png", "b/c/2.png"]
    store = write_store(paths, root / STORE_DIR, root, show=False)
    assert store.shape == (4, 16, 20, 3)
    for path in paths:
        np.testing.assert_array_equal(
            store.image(store.row(path.relative_to(root).as_posix())), read_rgb(path)
        )
    assert image_files(root, exclude=root / STORE_DIR) == paths  # the store's own files are never images


def test_a_size_resizes_as_the_transforms_do(tmp_path: Path) -> None:
    root = image_folder(tmp_path / "frames")
    store = write_store(image_files(root), tmp_path / "store", root, size=12, show=False)
    assert store.size == 12 and store.shape == (4, 12, 12, 3)
    np.testing.assert_array_equal(
        store.image(store.row("a/1.jpg")), resize_rgb(read_rgb(root / "a/1.jpg"), 12)
    )


def test_frames_of_different_sizes_need_a_size(tmp_path: Path) -> None:
    root = image_folder(tmp_path / "frames")
    Image.new("RGB", (30, 30)).save(root / "b" / "big.png")
    with pytest.raises(StoreError, match=r"big\.png: 30×30 px.*--size"):
        write_store(image_files(root), tmp_path / "store", root, show=False)
    assert not (tmp_path / "store" / INDEX).exists()  # no half-written store that reads as one


def test_a_failed_rewrite_keeps_the_store_that_was_there(tmp_path: Path) -> None:
    root = image_folder(tmp_path / "frames")
    write_store(image_files(root), root / STORE_DIR, root, show=False)
    Image.new("RGB", (30, 30)).save(root / "b" / "big.png")
    with pytest.raises(StoreError, match="give a size"):
        write_store(image_files(root, exclude=root / STORE_DIR), root / STORE_DIR, root, show=False)
    kept = FrameStore(root / STORE_DIR)
    assert kept.shape == (4, 16, 20, 3)
    np.testing.assert_array_equal(kept.image(kept.row("a/0.png")), read_rgb(root / "a/0.png"))


def test_a_changed_file_or_a_missing_index_is_refused(tmp_path: Path) -> None:
    root = image_folder(tmp_path / "frames")
    paths = [p.relative_to(root).as_posix() for p in image_files(root)]
    write_store(image_files(root), root / STORE_DIR, root, show=False)
    assert open_store(root / STORE_DIR, root, paths).stale(root) == []
    changed = root / "b" / "3.png"
    os.utime(changed, ns=(0, 0))
    with pytest.raises(StoreError, match=r"out of date: b/3\.png changed.*kdkit store"):
        open_store(root / STORE_DIR, root, paths)
    with pytest.raises(StoreError, match="is not in it"):
        open_store(root / STORE_DIR, root, ["a/new.png"])
    (root / STORE_DIR / INDEX).unlink()
    with pytest.raises(StoreError, match="not a frame store"):
        FrameStore(root / STORE_DIR)


def test_a_store_pickles_without_its_frames(tmp_path: Path) -> None:
    root = image_folder(tmp_path / "frames", size=(64, 64))
    store = write_store(image_files(root), tmp_path / "store", root, show=False)
    first = store.image(0).copy()  # maps the array
    copy = pickle.loads(pickle.dumps(store))
    assert len(pickle.dumps(store)) < 4 * 64 * 64  # what a loader worker receives: the index only
    np.testing.assert_array_equal(copy.image(0), first)


def test_kdkit_store_writes_then_finds_the_store_up_to_date(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = image_folder(tmp_path / "frames")
    assert run(["store", str(root)]) == 0
    written = (root / STORE_DIR / INDEX).stat().st_mtime_ns
    assert run(["store", str(root)]) == 0
    assert "up to date (4 frames)" in capsys.readouterr().out
    assert (root / STORE_DIR / INDEX).stat().st_mtime_ns == written
    assert run(["store", str(root), "--size", "8"]) == 0  # another size: written again
    assert FrameStore(root / STORE_DIR).shape == (4, 8, 8, 3)
    assert run(["store", str(tmp_path / "missing")]) == 2
    assert run(["store", str(root), "--size", "0"]) == 2


# ------------------------------------------------------------------ integrity and interrupted writes
FRAME_BYTES = 16 * 20 * 3  # one frame of `image_folder`


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An image folder with its store in two checksum chunks of two frames (copied by `stored`)."""
    root = image_folder(tmp_path_factory.mktemp("pristine") / "frames")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(frame_store, "CHUNK_BYTES", 2 * FRAME_BYTES)
        write_store(image_files(root), root / STORE_DIR, root, show=False)
    return root


@pytest.fixture
def stored(pristine: Path, tmp_path: Path) -> Path:
    """A fresh copy of `pristine` (modification times kept, so the store is up to date)."""
    return Path(shutil.copytree(pristine, tmp_path / "frames"))


def test_verify_names_the_damaged_frames_and_the_command_that_rewrites_them(
    stored: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run(["store", str(stored), "--verify"]) == 0
    out = capsys.readouterr().out
    assert (
        "verified, 4 frames of 20×16 px (3.8 KiB)" in out
        and "every frame matches its chunk's sha256 checksum (2 chunk(s) of up to 2 frames)" in out
    )
    frames = np.load(stored / STORE_DIR / IMAGES, mmap_mode="r+")
    frames[3, 0, 0, 0] ^= 1  # one bit of b/c/2.png's frame: the open checks cannot see it
    frames.flush()
    del frames
    FrameStore(stored / STORE_DIR)
    assert run(["store", str(stored), "--verify"]) == 2
    err = capsys.readouterr().err
    assert "damaged: 1 of 2 chunks differ from their checksum: frames 2–3 (b/3.png … b/c/2.png)" in err
    assert f"rewrite it with `kdkit store {stored} --force`" in err
    assert run(["store", str(stored), "--force"]) == 0
    assert run(["store", str(stored), "--verify"]) == 0
    Image.new("RGB", (20, 16)).save(stored / "a" / "new.png")
    assert run(["store", str(stored), "--verify"]) == 2  # out of date: `kdkit store` rewrites it
    assert f"(a/new.png); rewrite it with `kdkit store {stored}`" in capsys.readouterr().err
    assert run(["store", str(stored), "--verify", "--force"]) == 2  # --verify writes nothing


def test_a_store_without_checksums_opens_but_cannot_be_verified(
    stored: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    index_path = stored / STORE_DIR / INDEX
    index = json.loads(index_path.read_text())
    del index["checksum"]
    index_path.write_text(json.dumps(index | {"version": 1}))  # as kdkit wrote stores before checksums
    assert FrameStore(stored / STORE_DIR).checksum is None  # training still reads it
    assert run(["store", str(stored), "--verify"]) == 2
    err = capsys.readouterr().err
    assert "without checksums (store format 1), so its content cannot be verified" in err
    assert f"rewrite it with `kdkit store {stored}`, which adds them" in err
    assert run(["store", str(stored)]) == 0  # not up to date without checksums: written again
    assert FrameStore(stored / STORE_DIR).checksum is not None


def _cut_short(store: Path) -> None:
    with open(store / IMAGES, "r+b") as handle:
        handle.truncate((store / IMAGES).stat().st_size - 1)


def _extended(store: Path) -> None:
    with open(store / IMAGES, "ab") as handle:
        handle.write(b"\0")


def _edit_index(change: dict) -> Callable[[Path], None]:
    """A damage that sets the index's keys to `change`'s values (`...`: removes the key)."""

    def edit(store: Path) -> None:
        index = json.loads((store / INDEX).read_text())
        (store / INDEX).write_text(
            json.dumps({key: value for key, value in (index | change).items() if value is not ...})
        )

    return edit


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (_cut_short, r"images\.npy: 3,967 bytes where its header describes 3,968 \(cut short or extended\)"),
        (_extended, r"images\.npy: 3,969 bytes where its header describes 3,968"),
        (_edit_index({"shape": ...}), r"index\.json: shape: expected \[frames, height, width, 3\], got None"),
        (_edit_index({"files": [["a/0.png", 1, 2]]}), r"index\.json: files: expected 4 entries"),
        (
            _edit_index({"checksum": {"algorithm": "sha256", "chunk_frames": 1, "chunks": []}}),
            "expected 4 sha256",
        ),
    ],
    ids=["array cut short", "array extended", "no shape", "files missing", "too few checksums"],
)
def test_opening_a_store_checks_its_index_and_array_length(
    stored: Path, damage: Callable[[Path], None], message: str
) -> None:
    damage(stored / STORE_DIR)
    with pytest.raises(StoreError, match=message) as error:
        FrameStore(stored / STORE_DIR)
    assert f"again with `kdkit store {stored}`" in str(error.value)  # which rewrites it: it does not open
    assert update_store(stored, show=False)[1] and FrameStore(stored / STORE_DIR).shape == (4, 16, 20, 3)


def _interrupt_at_frame(monkeypatch: pytest.MonkeyPatch, number: int) -> None:
    """Make `write_store` stop with a SIGTERM as it decodes frame `number` (from 0)."""
    decoded = []
    real_frame = frame_store._frame

    def frame(path: Path, size: int | None) -> np.ndarray:
        decoded.append(path)
        if len(decoded) > number:
            raise Interrupted("SIGTERM", 15)
        return real_frame(path, size)

    monkeypatch.setattr(frame_store, "_frame", frame)


def test_an_interrupted_first_write_leaves_no_store(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    root = image_folder(tmp_path / "frames")
    before = sorted(root.iterdir())
    _interrupt_at_frame(monkeypatch, 2)
    assert run(["store", str(root), "--size", "8"]) == 128 + 15
    assert sorted(root.iterdir()) == before  # no store folder, no hidden leftover, no lock file
    err = capsys.readouterr().err
    assert (
        f"{root / STORE_DIR} is as it was (no half-written store); write it with: kdkit store {root} --size 8"
        in err
    )


def test_an_interrupted_rewrite_keeps_the_store_that_was_there(
    stored: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = sorted(stored.iterdir())
    monkeypatch.setattr(frame_store, "atomic_write_text", _raise_keyboard_interrupt)  # every frame written
    with pytest.raises(KeyboardInterrupt):
        update_store(stored, size=8, show=False)
    assert sorted(stored.iterdir()) == before
    kept = FrameStore(stored / STORE_DIR)
    assert kept.shape == (4, 16, 20, 3) and kept.damaged_frames(show=False) == []


def _raise_keyboard_interrupt(*_: object) -> None:
    raise KeyboardInterrupt


def test_a_folder_that_is_no_store_is_rewritten_or_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = image_folder(tmp_path / "frames")
    leftover = root / STORE_DIR  # what an interrupted write of an older kdkit left: no index
    leftover.mkdir()
    (leftover / ".images.npy.123.abcd.tmp").write_bytes(b"\0" * 10)
    assert run(["store", str(root)]) == 0
    assert sorted(p.name for p in leftover.iterdir()) == [IMAGES, INDEX]
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    assert run(["store", str(root), "--out", str(mine)]) == 2
    assert "holds files that are not a frame store's (notes.txt)" in capsys.readouterr().err
    assert sorted(p.name for p in mine.iterdir()) == ["notes.txt"]


def test_messages_give_the_whole_command(tmp_path: Path) -> None:
    root = image_folder(tmp_path / "frames")
    out = tmp_path / "my store"
    write_store(image_files(root), out, root, size=8, show=False)
    os.utime(root / "b" / "3.png", ns=(0, 0))
    with pytest.raises(StoreError) as error:
        open_store(out, root, ["b/3.png"])
    assert f"rewrite it with `kdkit store {root} --out '{out}' --size 8`, or delete" in str(error.value)
    with pytest.raises(StoreError) as error:
        FrameStore(root / STORE_DIR, root)
    assert f"not a frame store (no index.json); write it again with `kdkit store {root}`" in str(error.value)


def test_sizes_are_shown_in_the_unit_they_fill(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert [human_size(n) for n in (512, 3840, 5 * 2**20, 1.5 * 2**30, 3 * 2**40)] == [
        "512 bytes",
        "3.8 KiB",
        "5.0 MiB",
        "1.5 GiB",
        "3.0 TiB",
    ]
    assert run(["store", str(image_folder(tmp_path / "frames"))]) == 0
    assert "4 frames of 20×16 px, 3.8 KiB" in capsys.readouterr().out  # was "0.00 GiB"
