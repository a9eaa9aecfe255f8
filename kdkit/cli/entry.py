"""The parser of every command and the one place where errors become exit codes
(see `kdkit.cli` for the codes)."""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import shlex
import sys

from rich.markup import escape

from kdkit import __version__
from kdkit.config.schema import RecipeError
from kdkit.errors import DataError, EnvironmentSettingError, RunFailed, UsageError
from kdkit.models.factory import ModelError
from kdkit.plugins import load_plugins
from kdkit.registry import COMMANDS, RegistryError
from kdkit.training.trainer import TrainingDiverged, TrainingInterrupted
from kdkit.utils.checkpoint import CheckpointError, OutputDirError
from kdkit.utils.runlog import console, progress_settings
from kdkit.utils.workers import Interrupted, WorkerError, stop_on_signals

# The core commands, one module per group; each module has `add_parser(subparsers)`.
COMMAND_MODULES: tuple[str, ...] = (
    "kdkit.cli.run",
    "kdkit.cli.discover",
    "kdkit.cli.export",
    "kdkit.cli.predict",
    "kdkit.cli.evaluate",
    "kdkit.cli.ablate",
    "kdkit.cli.bench",
    "kdkit.cli.store",
)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every core and plugin subcommand."""
    parser = argparse.ArgumentParser(prog="kdkit", description="Knowledge distillation for PyTorch.")
    parser.add_argument("--version", action="version", version=f"kdkit {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in COMMAND_MODULES:
        importlib.import_module(module).add_parser(sub)
    for name in COMMANDS:  # plugin commands
        COMMANDS.get(name)(sub)
    return parser


# ------------------------------------------------------------------------------------ entry
def _error(exc: Exception) -> None:
    console.print("[red]error:[/red]", escape(str(exc)), soft_wrap=True)


def run(argv: list[str] | None = None) -> int:
    """Parse `argv` (default: sys.argv), run the command and return its exit status."""
    # A SIGTERM stops a command as a Ctrl-C does, except in torchrun's ranks (their stop stays collective);
    # installed here once for every command, plugin commands included.
    single = int(os.environ.get("WORLD_SIZE", "1")) <= 1
    try:
        with stop_on_signals() if single else contextlib.nullcontext():
            for info in load_plugins().values():
                if info.error:
                    console.print(
                        f"[yellow]warning: plugin {info.name!r} failed to load: {info.error}[/yellow]"
                    )
            args = build_parser().parse_args(argv)
            progress_settings()  # a bad $KDKIT_PROGRESS_* is bad input, refused before any work
            # As typed, for messages that say how to continue and for the lock files naming a writer.
            args.command_line = shlex.join(["kdkit", *(sys.argv[1:] if argv is None else argv)])
            return args.func(args)
    except (
        RecipeError,
        UsageError,
        ModelError,
        DataError,
        EnvironmentSettingError,
        CheckpointError,
        OutputDirError,
        RegistryError,
    ) as exc:
        _error(exc)
        return 2
    except (TrainingDiverged, WorkerError, RunFailed) as exc:
        _error(exc)
        return 1
    except OSError as exc:  # disk full, permission denied, ... while writing: name the file, no traceback
        where = f"{exc.filename}: " if exc.filename else ""
        _error(OSError(f"{where}{exc.strerror or exc}"))
        return 1
    except (TrainingInterrupted, Interrupted) as exc:  # one line: what was saved, how to continue
        console.print(f"[yellow]interrupted:[/yellow] {escape(str(exc))}", soft_wrap=True)
        return 128 + exc.signum
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/yellow]")
        return 130
