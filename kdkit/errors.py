"""Error categories that decide a command's exit status (in `kdkit.cli.main`, the one place that does).

Bad input (exit 2) mostly has its own types where it is found (`RecipeError`, `DataError`, ...);
this module holds the categories that commands and library modules share without importing each
other: bad command-line use (exit 2) and work that started and failed (exit 1).
"""

from __future__ import annotations


class UsageError(ValueError):
    """Bad command-line arguments that argparse cannot catch (exit status 2)."""


class RunFailed(RuntimeError):
    """Work that started and failed (exit status 1), e.g. an export whose scores differ."""
