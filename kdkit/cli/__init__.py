"""The `kdkit` command line: one module per group of commands (run.py: run, validate, info;
discover.py: taps, plugins; export.py, predict.py, evaluate.py, ablate.py, bench.py, store.py), their shared
arguments (arguments.py) and the parser and exit codes (entry.py). The library never imports it.

Exit status: 0 success, 1 a run failed (diverged, data/model problem found while running),
2 bad input (recipe, arguments, files), 128 + signal interrupted (130 Ctrl-C, 143 SIGTERM).
"""

from __future__ import annotations

import signal
import sys
import threading


def main(argv: list[str] | None = None) -> int:
    """Console entry point; returns the exit status."""
    # torch and timm take seconds to import. A Ctrl-C meanwhile is only noted: raised inside their
    # C++ initialisation it would abort the interpreter (SIGABRT) instead of stopping it.
    signals: list[int] = []
    main_thread = threading.current_thread() is threading.main_thread()  # signals go there only
    if main_thread:
        previous = signal.signal(signal.SIGINT, lambda signum, _frame: signals.append(signum))
    try:
        from kdkit.cli.entry import run
    finally:
        if main_thread:
            signal.signal(signal.SIGINT, previous)
    if signals:
        print("interrupted", file=sys.stderr)
        return 130
    return run(argv)


if __name__ == "__main__":
    sys.exit(main())
