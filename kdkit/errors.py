"""Error categories that decide a command's exit status (in `kdkit.cli.entry`, the one place that does).

Bad input (exit 2) mostly has its own types where it is found (`RecipeError`, `ModelError`, ...);
this module holds the categories that commands and library modules share without importing each
other: bad command-line use, bad data and bad environment settings (exit 2) and work that started
and failed (exit 1).
"""

from __future__ import annotations


class UsageError(ValueError):
    """Bad command-line arguments that argparse cannot catch (exit status 2)."""


class DataError(ValueError):
    """A data set that cannot be used as configured (missing root, empty split, ...) (exit status 2).
    Also importable from `kdkit.data` and `kdkit.data.datasets`, its home before."""


class EnvironmentSettingError(ValueError):
    """A `$KDKIT_*` environment variable with a value kdkit cannot use (exit status 2); the message
    names the variable, its value and what is expected."""


class RunFailed(RuntimeError):
    """Work that started and failed (exit status 1), e.g. an export whose scores differ."""
