"""The `kdkit` command line: one module per group of commands (run.py: run, validate, info;
discover.py: taps, plugins; export.py, predict.py, evaluate.py, ablate.py, bench.py), their shared
arguments (arguments.py) and the parser and exit codes (entry.py). The library never imports it.

Exit status: 0 success, 1 a run failed (diverged, data/model problem found while running),
2 bad input (recipe, arguments, files), 128 + signal interrupted (130 Ctrl-C, 143 SIGTERM).
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    """Console entry point; returns the exit status."""
    try:
        # torch and timm take seconds to import: a Ctrl-C meanwhile is an interruption, not a traceback
        from kdkit.cli.entry import run
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return run(argv)


if __name__ == "__main__":
    sys.exit(main())
