"""Run logging: `metrics.jsonl` (one JSON object per line) and the experiment trackers, and the
two consoles: `console` (stderr: progress, logs, warnings, errors) and `output` (stdout: results —
tables, listings — so that `kdkit taps MODEL | grep attn` works).

Progress (`progress`) is a rich bar on a terminal; without one (a log file, a batch scheduler) it is
a plain line on stderr at every `$KDKIT_PROGRESS_STEPS` steps (default: each quarter of the total)
or every `$KDKIT_PROGRESS_SECONDS` seconds (default 30), whichever comes first.

`AlignedLines` lays out lines of fixed-width columns under a header (the trainer's epoch lines),
the same on a terminal and in a log file.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console, ConsoleDimensions
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from kdkit.errors import EnvironmentSettingError
from kdkit.utils.checkpoint import naming_the_file

if TYPE_CHECKING:
    from kdkit.utils.trackers import Tracker

# Columns for output that is not going to a terminal: rich would use 80 (or the width of whichever
# terminal stdin is), cutting long tap paths and wrapping log lines; tables never pad to it.
PIPE_WIDTH = 240
PROGRESS_SECONDS = 30.0  # default of $KDKIT_PROGRESS_SECONDS
PROGRESS_PARTS = 4  # default of $KDKIT_PROGRESS_STEPS: a line at each quarter of the total
# By default a phase shorter than this prints no plain lines at all (its summary line follows at
# once; a 10-step epoch would otherwise fill a log with 4 lines each for training, val and test).
QUIET_SECONDS = 10.0


class _Console(Console):
    """A rich Console laid out `PIPE_WIDTH` columns wide when it does not write to a terminal
    (an explicit width, e.g. from `$COLUMNS`, still wins)."""

    @property
    def size(self) -> ConsoleDimensions:
        """The terminal's size, or `PIPE_WIDTH` columns for a pipe or file."""
        size = super().size
        if self._width is None and not self.is_terminal:
            return ConsoleDimensions(PIPE_WIDTH, size.height)
        return size

    @size.setter
    def size(self, new_size: tuple[int, int]) -> None:
        Console.size.fset(self, new_size)  # type: ignore[attr-defined]


console = _Console(stderr=True, highlight=False)
output = _Console(highlight=False)


def progress_settings() -> tuple[int | None, float]:
    """`$KDKIT_PROGRESS_STEPS` (None: each quarter) and `$KDKIT_PROGRESS_SECONDS` (default 30),
    checked: an EnvironmentSettingError names a bad variable, its value and what is expected."""
    steps, seconds = os.environ.get("KDKIT_PROGRESS_STEPS", ""), os.environ.get("KDKIT_PROGRESS_SECONDS", "")
    problems = []
    if steps and not (steps.isdigit() and int(steps) > 0):
        problems.append(
            f"environment variable KDKIT_PROGRESS_STEPS={steps!r}: expected a whole number of steps >= 1 "
            "(or unset it)"
        )
    try:
        every_seconds = float(seconds) if seconds else PROGRESS_SECONDS
    except ValueError:
        every_seconds = -1.0
    if not every_seconds >= 0:  # also NaN
        problems.append(
            f"environment variable KDKIT_PROGRESS_SECONDS={seconds!r}: expected a number of seconds >= 0 "
            "(or unset it)"
        )
    if problems:
        raise EnvironmentSettingError("; ".join(problems))
    return (int(steps) if steps else None), every_seconds


@contextlib.contextmanager
def progress(
    total: int, description: str, unit: str = "steps", completed: int = 0, show: bool = True
) -> Iterator[Callable[..., None]]:
    """Report the progress of `total` steps (`completed` of them already done, e.g. before a
    resume); yields `advance(n=1, info=None)`, where `info` is text shown after the numbers.

    On a terminal: a transient rich bar on stderr. Otherwise a plain line on stderr —
    `description: done/total unit (pct %), rate unit/s, ETA h:mm:ss, info` — every
    `$KDKIT_PROGRESS_STEPS` steps (default: each quarter, once the work has taken `QUIET_SECONDS`,
    so short phases stay silent) or when `$KDKIT_PROGRESS_SECONDS` (default 30) have passed since
    the last line, and at the end when a line was printed. `show=False`: nothing at all."""
    every_steps, every_seconds = progress_settings()
    if not show:
        yield lambda *_, **__: None
    elif console.is_terminal:
        columns = [
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeRemainingColumn(),
            TextColumn("{task.fields[info]}"),
        ]
        with Progress(*columns, console=console, transient=True) as bar:
            task = bar.add_task(escape(description), total=total, completed=completed, info="")

            def advance_bar(n: int = 1, info: str | None = None) -> None:
                bar.update(task, advance=n, **({} if info is None else {"info": info}))

            yield advance_bar
    else:
        quiet = 0.0 if every_steps else QUIET_SECONDS  # steps asked for explicitly: always shown
        every_steps = every_steps or max(1, -(-total // PROGRESS_PARTS))  # ceil: at most 4 lines
        yield _PlainProgress(total, description, unit, completed, every_steps, every_seconds, quiet).advance


class _PlainProgress:
    """`progress` without a terminal: one plain stderr line now and then (see `progress`)."""

    def __init__(
        self,
        total: int,
        description: str,
        unit: str,
        completed: int,
        every_steps: int,
        every_seconds: float,
        quiet_seconds: float,
    ) -> None:
        self.total, self.description, self.unit = total, description, unit
        self.every_steps, self.every_seconds, self.quiet_seconds = every_steps, every_seconds, quiet_seconds
        self.printed = False
        self.done = self.first = completed
        self.info = ""
        self.start = self.last_line = time.monotonic()

    def advance(self, n: int = 1, info: str | None = None) -> None:
        """Count `n` more steps (`info`: new trailing text); print a line when one is due."""
        if info is not None:
            self.info = info
        if n <= 0:
            return
        before, self.done = self.done, self.done + n
        now = time.monotonic()
        milestone = self.done >= self.total or self.done // self.every_steps > before // self.every_steps
        due = (milestone and (self.printed or now - self.start >= self.quiet_seconds)) or (
            now - self.last_line >= self.every_seconds
        )
        if due:
            self.last_line, self.printed = now, True
            console.print(self.line(now), markup=False, highlight=False, soft_wrap=True)

    def line(self, now: float) -> str:
        """`description: done/total unit (pct %), rate unit/s, ETA h:mm:ss, info`."""
        rate = (self.done - self.first) / max(now - self.start, 1e-9)
        left = max(self.total - self.done, 0)
        eta = str(timedelta(seconds=round(left / rate))) if rate > 0 else "?"
        pct = 100 * self.done / max(self.total, 1)
        text = f"{self.description}: {self.done}/{self.total} {self.unit} ({pct:.0f} %), "
        return text + f"{rate:.3g} {self.unit}/s, ETA {eta}" + (f", {self.info}" if self.info else "")


@dataclass(frozen=True)
class Column:
    """A column of `AlignedLines`: its name (the header, and the key of its value), the format of
    its numbers, its width in characters (the name's at least) and its rank: when a line is too
    wide, the columns of the highest rank go first (rank 0 never)."""

    name: str
    spec: str = "#.4g"  # 4 significant digits, trailing zeros kept: 2.290 under 0.2534
    width: int = 9
    rank: int = 1


class AlignedLines:
    """Lines of right-aligned fixed-width columns under a header line naming them, so that a
    column's values stand under each other from line to line (in a log file as on a terminal).
    Columns that would take the line past `width` characters are left out, least important first
    (the line never wraps)."""

    def __init__(self, prefix: str, columns: list[Column], width: int) -> None:
        self.prefix = prefix
        self.columns = list(columns)
        droppable = sorted((c for c in self.columns if c.rank > 0), key=lambda c: c.rank)
        while droppable and len(self.header()) > width:
            self.columns.remove(droppable.pop())

    def _join(self, cells: list[str]) -> str:
        widths = (max(c.width, len(c.name)) for c in self.columns)
        return " ".join([self.prefix, *(cell.rjust(w) for cell, w in zip(cells, widths, strict=True))])

    def header(self) -> str:
        """The column names, each right-aligned over its column."""
        return self._join([c.name for c in self.columns])

    def line(self, values: dict[str, Any]) -> str:
        """One line of `values` by column name: numbers formatted, text as is, '-' where absent."""
        return self._join([_cell(values.get(c.name), c) for c in self.columns])


def _cell(value: Any, column: Column) -> str:
    """`value` in at most `column.width` characters where it can be: with fewer significant
    digits when its format is too wide (a loss of 12345.678 is shown as 1.235e+04)."""
    if value is None:
        return "-"
    if not isinstance(value, (int, float)):
        return str(value)
    text = format(value, column.spec)
    for digits in (4, 3, 2, 1):
        if len(text) <= max(column.width, len(column.name)):
            break
        text = format(value, f".{digits}g")
    return text


def _clean(value: Any) -> Any:
    """JSON-safe value: non-finite floats become strings so the file stays valid JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


class MetricsLog:
    """Appends metric records to `run_dir/metrics.jsonl` and hands everything a run logs to its
    experiment trackers (`kdkit.utils.trackers`: TensorBoard, MLflow, W&B). A tracker that fails
    during the run is dropped with a warning: the training goes on, metrics.jsonl has every record."""

    def __init__(self, run_dir: Path, trackers: Sequence[Tracker] = ()) -> None:
        self.path = Path(run_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.trackers = list(trackers)

    def write(self, record: dict[str, Any]) -> None:
        """Append one record (it gets a wall-clock `time` field)."""
        record = {"time": round(time.time(), 3), **record}
        with naming_the_file(self.path), open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps({k: _clean(v) for k, v in record.items()}) + "\n")
        self._each("metrics", record)

    def params(self, recipe: dict[str, Any]) -> None:
        """The resolved recipe, to the trackers."""
        self._each("params", recipe)

    def stage_result(self, stage: str, result: dict[str, Any], model: Path | None) -> None:
        """A finished stage's result and model path, to the trackers."""
        self._each("stage_result", stage, result, model)

    def files(self, root: Path, paths: list[Path]) -> None:
        """Artefact files under `root`, to the trackers."""
        self._each("files", root, paths)

    def close(self, failed: bool = False) -> None:
        """End every tracker's run (flushing TensorBoard's files)."""
        self._each("close", failed)
        self.trackers = []

    def _each(self, method: str, *args: Any) -> None:
        for tracker in list(self.trackers):
            try:
                getattr(tracker, method)(*args)
            except Exception as exc:  # a tracker's service failing must not stop hours of training
                self.trackers.remove(tracker)
                console.print(
                    f"warning: {type(tracker).__name__} stopped logging ({type(exc).__name__}: {exc}); "
                    f"{self.path} still has every record",
                    markup=False,
                )
