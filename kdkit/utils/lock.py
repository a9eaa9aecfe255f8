"""Advisory file locks (POSIX `flock`): one writer per output folder, one trainer per cache entry.

`exclusive(folder)` is what a command holds while it writes `folder` (`kdkit run`, `ablate`,
`fas prepare`, `fas synth`): a non-blocking lock on the hidden file `.<folder name>.lock` beside
the folder, so the lock never shows inside a run, a data set or a folder that is renamed into
place, and it is removed when the command ends. A second process is refused at once with
`OutputLocked`, which names the holder: the pid, host, start time and command line it wrote into
the lock file. `locked(path)` waits instead (two runs that need the same cached stage: the second
waits for the first to train it).

The kernel releases a lock when its process ends, however it ends, so a lock file left behind by
a killed process never blocks anyone.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shlex
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from kdkit.utils.checkpoint import OutputDirError


class OutputLocked(OutputDirError):
    """Another process is writing the output folder (exit status 2)."""


def lock_path(folder: Path) -> Path:
    """The lock file of `folder`: `.<name>.lock` in its parent folder."""
    folder = Path(folder).absolute()
    return folder.parent / f".{folder.name}.lock"


@contextlib.contextmanager
def exclusive(folder: str | Path, command: str | None = None) -> Iterator[None]:
    """Hold the write lock of `folder` for the block; raise `OutputLocked` naming the holder when
    another process has it. `command` (default: this process's command line) is recorded for the
    message another process would show. The lock file is removed when the block ends."""
    folder = Path(folder)
    path = lock_path(folder)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = _acquire(path, folder)
    try:
        record = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "command": command or shlex.join(sys.argv),
        }
        handle.write(json.dumps(record) + "\n")
        handle.flush()
        yield
    finally:
        path.unlink(missing_ok=True)  # before unlocking: see `_acquire`
        handle.close()


def _acquire(path: Path, folder: Path) -> IO[str]:
    """The open, locked, emptied lock file `path`. A file its holder removed between our open and
    our lock is not the lock any more (the next writer creates a new one): open again."""
    while True:
        handle = open(path, "a+", encoding="utf-8")  # noqa: SIM115 (held until the caller's block ends)
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = _holder(handle.read())
            handle.close()
            raise OutputLocked(
                f"{folder}: another process is writing there ({holder}); wait for it to finish or "
                f"stop it, or write elsewhere (lock file {path})"
            ) from None
        try:
            current = os.stat(path).st_ino
        except FileNotFoundError:
            current = None
        if current == os.fstat(handle.fileno()).st_ino:
            handle.seek(0)
            handle.truncate()
            return handle
        handle.close()


def _holder(text: str) -> str:
    """The lock file's record as words: 'pid 123 on host, started ..., running: kdkit run ...'."""
    try:
        record = json.loads(text)
        return (
            f"pid {record['pid']} on {record['host']}, started {record['started']}, "
            f"running: {record['command']}"
        )
    except (ValueError, TypeError, KeyError):
        return "a process that is just starting" if not text.strip() else text.strip()[:300]


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """An exclusive lock on the file `path`, waiting for it; released when the block or process ends."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
