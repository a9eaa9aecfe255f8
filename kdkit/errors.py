"""Error categories that decide a command's exit status (in `kdkit.cli.main`, the one place that does).

Bad input (exit 2) has its own types where it is found (`RecipeError`, `DataError`, ...); this
module holds the category of work that started and failed (exit 1), for errors of modules that
cannot import each other.
"""

from __future__ import annotations


class RunFailed(RuntimeError):
    """Work that started and failed (exit status 1), e.g. an export whose scores differ."""
