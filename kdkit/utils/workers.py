"""Work in worker processes that stop cleanly: a Ctrl-C, a SIGTERM or a dead worker ends the command
within seconds, with exit status 128 + signal, one line of explanation and no worker traceback.

The command's process coordinates: `stop_on_signals()` turns its first SIGINT/SIGTERM into
`Interrupted`, and `WorkerPool` then asks every worker to stop (SIGTERM: a training worker saves
its step and stops), waits `GRACE_SECONDS` (less after a second Ctrl-C) and kills the rest.
Workers never act on SIGINT (they start with it ignored and keep it blocked, so a terminal's
Ctrl-C to the whole process group reaches the coordinator alone), and a worker that dies or is
stopped by someone else stops the pool with `Interrupted` (or `WorkerError`) naming its task,
where `multiprocessing.Pool` would wait for it for ever.

A pool can also give each worker process its own environment variables, one set per slot
(`environments`): a worker holds a slot from its start to its end, then gives it back, so no two
live workers share one. `kdkit ablate --gpus` confines each run to its own GPUs this way.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import pickle
import signal
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from typing import Any

GRACE_SECONDS = 5.0  # for workers to save and stop before they are killed
SIGNALS = (signal.SIGINT, signal.SIGTERM)
_HURRY = threading.Event()  # set by a second signal: stop the workers now


class Interrupted(KeyboardInterrupt):
    """A signal stopped a command (exit status 128 + `signum`); the message says what was saved
    and the command that continues."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.signum = signum

    def __reduce__(self) -> tuple[Any, ...]:
        return type(self), (str(self), self.signum)


class WorkerError(RuntimeError):
    """A worker process ended without a result and without being signalled (exit status 1)."""


def signal_name(signum: int) -> str:
    """'SIGINT' for 2."""
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


@contextlib.contextmanager
def stop_on_signals() -> Iterator[None]:
    """While the block runs, the first SIGINT or SIGTERM raises `Interrupted` (the signal's name as
    its message) and later ones only make a `WorkerPool` stop its workers at once. Outside the main
    thread (where Python cannot handle signals) this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def first(signum: int, _frame: Any) -> None:
        for sig in SIGNALS:
            signal.signal(sig, later)
        raise Interrupted(signal_name(signum), signum)

    def later(_signum: int, _frame: Any) -> None:
        _HURRY.set()

    _HURRY.clear()
    previous = {sig: signal.signal(sig, first) for sig in SIGNALS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


# ------------------------------------------------------------------------------------ workers
def _stop(signum: int, _frame: Any) -> None:
    raise Interrupted(signal_name(signum), signum)


def _serve(
    conn: Connection, function: Callable[[Any], Any], initializer: Callable[[], None] | None, fresh: bool
) -> None:
    """A worker's life: run tasks from `conn` until it closes (one task when `fresh`), answering
    ("done", result), ("error", exception) or ("stopped", signum)."""
    # Inherited from the start ignored; blocked too, because code run here (the trainer) may install
    # its own SIGINT handler: the coordinator alone decides what a Ctrl-C does.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    signal.signal(signal.SIGTERM, _stop)
    try:
        if initializer is not None:
            initializer()
        while True:
            task = conn.recv()
            try:
                reply: tuple[str, Any] = ("done", function(task))
            except Exception as exc:  # reported to the coordinator, which raises it
                reply = ("error", _portable(exc))
            conn.send(reply)
            if fresh:
                return
    except KeyboardInterrupt as exc:  # SIGTERM here, or the trainer's save-and-stop
        with contextlib.suppress(OSError):
            conn.send(("stopped", getattr(exc, "signum", signal.SIGTERM)))
    except EOFError:  # the coordinator closed the connection: no more tasks
        pass
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # while exiting, a SIGTERM just ends it


def _portable(exc: Exception) -> Exception:
    """`exc` if it survives pickling with its message, else a `WorkerError` with its text."""
    try:
        copy = pickle.loads(pickle.dumps(exc))
        if str(copy) == str(exc):
            return exc
    except Exception:  # any pickling failure: fall back to the text
        pass
    return WorkerError(f"{type(exc).__name__}: {exc}")


class SlotQueue:
    """Slots 0..n-1 (e.g. GPU sets) that workers hold one at a time: `take` the free slot that was
    given back first, `give_back` it when its worker ends. A slot is never held twice at once."""

    def __init__(self, count: int) -> None:
        self.free = deque(range(count))

    def take(self) -> int:
        """A free slot; a `RuntimeError` when every slot is held (the caller starts no worker then)."""
        if not self.free:
            raise RuntimeError("every slot is held")
        return self.free.popleft()

    def give_back(self, slot: int) -> None:
        """Free `slot` again."""
        if slot in self.free:
            raise RuntimeError(f"slot {slot} was not held")
        self.free.append(slot)


@contextlib.contextmanager
def _environment(variables: Mapping[str, str]) -> Iterator[None]:
    """`os.environ` with `variables` set while the block runs (a spawned child copies it at its start)."""
    previous = {name: os.environ.get(name) for name in variables}
    os.environ.update(variables)
    try:
        yield
    finally:
        for name, value in previous.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@dataclass
class _Worker:
    process: Any  # multiprocessing's SpawnProcess
    conn: Connection
    slot: int | None = None  # its environment's index, given back when it ends
    task: Any = None
    busy: bool = False


class WorkerPool:
    """`function(task)` for many tasks in `processes` spawned worker processes (a fresh one per task
    with `fresh`, so tasks cannot leak state into each other), stopped cleanly on interrupt.

    Use it as a context manager, inside `stop_on_signals()`::

        with stop_on_signals(), WorkerPool(work, 4) as pool:
            for result in pool.run(tasks):
                ...

    `run` yields results in completion order. A task that raises re-raises its exception here; a
    worker stopped by a signal raises `Interrupted` (exit status 128 + that signal) and one that died
    otherwise `WorkerError`, both naming the task by `describe(task)`. Leaving the block, normally or
    not, ends every worker.

    With `environments`, at most one worker per entry runs at a time and each starts with a free
    entry's variables set (see `SlotQueue`).
    """

    def __init__(
        self,
        function: Callable[[Any], Any],
        processes: int,
        *,
        fresh: bool = False,
        initializer: Callable[[], None] | None = None,
        describe: Callable[[Any], str] = str,
        environments: Sequence[Mapping[str, str]] | None = None,
    ) -> None:
        self.function, self.processes, self.fresh = function, max(1, processes), fresh
        self.environments = list(environments) if environments is not None else None
        self.slots = SlotQueue(len(self.environments)) if self.environments is not None else None
        if self.environments is not None:
            self.processes = min(self.processes, len(self.environments))
        self.initializer, self.describe = initializer, describe
        self.workers: list[_Worker] = []
        # spawn, never fork: a forked child can inherit a lock held by one of this process's threads
        # (OpenCV's, torch's) and hang, or inherit CUDA state
        self.context = multiprocessing.get_context("spawn")

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *_: object) -> None:
        if exc_type is None:  # every task done: idle workers exit when their connection closes
            for worker in self.workers:
                worker.conn.close()
            self._end(GRACE_SECONDS, ask=False)
        else:
            self._end(0.0 if _HURRY.is_set() else GRACE_SECONDS, ask=True)

    def run(self, tasks: Iterable[Any]) -> Iterator[Any]:
        """Run every task; yield each result as it arrives."""
        pending = deque(tasks)
        while pending or any(w.busy for w in self.workers):
            while pending:
                worker = next((w for w in self.workers if not w.busy), None)
                if worker is None and len(self.workers) < self.processes:
                    worker = self._start()
                if worker is None:
                    break
                worker.task, worker.busy = pending.popleft(), True
                with contextlib.suppress(OSError):  # a worker that died is found by its sentinel
                    worker.conn.send(worker.task)
            busy = [w for w in self.workers if w.busy]
            ready = set(wait([w.conn for w in busy] + [w.process.sentinel for w in busy]))
            for worker in busy:
                if worker.conn in ready or worker.process.sentinel in ready:
                    yield self._collect(worker)

    def _start(self) -> _Worker:
        parent, child = self.context.Pipe()
        process = self.context.Process(
            target=_serve, args=(child, self.function, self.initializer, self.fresh), name="kdkit-worker"
        )
        # The child inherits an ignored SIGINT through exec, so a Ctrl-C while it imports cannot
        # print a traceback (a Ctrl-C in these milliseconds is lost here too; a second one works).
        main = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN) if main else None
        slot = self.slots.take() if self.slots is not None else None
        try:
            with _environment(self.environments[slot] if self.environments and slot is not None else {}):
                process.start()
        except BaseException:  # no worker holds the slot
            if self.slots is not None and slot is not None:
                self.slots.give_back(slot)
            raise
        finally:
            if previous is not None:
                signal.signal(signal.SIGINT, previous)
        child.close()
        worker = _Worker(process, parent, slot)
        self.workers.append(worker)
        return worker

    def _collect(self, worker: _Worker) -> Any:
        """The reply of a busy worker whose connection or process is ready; raise for failures."""
        task, worker.busy = worker.task, False
        kind, value = "died", None
        # A reply sent just before the worker exited still counts; one cut short by its death does not.
        with contextlib.suppress(Exception):
            if worker.conn.poll():
                kind, value = worker.conn.recv()
        if kind == "done":
            if self.fresh:
                self._retire(worker)
            return value
        if kind == "error":
            raise value
        self._retire(worker)
        if kind == "stopped":
            raise Interrupted(f"{self.describe(task)}: its worker process got {signal_name(value)}", value)
        code = worker.process.exitcode
        if code is not None and code < 0:
            raise Interrupted(
                f"{self.describe(task)}: its worker process was killed by {signal_name(-code)}", -code
            )
        raise WorkerError(
            f"{self.describe(task)}: its worker process ended with exit status {code} and no result"
        )

    def _retire(self, worker: _Worker) -> None:
        """Reap a worker that answered its last task or died (killing it if it does not end)."""
        worker.process.join(GRACE_SECONDS)
        if worker.process.is_alive():
            worker.process.kill()
            worker.process.join()
        worker.conn.close()
        if self.slots is not None and worker.slot is not None:
            self.slots.give_back(worker.slot)
        self.workers.remove(worker)

    def _end(self, grace: float, ask: bool) -> None:
        """End every worker: ask the live ones to stop (SIGTERM: save and stop) when `ask`, wait up
        to `grace` seconds, kill the ones left."""
        live = [w for w in self.workers if w.process.is_alive()]
        if ask:
            for worker in live:
                worker.process.terminate()
        deadline = time.monotonic() + grace
        with contextlib.suppress(KeyboardInterrupt):  # (without stop_on_signals) a second Ctrl-C: kill now
            while live and time.monotonic() < deadline and not _HURRY.is_set():
                wait([w.process.sentinel for w in live], timeout=0.1)
                live = [w for w in live if w.process.is_alive()]
        for worker in live:
            worker.process.kill()
        for worker in self.workers:
            worker.process.join()
            worker.conn.close()
        self.workers = []
