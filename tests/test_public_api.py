"""The import paths users rely on keep working after the modules moved into subpackages: every
public name of every kdkit 0.2 module from its 0.2 path, everything in `kdkit.__all__`, what the FAS
plugin imports, and the entry points (`import kdkit` stays torch-free: tests/cli/test_startup.py).
The 0.2 names are read from 0.2.0's sources (tests/fixtures/kdkit-0.2.0/public_names.json), so a
name dropped by mistake fails here by name."""

from __future__ import annotations

import importlib
import json
from importlib.metadata import entry_points

import pytest
from conftest import REPO

import kdkit
from kdkit._moved import MOVED_MODULES, MOVED_NAMES

PUBLIC_0_2 = json.loads((REPO / "tests" / "fixtures" / "kdkit-0.2.0" / "public_names.json").read_text())


@pytest.mark.parametrize("module", sorted(PUBLIC_0_2))
def test_every_public_name_of_0_2_imports_from_its_0_2_path(module: str) -> None:
    imported = importlib.import_module(module)
    missing = [name for name in PUBLIC_0_2[module] if not hasattr(imported, name)]
    assert not missing, f"{module} lost {missing}"


def test_a_0_2_path_hands_out_the_objects_of_the_new_one() -> None:
    from kdkit.adapters import build_adapter
    from kdkit.distiller import SupervisedTask

    from kdkit.distill.adapters import build_adapter as now
    from kdkit.training.task import SupervisedTask as task_now

    assert build_adapter is now and SupervisedTask is task_now
    assert all(importlib.import_module(new) for new in MOVED_MODULES.values())
    for (old, name), target in MOVED_NAMES.items():
        module, _, renamed = target.partition(":")
        now = getattr(importlib.import_module(module), renamed or name)
        assert getattr(importlib.import_module(old), name) is now, (old, name)
    with pytest.raises(AttributeError):
        importlib.import_module("kdkit.trainer").no_such_name  # noqa: B018


def test_the_old_paths_are_not_files_any_more() -> None:
    """The flat modules are gone (their names live on only through kdkit._moved)."""
    for old in MOVED_MODULES:
        assert not (REPO / (old.replace(".", "/") + ".py")).exists(), old


def test_everything_in_all_resolves() -> None:
    assert all(getattr(kdkit, name) is not None for name in kdkit.__all__)


def test_the_entry_points_load() -> None:
    (script,) = [e for e in entry_points(group="console_scripts") if e.name == "kdkit"]
    assert callable(script.load())
    plugins = {e.name: e for e in entry_points(group="kdkit.plugins")}
    assert "fas" in plugins and callable(plugins["fas"].load())
