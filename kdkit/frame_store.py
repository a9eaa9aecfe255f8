"""A frame store: many same-size images as one uint8 array on disk, read with no decoding.

Decoding a PNG or JPEG costs more than augmenting it, on every epoch. `write_store` decodes each
image once (`kdkit.images.read_rgb`: every mode, EXIF-upright), optionally resizes it to
S × S (`kdkit.augment.resize_rgb`, the antialiased resize the image transforms start with, so a
stored frame is the pixel array the loader would have made), and writes

    <store>/images.npy    the frames: an (N, H, W, 3) uint8 array (NumPy's .npy format)
    <store>/index.json    {"format", "version", "shape", "size", "files": [[path, bytes, mtime_ns], ...]}

where each file is named relative to the folder the store was made from. `FrameStore` memory-maps
the array read-only: `store.image(i)` is frame i as an (H, W, 3) view, paged in by the kernel and
shared by every loader worker. `store.stale(root)` names the source files changed since; the
index is written last, so a store whose writing was interrupted has none and is not a store.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from kdkit.augment import resize_rgb
from kdkit.checkpoint import atomic_path, atomic_write_text
from kdkit.data import DataError
from kdkit.images import IMAGE_EXTS, read_rgb
from kdkit.runlog import console, progress

FORMAT = "kdkit-frame-store"
VERSION = 1
IMAGES = "images.npy"
INDEX = "index.json"
STORE_DIR = "frames.kdstore"  # the default store folder inside the image folder it holds


class StoreError(DataError):
    """A frame store that cannot be written or read as asked; the message names the file."""


def write_store(
    paths: Sequence[Path], out: str | Path, root: str | Path, size: int | None = None, show: bool = True
) -> FrameStore:
    """Decode `paths` (files under `root`) into a new store at `out` and return it opened.

    `size`: resize every frame to size × size; without it every image must have the first one's
    size (else a StoreError names the first that differs). An existing store at `out` is replaced
    only once the new one is complete.
    """
    root, out = Path(root), Path(out)
    if not paths:
        raise StoreError(f"{root}: no image files to store")
    relative = [_relative(path, root) for path in paths]
    first = _frame(paths[0], size)
    shape = (len(paths), *first.shape)
    need = int(np.prod(shape))
    free = shutil.disk_usage(_existing_parent(out)).free
    if need > free:
        raise StoreError(f"{out}: the store needs {need / 2**30:.2f} GiB, {free / 2**30:.2f} GiB are free")
    out.mkdir(parents=True, exist_ok=True)
    files = []
    with atomic_path(out / IMAGES) as tmp:
        frames = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=shape)
        with progress(len(paths), f"store {out.name}", unit="frames", show=show) as advance:
            for i, path in enumerate(paths):
                frame = first if i == 0 else _frame(path, size)
                if frame.shape != first.shape:
                    raise StoreError(
                        f"{path}: {frame.shape[1]}×{frame.shape[0]} px, but {paths[0]} is "
                        f"{first.shape[1]}×{first.shape[0]}; give a size (--size S) to resize every frame"
                    )
                frames[i] = frame
                stat = path.stat()
                files.append([relative[i], stat.st_size, stat.st_mtime_ns])
                advance()
        frames.flush()
        del frames
        # Every frame is written: the old store (if any) stops being one just before its array is
        # replaced, and the new one becomes one when its index exists.
        (out / INDEX).unlink(missing_ok=True)
    index = {"format": FORMAT, "version": VERSION, "shape": list(shape), "size": size, "files": files}
    atomic_write_text(json.dumps(index), out / INDEX)
    return FrameStore(out)


def _frame(path: Path, size: int | None) -> np.ndarray:
    rgb = read_rgb(path)
    return resize_rgb(rgb, size) if size else rgb


def _relative(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        raise StoreError(f"{path} is not under {root}, the folder the store is made from") from None


def _existing_parent(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


class FrameStore:
    """A store written by `write_store`, memory-mapped read-only (opened lazily, so that a dataset
    holding it pickles small into loader workers, and each worker maps the file itself)."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        index_path = self.folder / INDEX
        try:
            index = json.loads(index_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise StoreError(
                f"{self.folder}: not a frame store (no {INDEX}; an interrupted write leaves none): "
                "write it again with `kdkit store`"
            ) from None
        except (OSError, ValueError) as exc:
            raise StoreError(f"{index_path}: not a readable store index ({exc})") from None
        if not isinstance(index, dict) or index.get("format") != FORMAT or index.get("version") != VERSION:
            raise StoreError(f"{index_path}: expected a {FORMAT} index of version {VERSION}")
        self.shape = tuple(index["shape"])
        self.size: int | None = index.get("size")
        self.files: list[tuple[str, int, int]] = [tuple(f) for f in index["files"]]
        try:
            array = np.load(self.folder / IMAGES, mmap_mode="r")
        except (OSError, ValueError) as exc:
            raise StoreError(
                f"{self.folder / IMAGES}: not a readable frame array ({exc}); write the store again"
            ) from None
        if array.shape != self.shape or array.dtype != np.uint8:
            raise StoreError(
                f"{self.folder / IMAGES}: a {array.dtype} array of shape {array.shape} where the index "
                f"describes uint8 {self.shape}; write the store again"
            )
        del array
        self.rows = {path: i for i, (path, _, _) in enumerate(self.files)}
        self._array: np.memmap | None = None

    def __len__(self) -> int:
        return self.shape[0]

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_array": None}  # never pickle the mapped frames themselves

    def image(self, i: int) -> np.ndarray:
        """Frame `i` as a read-only (H, W, 3) uint8 array (a view of the mapped file)."""
        if self._array is None:
            self._array = np.load(self.folder / IMAGES, mmap_mode="r")
        return self._array[i]

    def row(self, relative: str) -> int:
        """The row of the frame made from `relative` (a path relative to the store's source folder)."""
        try:
            return self.rows[relative]
        except KeyError:
            raise StoreError(
                f"{self.folder}: holds no frame of {relative!r}; the folder has changed since the store "
                "was written: write it again with `kdkit store`"
            ) from None

    def stale(self, root: str | Path, paths: Sequence[str] | None = None) -> list[str]:
        """The stored files (or those of `paths`) under `root` that are missing, or whose size or
        modification time differ from when the store was written."""
        root = Path(root)
        wanted = self.files if paths is None else [self.files[self.row(p)] for p in paths]
        changed = []
        for relative, size, mtime in wanted:
            try:
                stat = (root / relative).stat()
            except FileNotFoundError:
                changed.append(relative)
                continue
            if (stat.st_size, stat.st_mtime_ns) != (size, mtime):
                changed.append(relative)
        return changed


def open_store(folder: str | Path, root: str | Path, paths: Sequence[str]) -> FrameStore:
    """The store at `folder`, checked to hold every one of `paths` (relative to `root`) as it is on
    disk now; a StoreError names the first missing or changed file and the command that rewrites it."""
    store = FrameStore(folder)
    missing = [p for p in paths if p not in store.rows]
    changed = missing or store.stale(root, paths)
    if changed:
        more = f" (and {len(changed) - 1} more)" if len(changed) > 1 else ""
        why = "is not in it" if missing else "changed since it was written"
        raise StoreError(
            f"{folder}: out of date: {changed[0]}{more} {why}; "
            f"rewrite it with `kdkit store {root}`, or delete {folder} to read the image files"
        )
    return store


def image_files(root: str | Path, exclude: str | Path | None = None) -> list[Path]:
    """Every image file under `root` (recursive, sorted; extensions as `kdkit predict` reads them),
    leaving out anything under `exclude` (a store inside the folder it holds)."""
    root = Path(root)
    skip = Path(exclude).resolve() if exclude else None
    return sorted(
        path
        for path in root.rglob("*")
        if path.suffix.lower() in IMAGE_EXTS
        and path.is_file()
        and not (skip and path.resolve().is_relative_to(skip))
    )


def update_store(
    root: str | Path,
    out: str | Path | None = None,
    size: int | None = None,
    force: bool = False,
    show: bool = True,
) -> tuple[FrameStore, bool]:
    """The store of every image under `root` (at `out`, default `root/frames.kdstore`), written
    unless one is there that holds exactly those files, unchanged, at `size` (or `force`).
    Returns the store and whether it was written."""
    root = Path(root)
    out = Path(out) if out is not None else root / STORE_DIR
    paths = image_files(root, exclude=out)
    if not force:
        current = _current_store(out, root, paths, size)
        if current is not None:
            return current, False
    return write_store(paths, out, root, size=size, show=show), True


def _current_store(out: Path, root: Path, paths: list[Path], size: int | None) -> FrameStore | None:
    """The store at `out` when it holds exactly `paths`, unchanged, at `size`; else None."""
    try:
        store = FrameStore(out)
    except StoreError as exc:
        if out.exists():
            console.print(f"[yellow]{exc}: writing it again[/yellow]")
        return None
    same_files = sorted(store.rows) == sorted(_relative(path, root) for path in paths)
    return store if same_files and store.size == size and not store.stale(root) else None


def store_summary(store: FrameStore, written: bool) -> str:
    """One line on `store` for a command's output: its frames and size, or that it was up to date."""
    if not written:
        return f"{store.folder}: up to date ({len(store)} frames)"
    height, width = store.shape[1:3]
    gib = store.shape[0] * height * width * 3 / 2**30
    return f"{store.folder}: {len(store)} frames of {width}×{height} px, {gib:.2f} GiB"
