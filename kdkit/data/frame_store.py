"""A frame store: many same-size images as one uint8 array on disk, read with no decoding.

Decoding a PNG or JPEG costs more than augmenting it, on every epoch. `write_store` decodes each
image once (`kdkit.data.images.read_rgb`: every mode, EXIF-upright), optionally resizes it to
S × S (`kdkit.data.augment.resize_rgb`, the antialiased resize the image transforms start with, so a
stored frame is the pixel array the loader would have made), and writes

    <store>/images.npy    the frames: an (N, H, W, 3) uint8 array (NumPy's .npy format)
    <store>/index.json    {"format", "version", "shape", "size", "files": [[path, bytes, mtime_ns], ...],
                           "checksum": {"algorithm": "sha256", "chunk_frames": C, "chunks": [hex, ...]}}

where each file is named relative to the folder the store was made from, and chunk k's checksum is
the SHA-256 of frames k·C to k·C + C - 1 (about `CHUNK_BYTES` each). A store is written into a hidden
folder beside its place and renamed there when complete, so its place holds a whole store or none.

`FrameStore` checks what is cheap when it opens a store (the index's fields and their agreement, the
array's header and file length: no pixel is read) and memory-maps the array read-only:
`store.image(i)` is frame i as an (H, W, 3) view, paged in by the kernel and shared by every loader
worker. `store.damaged_frames()` reads every frame against the checksums (`kdkit store --verify`);
`store.stale(root)` names the source files changed since the store was written.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import shlex
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from rich.markup import escape

from kdkit.data.augment import resize_rgb
from kdkit.data.datasets import DataError
from kdkit.data.images import IMAGE_EXTS, read_rgb
from kdkit.utils.checkpoint import atomic_write_text
from kdkit.utils.lock import exclusive
from kdkit.utils.runlog import console, progress

FORMAT = "kdkit-frame-store"
VERSION = 2  # 2 added the checksums; stores of version 1 are still read, but cannot be verified
VERSIONS = (1, 2)
IMAGES = "images.npy"
INDEX = "index.json"
STORE_DIR = "frames.kdstore"  # the default store folder inside the image folder it holds
CHECKSUM = "sha256"  # hashlib's, about 1.6 GB/s on one core with the CPU's SHA instructions
CHUNK_BYTES = 64 * 2**20  # frames per checksum: as many as fit in this, at least one
LISTED = 3  # damaged ranges or changed files named in a message


class StoreError(DataError):
    """A frame store that cannot be written or read as asked: `problem` names the file, `remedy`
    (when there is one) the command that mends it."""

    def __init__(self, problem: str, remedy: str | None = None) -> None:
        super().__init__(f"{problem}; {remedy}" if remedy else problem)
        self.problem = problem


def store_command(root: str | Path, folder: str | Path, size: int | None = None, force: bool = False) -> str:
    """The `kdkit store` command line that writes the store `folder` of the images under `root`."""
    words = ["kdkit", "store", str(root)]
    if Path(folder) != Path(root) / STORE_DIR:
        words += ["--out", str(folder)]
    if size:
        words += ["--size", str(size)]
    return shlex.join(words + (["--force"] if force else []))


def human_size(n_bytes: float) -> str:
    """`n_bytes` in the largest binary unit it fills: '512 bytes', '3.8 KiB', '1.2 GiB'."""
    units = ("bytes", "KiB", "MiB", "GiB", "TiB")
    power = 0
    while n_bytes >= 1024 and power < len(units) - 1:
        n_bytes /= 1024
        power += 1
    return f"{n_bytes:.0f} bytes" if power == 0 else f"{n_bytes:.1f} {units[power]}"


# ------------------------------------------------------------------------------------ writing
def write_store(
    paths: Sequence[Path], out: str | Path, root: str | Path, size: int | None = None, show: bool = True
) -> FrameStore:
    """Decode `paths` (files under `root`) into a new store at `out` and return it opened.

    `size`: resize every frame to size × size; without it every image must have the first one's
    size (else a StoreError names the first that differs). An existing store at `out` is replaced
    only once the new one is complete; an error or an interruption leaves `out` as it was.
    """
    root, out = Path(root), Path(out)
    if not paths:
        raise StoreError(f"{root}: no image files to store")
    relative = [_relative(path, root) for path in paths]
    first = _frame(paths[0], size)
    need = len(paths) * first.nbytes
    free = shutil.disk_usage(_existing_parent(out)).free
    if need > free:
        raise StoreError(f"{out}: the store needs {human_size(need)}, {human_size(free)} are free")
    # Stat before decoding: a file changed meanwhile then reads as changed, never as stored.
    files = [
        [name, stat.st_size, stat.st_mtime_ns]
        for name, stat in zip(relative, map(Path.stat, paths), strict=True)
    ]
    with exclusive(out), _new_folder(out) as new:
        checksum = _write_frames(paths, first, size, new / IMAGES, f"store {out.name}", show)
        shape = [len(paths), *first.shape]
        index = {"format": FORMAT, "version": VERSION, "shape": shape, "size": size, "files": files}
        atomic_write_text(json.dumps(index | {"checksum": checksum}), new / INDEX)
    return FrameStore(out, root)


def _write_frames(
    paths: Sequence[Path], first: np.ndarray, size: int | None, images: Path, label: str, show: bool
) -> dict[str, Any]:
    """Decode `paths` into the array file `images`; returns the index's `checksum` entry, each
    chunk's checksum taken as soon as its last frame is written (still in the page cache)."""
    per_chunk = max(1, CHUNK_BYTES // first.nbytes)
    frames = np.lib.format.open_memmap(images, mode="w+", dtype=np.uint8, shape=(len(paths), *first.shape))
    chunks = []
    with progress(len(paths), label, unit="frames", show=show) as advance:
        for i, path in enumerate(paths):
            frame = first if i == 0 else _frame(path, size)
            if frame.shape != first.shape:
                raise StoreError(
                    f"{path}: {frame.shape[1]}×{frame.shape[0]} px, but {paths[0]} is "
                    f"{first.shape[1]}×{first.shape[0]}; give a size (--size S) to resize every frame"
                )
            frames[i] = frame
            if (i + 1) % per_chunk == 0 or i + 1 == len(paths):
                chunks.append(_digest(frames[i - i % per_chunk : i + 1]))
            advance()
    frames.flush()
    del frames
    return {"algorithm": CHECKSUM, "chunk_frames": per_chunk, "chunks": chunks}


def _digest(frames: np.ndarray) -> str:
    """The checksum of consecutive frames (a C-contiguous slice of the array)."""
    return hashlib.new(CHECKSUM, frames).hexdigest()


@contextlib.contextmanager
def _new_folder(out: Path) -> Iterator[Path]:
    """A hidden folder beside `out` to write a store into, moved to `out` (replacing the store there)
    when the block ends without an error, else removed. Call it holding `out`'s lock."""
    _refuse_other_files(out)
    for leftover in out.parent.glob(f".{out.name}.*.tmp"):  # of a killed write: no writer holds them
        shutil.rmtree(leftover, ignore_errors=True)
    new = out.with_name(f".{out.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    new.mkdir()
    try:
        yield new
        _move_into_place(new, out)
    except BaseException:
        shutil.rmtree(new, ignore_errors=True)
        raise


def _move_into_place(new: Path, out: Path) -> None:
    """Rename the folder `new` to `out`; a folder at `out` is set aside first (a folder cannot
    be renamed over one that is not empty), put back if the rename fails, and removed after."""
    if not out.exists():
        os.replace(new, out)
        return
    old = new.with_suffix(".old.tmp")
    os.replace(out, old)
    try:
        os.replace(new, out)
    except BaseException:
        os.replace(old, out)
        raise
    shutil.rmtree(old)


def _refuse_other_files(out: Path) -> None:
    """Refuse to replace `out` when it holds anything but a store's files (a wrong --out), since
    what is there is removed with the store it is taken for."""
    if not out.exists():
        return
    if not out.is_dir():
        raise StoreError(f"{out}: a file, not a frame store's folder", "choose another --out")
    temporary = (f".{IMAGES}.", f".{INDEX}.")  # left by an interrupted write of an older kdkit
    other = sorted(
        entry.name
        for entry in out.iterdir()
        if entry.name not in (IMAGES, INDEX)
        and not (entry.name.startswith(temporary) and entry.name.endswith(".tmp"))
    )
    if other:
        more = f" and {len(other) - LISTED} more" if len(other) > LISTED else ""
        raise StoreError(
            f"{out}: holds files that are not a frame store's ({', '.join(other[:LISTED])}{more}), "
            "which writing a store there would remove",
            "nothing was written; choose another --out, or move those files",
        )


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


# ------------------------------------------------------------------------------------ reading
class FrameStore:
    """A store written by `write_store`, checked cheaply and memory-mapped read-only (opened lazily,
    so that a data set holding it pickles small into loader workers, and each worker maps the file
    itself). `root` is the folder its images came from (default: the store's parent folder), named
    in the command a message suggests."""

    def __init__(self, folder: str | Path, root: str | Path | None = None) -> None:
        self.folder = Path(folder)
        self.root = Path(root) if root is not None else self.folder.parent
        index = self._read_index()
        self.shape = tuple(index["shape"])
        self.size: int | None = index.get("size")
        self.files: list[tuple[str, int, int]] = [tuple(f) for f in index["files"]]
        self.checksum: dict[str, Any] | None = index.get("checksum")  # None: a version 1 store
        self._check_array()
        self.rows = {path: i for i, (path, _, _) in enumerate(self.files)}
        self._array: np.memmap | None = None

    def rewrite_command(self, force: bool = False) -> str:
        """The command that writes this store again (`force`: even when its files are unchanged)."""
        return store_command(self.root, self.folder, self.size, force)

    def _read_index(self) -> dict[str, Any]:
        """The parsed index, its fields checked (a StoreError names what is wrong)."""
        path = self.folder / INDEX
        again = f"write it again with `{store_command(self.root, self.folder)}`"
        try:
            index = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise StoreError(f"{self.folder}: not a frame store (no {INDEX})", again) from None
        except (OSError, ValueError) as exc:
            raise StoreError(f"{path}: not a readable store index ({exc})", again) from None
        problem = _index_problem(index)
        if problem:
            raise StoreError(f"{path}: {problem}", again)
        return index

    def _check_array(self) -> None:
        """The array file's header and length agree with the index (reads the header only)."""
        path = self.folder / IMAGES
        again = f"write the store again with `{self.rewrite_command()}`"
        try:
            with open(path, "rb") as handle:
                shape, dtype, offset = _npy_header(handle)
                length = os.fstat(handle.fileno()).st_size
        except (OSError, ValueError) as exc:
            raise StoreError(f"{path}: not a readable frame array ({exc})", again) from None
        if shape != self.shape or dtype != np.uint8:
            raise StoreError(
                f"{path}: a {dtype} array of shape {shape} where the index describes uint8 {self.shape}",
                again,
            )
        expected = offset + self.nbytes
        if length != expected:
            raise StoreError(
                f"{path}: {length:,} bytes where its header describes {expected:,} (cut short or extended)",
                again,
            )

    def __len__(self) -> int:
        return self.shape[0]

    @property
    def nbytes(self) -> int:
        """The frames' size in bytes (the array file less its header)."""
        return int(np.prod(self.shape))

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
                "was written",
                f"write it again with `{self.rewrite_command()}`",
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

    def damaged_frames(self, show: bool = True) -> list[range]:
        """The ranges of frames whose content differs from the checksums written with the store.
        Reads every frame (a progress bar with `show`); a store of version 1 has no checksums and
        raises a StoreError that says so."""
        if self.checksum is None:
            raise StoreError(
                f"{self.folder}: written by an older kdkit without checksums (store format 1), so its "
                "content cannot be verified (its index and array header are consistent)",
                f"rewrite it with `{self.rewrite_command()}`, which adds them",
            )
        per_chunk = self.checksum["chunk_frames"]
        frames = np.load(self.folder / IMAGES, mmap_mode="r")
        damaged = []
        with progress(len(self), f"verify {self.folder.name}", unit="frames", show=show) as advance:
            for start, expected in zip(range(0, len(self), per_chunk), self.checksum["chunks"], strict=True):
                chunk = frames[start : start + per_chunk]
                if _digest(chunk) != expected:
                    damaged.append(range(start, start + len(chunk)))
                advance(len(chunk))
        return damaged


def _index_problem(index: Any) -> str | None:
    """What is wrong with a parsed index (a field's type, or fields that disagree), or None."""
    if not isinstance(index, dict) or index.get("format") != FORMAT or index.get("version") not in VERSIONS:
        return f"expected a {FORMAT} index of version {' or '.join(map(str, VERSIONS))}"
    shape, files, size = index.get("shape"), index.get("files"), index.get("size")
    if not (_whole_numbers(shape) and len(shape) == 4 and min(shape) > 0 and shape[3] == 3):
        return f"shape: expected [frames, height, width, 3], got {shape!r}"
    if not (isinstance(files, list) and len(files) == shape[0] and all(map(_file_entry, files))):
        return f"files: expected {shape[0]} entries [path, bytes, mtime_ns], one per frame"
    if len({entry[0] for entry in files}) != len(files):
        return "files: a path is listed twice"
    if size is not None and not (_whole_numbers([size]) and size > 0):
        return f"size: expected a number of pixels or null, got {size!r}"
    return _checksum_problem(index.get("checksum"), shape[0]) if index["version"] >= 2 else None


def _checksum_problem(checksum: Any, frames: int) -> str | None:
    """What is wrong with a version 2 index's `checksum` entry for `frames` frames, or None."""
    if not (
        isinstance(checksum, dict)
        and checksum.get("algorithm") == CHECKSUM
        and _whole_numbers([checksum.get("chunk_frames")])
        and checksum["chunk_frames"] > 0
    ):
        return f'checksum: expected {{"algorithm": "{CHECKSUM}", "chunk_frames": N, "chunks": [...]}}'
    expected = -(-frames // checksum["chunk_frames"])
    chunks = checksum.get("chunks")
    if not (isinstance(chunks, list) and len(chunks) == expected and all(_hex_digest(c) for c in chunks)):
        per_chunk = checksum["chunk_frames"]
        return f"checksum.chunks: expected {expected} {CHECKSUM} digests (one per {per_chunk} frames)"
    return None


def _whole_numbers(values: Any) -> bool:
    return isinstance(values, list) and all(type(v) is int for v in values)  # bool is no number here


def _file_entry(entry: Any) -> bool:
    return isinstance(entry, list) and len(entry) == 3 and type(entry[0]) is str and _whole_numbers(entry[1:])


def _hex_digest(text: Any) -> bool:
    return (
        isinstance(text, str)
        and len(text) == 2 * hashlib.new(CHECKSUM).digest_size
        and not text.strip("0123456789abcdef")
    )


def _npy_header(handle: BinaryIO) -> tuple[tuple[int, ...], np.dtype, int]:
    """(shape, dtype, offset of the data) of an open .npy file; a ValueError for anything else,
    including an array stored in Fortran order."""
    version = np.lib.format.read_magic(handle)
    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, fortran_order, dtype = read(handle)
    if fortran_order:
        raise ValueError("stored in Fortran order")
    return shape, dtype, handle.tell()


# ------------------------------------------------------------------------------------ using
def open_store(folder: str | Path, root: str | Path, paths: Sequence[str]) -> FrameStore:
    """The store at `folder`, checked to hold every one of `paths` (relative to `root`) as it is on
    disk now; a StoreError names the first missing or changed file and the command that rewrites it."""
    store = FrameStore(folder, root)
    missing = [p for p in paths if p not in store.rows]
    changed = missing or store.stale(root, paths)
    if changed:
        more = f" (and {len(changed) - 1} more)" if len(changed) > 1 else ""
        why = "is not in it" if missing else "changed since it was written"
        raise StoreError(
            f"{folder}: out of date: {changed[0]}{more} {why}",
            f"rewrite it with `{store.rewrite_command()}`, or delete {folder} to read the image files",
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
    unless one is there that holds exactly those files, unchanged, at `size`, with checksums (or
    `force`). Returns the store and whether it was written."""
    root = Path(root)
    out = Path(out) if out is not None else root / STORE_DIR
    _refuse_other_files(out)  # before saying that it is no store and will be written
    paths = image_files(root, exclude=out)
    if not force:
        current = _current_store(out, root, paths, size)
        if current is not None:
            return current, False
    return write_store(paths, out, root, size=size, show=show), True


def _current_store(out: Path, root: Path, paths: list[Path], size: int | None) -> FrameStore | None:
    """The store at `out` when it holds exactly `paths`, unchanged, at `size`, with checksums; else
    None (saying why when there is a store that will be written again)."""
    try:
        store = FrameStore(out, root)
    except StoreError as exc:
        if out.exists():
            console.print(f"[yellow]{escape(exc.problem)}: writing it again[/yellow]")
        return None
    if store.checksum is None:
        console.print(
            f"[yellow]{escape(str(out))}: a store without checksums (format 1): writing it again[/yellow]"
        )
        return None
    return store if store.size == size and not _source_changes(store, paths) else None


def _source_changes(store: FrameStore, paths: Sequence[Path]) -> list[str]:
    """The images that make `store` out of date when it should hold exactly `paths` (files under
    `store.root`): those not in it, then those gone or changed since it was written."""
    relative = [_relative(path, store.root) for path in paths]
    return sorted(set(relative) - store.rows.keys()) + store.stale(store.root)


def verify_store(root: str | Path, out: str | Path | None = None, show: bool = True) -> str:
    """Check the store of `root` (at `out`, default `root/frames.kdstore`) in full: the cheap checks
    of opening it, every frame against its checksum, and the images under `root` against its index.
    Returns what was checked, as lines to print; a StoreError names every problem found."""
    root = Path(root)
    folder = Path(out) if out is not None else root / STORE_DIR
    if not folder.exists():
        raise StoreError(f"{folder}: no frame store there", f"write one with `{store_command(root, folder)}`")
    store = FrameStore(folder, root)
    damaged = store.damaged_frames(show)
    changed = _source_changes(store, image_files(root, exclude=folder))
    if damaged or changed:
        problems = ([_damage(store, damaged)] if damaged else []) + ([_changes(changed)] if changed else [])
        raise StoreError(
            f"{folder}: " + "; ".join(problems),
            f"rewrite it with `{store.rewrite_command(force=bool(damaged))}`",
        )
    frames, height, width = store.shape[:3]
    chunks = len(store.checksum["chunks"])
    per_chunk = store.checksum["chunk_frames"]
    return (
        f"{folder}: verified, {frames} frames of {width}×{height} px ({human_size(store.nbytes)})\n"
        f"  index and array: consistent ({frames} source files, uint8 {store.shape}, file length)\n"
        f"  content: every frame matches its chunk's {CHECKSUM} checksum ({chunks} chunk(s) of up to "
        f"{min(per_chunk, frames)} frames)\n"
        f"  images under {root}: none new, gone or changed (size, modification time) since it was written"
    )


def _damage(store: FrameStore, damaged: list[range]) -> str:
    """'damaged: frames 0–1 (a.png … b.png), ...' naming at most `LISTED` ranges."""
    named = [
        f"frame {r.start} ({store.files[r.start][0]})"
        if len(r) == 1
        else f"frames {r.start}–{r.stop - 1} ({store.files[r.start][0]} … {store.files[r.stop - 1][0]})"
        for r in damaged[:LISTED]
    ]
    more = f" and {len(damaged) - LISTED} more chunks" if len(damaged) > LISTED else ""
    chunks = len(store.checksum["chunks"])
    return f"damaged: {len(damaged)} of {chunks} chunks differ from their checksum: {', '.join(named)}{more}"


def _changes(changed: list[str]) -> str:
    """'out of date: 2 images are new, gone or changed since it was written (a.png, b.png)'."""
    more = f" and {len(changed) - LISTED} more" if len(changed) > LISTED else ""
    return (
        f"out of date: {len(changed)} image(s) under its folder are new, gone or changed since it was "
        f"written ({', '.join(changed[:LISTED])}{more})"
    )


def store_summary(store: FrameStore, written: bool) -> str:
    """One line on `store` for a command's output: its frames and size, or that it was up to date."""
    if not written:
        return f"{store.folder}: up to date ({len(store)} frames)"
    height, width = store.shape[1:3]
    return f"{store.folder}: {len(store)} frames of {width}×{height} px, {human_size(store.nbytes)}"
