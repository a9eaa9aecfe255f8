"""What training shows people on the console: a stage's epoch lines (aligned columns under a
header, `EpochPrinter`) and the running terms beside the progress bar (`step_info`). The loop
(`kdkit.training.trainer`) decides when; this module decides how it looks."""

from __future__ import annotations

from typing import Any

from kdkit.utils.runlog import AlignedLines, Column, console

EPOCH_LINE_WIDTH = 100  # the epoch line's most columns: less important columns go, never a wrap


def rate_text(rate: float) -> str:
    """A rate for people: `1234` from 10 up, two significant digits below (`3.4`, `0.42`), so that a
    slow step shows as 0.42 img/s, not 0 img/s."""
    return f"{rate:.0f}" if rate >= 10 else f"{rate:.2g}"


def main_terms(names: list[str]) -> list[str]:
    """The loss and the terms it is made of, not their parts (`feat`, not `feat.0`, `feat.1`)."""
    return [name for name in dict.fromkeys(["loss", *names]) if name in names and "." not in name]


def step_info(means: dict[str, float], rate: float) -> str:
    """The text beside the progress bar: the running means of the main loss terms and the images
    per second (`loss=0.693 kd=0.120 1234 img/s`)."""
    shown = " ".join(f"{name}={means[name]:.3f}" for name in main_terms(list(means)))
    return f"{shown} {rate_text(rate)} img/s"


def epoch_lines(stage: str, epochs: int, terms: list[str], monitors: list[str]) -> AlignedLines:
    """The columns of a stage's epoch lines: epoch k/N, the main loss terms, the monitored
    metrics, the learning rate and the epoch's seconds, at most `EPOCH_LINE_WIDTH` (or the
    console's) columns wide: the learning rate, the seconds and the last terms go first."""
    shown = main_terms(terms)
    columns = [
        Column("epoch", spec="", width=2 * len(str(epochs)) + 1, rank=0),
        *(Column(t, rank=1 if t == "loss" else 3) for t in shown),
        *(Column(m, rank=2) for m in monitors),
        Column("lr", spec=".2e", width=8, rank=5),
        Column("sec", spec=".1f", width=7, rank=4),
    ]
    return AlignedLines(f"[{stage}]", columns, min(console.width, EPOCH_LINE_WIDTH))


class EpochPrinter:
    """Prints a stage's epoch lines on the console: a header over the first line, its columns fixed
    by that epoch's loss terms and the evaluator's `monitor`, then one line per epoch."""

    def __init__(self, stage: str, epochs: int, monitor: str) -> None:
        self.stage, self.epochs, self.monitor = stage, epochs, monitor
        self.lines: AlignedLines | None = None  # the columns, fixed at the first epoch

    def print(self, record: dict[str, Any], lr: float, seconds: float) -> None:
        """One epoch's line from its metrics-log `record` (`epoch`, `train/<term>` and the metrics),
        its learning rate and its seconds (the header first, at the first epoch)."""
        terms = {k.removeprefix("train/"): v for k, v in record.items() if k.startswith("train/")}
        if self.lines is None:
            self.lines = epoch_lines(self.stage, self.epochs, list(terms), [self.monitor])
            _print(self.lines.header())
        epoch = f"{record['epoch']}/{self.epochs}"
        _print(self.lines.line({**record, **terms, "epoch": epoch, "lr": lr, "sec": seconds}))


def _print(line: str) -> None:
    """A line on the console as it is: its brackets are text, and it never wraps."""
    console.print(line, markup=False, highlight=False, soft_wrap=True)
