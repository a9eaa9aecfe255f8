"""Start-up: `import kdkit` is light (its public names load on first use), registries hold their
built-ins without importing the modules that fill them, and a Ctrl-C while the command line
imports torch is an interruption (exit 130, one line), not a traceback."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest

import kdkit


def _python(code: str) -> str:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout


def test_import_kdkit_imports_neither_torch_nor_timm() -> None:
    loaded = _python("import sys, kdkit; print(sorted({'torch', 'timm'} & set(sys.modules)))")
    assert loaded.strip() == "[]"


def test_public_names_load_on_first_use() -> None:
    from kdkit.distill.distiller import Distiller

    assert kdkit.Distiller is Distiller
    for name in kdkit.__all__:  # every advertised name resolves to its module's object
        assert getattr(kdkit, name) is getattr(sys.modules[kdkit._EXPORTS[name]], name)
    try:
        kdkit.not_a_name  # noqa: B018
    except AttributeError as exc:
        assert "not_a_name" in str(exc)
    else:
        raise AssertionError("an unknown attribute must raise AttributeError")


@pytest.mark.slow
def test_registries_hold_their_builtins_without_importing_their_modules() -> None:
    code = (
        "from kdkit.registry import ADAPTERS, DATASETS, EVALUATORS, FEATURE_CRITERIA, TAP_PRESETS\n"
        "print(ADAPTERS.names(), DATASETS.names(), EVALUATORS.names(), FEATURE_CRITERIA.names(), "
        "TAP_PRESETS.names())"
    )
    out = _python(code)
    for name in ("covariance", "digits", "classification", "mse", "vit"):
        assert f"'{name}'" in out


@pytest.mark.slow
def test_ctrl_c_while_the_command_line_starts_is_one_line() -> None:
    process = subprocess.Popen(
        [sys.executable, "-m", "kdkit", "--version"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    time.sleep(1.0)  # the interpreter is up; importing torch and timm takes seconds
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=60)
    if process.returncode == 0:  # the machine imported everything within a second: nothing to test
        assert out.startswith("kdkit ")
        return
    assert process.returncode == 130, err
    assert "Traceback" not in err and "interrupted" in err
