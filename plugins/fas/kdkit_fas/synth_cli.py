"""``kdkit fas synth``: write the synthetic FAS data set (plain folder layout, meta.csv, synth.json)."""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.table import Table

from kdkit.errors import UsageError
from kdkit.utils.checkpoint import OutputDirError
from kdkit.utils.runlog import output
from kdkit.utils.workers import Interrupted

from .synth import SPLITS, VIDEOS_PER_SUBJECT, SynthSummary, generate


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the options of ``kdkit fas synth`` to ``parser``."""
    parser.add_argument("--out", type=Path, required=True, help="new or empty folder for the data set")
    parser.add_argument("--n-subjects", type=int, default=30, help="subjects, split 60/20/20 %% (default 30)")
    parser.add_argument("--dev-subjects", type=int, help="subjects in dev (default 20 %%; 0: no dev split)")
    parser.add_argument(
        "--test-subjects", type=int, help="subjects in test (default 20 %%; 0: no test split)"
    )
    parser.add_argument("--frames", type=int, default=4, help="frames per video (default 4)")
    parser.add_argument("--size", type=int, default=64, help="image side in pixels (default 64)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--workers", type=int, default=1, help="worker processes (default 1)")


def _table(summary: SynthSummary) -> Table:
    """Frames (videos) per split and attack type."""
    title = f"{summary.out} ({'already complete, nothing written' if summary.reused else 'written'})"
    table = Table(title=title)
    table.add_column("split")
    table.add_column("subjects", justify="right")
    for kind in VIDEOS_PER_SUBJECT:
        table.add_column(f"{kind} frames (videos)", justify="right")
    for split in SPLITS:
        cells = [f"{summary.frames[split][k]} ({summary.videos[split][k]})" for k in VIDEOS_PER_SUBJECT]
        table.add_row(split, str(summary.subjects[split]), *cells)
    return table


def run(args: argparse.Namespace) -> int:
    """Generate the data set (0). Bad options raise `UsageError`, an occupied ``--out``
    `OutputDirError` and an interruption `Interrupted`; `kdkit.cli.main` reports them."""
    try:
        summary = generate(
            args.out,
            n_subjects=args.n_subjects,
            frames=args.frames,
            size=args.size,
            seed=args.seed,
            workers=args.workers,
            progress=True,
            dev_subjects=args.dev_subjects,
            test_subjects=args.test_subjects,
        )
    except (FileExistsError, NotADirectoryError) as exc:
        raise OutputDirError(str(exc)) from None
    except OutputDirError:
        raise  # another process writes --out (kdkit.utils.lock.OutputLocked)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    except Interrupted as exc:
        raise Interrupted(f"{exc}; continue with: {args.command_line}", exc.signum) from None
    output.print(_table(summary))
    output.print(f"{summary.total_frames} frames in {summary.seconds:.1f} s", highlight=False)
    return 0
