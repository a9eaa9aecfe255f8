"""Test helpers for interrupting `kdkit` commands: a command in a subprocess of its own process
group (as a terminal runs it), its output read while it runs, signals sent to it, its group or one
of its worker processes, and a process that holds an output folder's lock."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

# Wide enough that rich wraps no line the tests look for.
ENV = {**os.environ, "COLUMNS": "250"}


class Command:
    """`kdkit ARGV...` running in `cwd`."""

    def __init__(self, *argv: str | Path, cwd: Path) -> None:
        self.line = " ".join(["kdkit", *map(str, argv)])
        self.process = subprocess.Popen(
            [sys.executable, "-m", "kdkit", *map(str, argv)],
            cwd=cwd,
            env=ENV,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,  # its own process group, as a terminal's job
        )
        self.out: list[str] = []
        self.err: list[str] = []
        self.readers = [
            threading.Thread(target=self._read, args=(stream, lines), daemon=True)
            for stream, lines in ((self.process.stdout, self.out), (self.process.stderr, self.err))
        ]
        for reader in self.readers:
            reader.start()

    @staticmethod
    def _read(stream: object, lines: list[str]) -> None:
        for line in stream:  # type: ignore[attr-defined]
            lines.append(line)

    def wait_until(self, ready: Callable[[], bool], what: str, timeout: float = 120) -> None:
        """Wait until `ready()`; fail naming `what` when the command ends first or time runs out."""
        deadline = time.monotonic() + timeout
        while not ready():
            if self.process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"{self.line}: never got to {what}; stderr:\n{''.join(self.err)}")
            time.sleep(0.02)

    def wait_for(self, text: str, timeout: float = 120) -> None:
        """Wait until stderr shows `text`."""
        self.wait_until(lambda: text in "".join(self.err), repr(text), timeout)

    def workers(self) -> list[int]:
        """Pids of the command's worker processes (spawned children, not multiprocessing's tracker)."""
        pid = self.process.pid
        try:
            children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        except OSError:
            return []
        found = []
        for child in children:
            try:
                command = Path(f"/proc/{child}/cmdline").read_bytes()
            except OSError:
                continue
            if b"spawn_main" in command and b"resource_tracker" not in command:
                found.append(int(child))
        return found

    def send(self, signum: int, to: str = "group") -> None:
        """`signum` to the command's process group (a terminal's Ctrl-C), its main process or a worker."""
        if to == "group":
            os.killpg(self.process.pid, signum)
        elif to == "main":
            os.kill(self.process.pid, signum)
        else:
            self.wait_until(lambda: bool(self.workers()), "a worker process")
            os.kill(self.workers()[0], signum)

    def finish(self, timeout: float = 60) -> tuple[int, str, str]:
        """Exit status, stdout and stderr; fails (after killing it) when it is still running."""
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
            pytest.fail(f"{self.line}: still running {timeout} s later (hangs); stderr:\n{''.join(self.err)}")
        for reader in self.readers:
            reader.join(10)
        return self.process.returncode, "".join(self.out), "".join(self.err)


def assert_one_continue_line(err: str, command: str) -> None:
    """Exactly one line says how to continue, and it gives `command`; no traceback anywhere."""
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if "continue with:" in line]
    assert len(lines) == 1, err
    assert lines[0].startswith("interrupted: ") and lines[0].endswith(f"continue with: {command}"), lines[0]


class LockHolder:
    """Another process holding the write locks of `folders` (`kdkit.utils.lock.exclusive`)."""

    CODE = (
        "import contextlib, sys, time\n"
        "from kdkit.utils.lock import exclusive\n"
        "with contextlib.ExitStack() as stack:\n"
        "    for folder in sys.argv[1:]:\n"
        "        stack.enter_context(exclusive(folder, 'kdkit holder --out x'))\n"
        "    print('locked', flush=True)\n"
        "    time.sleep(120)\n"
    )

    def __init__(self, *folders: Path) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-c", self.CODE, *map(str, folders)], stdout=subprocess.PIPE, text=True
        )
        assert self.process.stdout is not None and self.process.stdout.readline() == "locked\n"

    def __enter__(self) -> LockHolder:
        return self

    def __exit__(self, *_: object) -> None:
        self.process.kill()
        self.process.wait()


def assert_refused_by_lock(err: str, folder: Path, holder: LockHolder) -> None:
    """The message names the folder, the holder's pid and its command line; no traceback."""
    assert "Traceback" not in err, err
    assert f"{folder}: another process is writing there (pid {holder.process.pid} on " in err, err
    assert "running: kdkit holder --out x" in err, err
