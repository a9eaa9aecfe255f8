"""kdkit.frame_store and `kdkit store`: stored frames equal the decoded files, stale stores are refused."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from kdkit.augment import resize_rgb
from kdkit.cli.entry import run
from kdkit.frame_store import INDEX, STORE_DIR, FrameStore, StoreError, image_files, open_store, write_store
from kdkit.images import read_rgb


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
