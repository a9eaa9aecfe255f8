"""Safe checkpoint files: atomic writes, `weights_only` loads, RNG state capture.

Nothing here unpickles arbitrary objects: `.pt`/`.pth` files go through
`torch.load(weights_only=True)` and `.safetensors` through safetensors, so a malicious file is
refused instead of executed.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import re
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch


class CheckpointError(ValueError):
    """A file that is not a usable checkpoint."""


class OutputDirError(ValueError):
    """An output directory that cannot hold what a command will write."""


def check_output_dir(path: str | Path, need_bytes: int = 0, option: str = "--out") -> None:
    """Fail early, naming `path`, when it cannot be created or written, or its file system has less
    than `need_bytes` free. Creates nothing: the nearest existing ancestor is what gets tested."""
    path = Path(path)
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise OutputDirError(f"{option} {path}: {existing} is a file, not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise OutputDirError(
            f"{option} {path}: {existing} is not writable (permission denied or a read-only file "
            "system); choose another output directory"
        )
    free = shutil.disk_usage(existing).free
    if free < need_bytes:
        raise OutputDirError(
            f"{option} {path}: only {free / 2**20:.1f} MiB free on its file system, the run's "
            f"checkpoints need at least {need_bytes / 2**20:.1f} MiB; free some space or choose "
            "another output directory"
        )


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path beside `path` for a writer that wants a file name (an exporter, a hard
    link); when the block ends without an error it is renamed to `path`, else removed. The file,
    created empty, has the mode `open` would give it (0o666 less the umask)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    # os.open with 0o666 honours the umask (mkstemp would make every output owner-only, 0o600).
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    try:
        with naming_the_file(path):
            yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_open(path: str | Path, mode: str = "wb") -> Iterator[IO[Any]]:
    """Open a temporary file beside `path` for writing ('wb' or 'w'); when the block ends without an
    error it is flushed to disk and renamed to `path`, else removed: never a half-written file."""
    with (
        atomic_path(path) as tmp,
        open(tmp, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as handle,
    ):
        yield handle
        handle.flush()
        os.fsync(handle.fileno())


def as_newly_created(path: str | Path) -> None:
    """Give a file made by `tempfile.mkstemp` (always 0o600) the mode `open` would have given it:
    0o666 less the umask, so a team's shared results folder stays readable."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)


@contextlib.contextmanager
def naming_the_file(path: str | Path) -> Iterator[None]:
    """Give an OSError raised inside the block the file name it lacks: a failed `write` or `fsync`
    ("No space left on device") names no file, so the user would not know which one failed."""
    try:
        yield
    except OSError as exc:
        if exc.filename is not None:
            raise
        raise OSError(exc.errno, exc.strerror or str(exc), str(path)) from exc


def atomic_save(obj: Any, path: str | Path) -> None:
    """`torch.save` to `path` atomically (see `atomic_open`)."""
    with atomic_open(path, "wb") as handle:
        torch.save(obj, handle)


def atomic_write_text(text: str, path: str | Path) -> None:
    """Write text to `path` atomically (see `atomic_open`)."""
    with atomic_open(path, "w") as handle:
        handle.write(text)


def load_file(path: str | Path) -> Any:
    """Load a `.safetensors` file or a `.pt`/`.pth` file with `weights_only=True`."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file as load_safetensors

        try:
            return load_safetensors(str(path))
        except Exception as exc:  # safetensors raises its own error types
            raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from None
    try:
        with open(path, "rb") as handle:
            head = handle.read(16)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise CheckpointError(f"{path}: is a folder, not a checkpoint file") from None
    if not head.startswith((b"PK\x03\x04", b"\x80")):  # torch.save writes a zip (a pickle before 1.6)
        raise CheckpointError(
            f"{path}: not a PyTorch checkpoint (torch.save writes a zip archive; this file starts with "
            f"{head!r}); expected a .pt/.pth file written by torch.save, or a .safetensors file"
        )
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # unpickling errors, truncated zip archives, refused globals
        text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).strip()  # torch's message carries ANSI styles
        first = f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__
        raise CheckpointError(
            f"{path}: not a loadable checkpoint ({first}). kdkit loads checkpoints with "
            "torch.load(weights_only=True) and refuses files that need arbitrary pickled objects."
        ) from None


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file (used to reference a teacher without copying it)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def rng_state() -> dict[str, Any]:
    """All random states (Python, NumPy, torch CPU and CUDA) in a `weights_only`-loadable form."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": list(random.getstate()[1]) + [random.getstate()[2] or 0.0],
        "python_version": random.getstate()[0],
        "numpy": torch.from_numpy(np_state[1].astype(np.int64)),
        "numpy_pos": int(np_state[2]),
        "numpy_gauss": [int(np_state[3]), float(np_state[4])],  # legacy normal() caches a second draw
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `rng_state` captured."""
    python = state["python"]
    random.setstate((state["python_version"], tuple(int(v) for v in python[:-1]), python[-1] or None))
    has_gauss, cached = state.get("numpy_gauss", (0, 0.0))
    np.random.set_state(
        ("MT19937", state["numpy"].numpy().astype(np.uint32), state["numpy_pos"], has_gauss, cached)
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
