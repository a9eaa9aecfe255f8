"""The import graph runs one way: commands import the library, the library never imports the
commands' entry point (`kdkit.cli`), and the core never imports a plugin."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ENTRY_POINTS = {REPO / "kdkit" / "cli.py", REPO / "kdkit" / "__main__.py"}


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


PLUGIN_PACKAGES = [p for p in (REPO / "plugins").glob("*/*") if (p / "__init__.py").exists()]
MODULES = sorted([*(REPO / "kdkit").rglob("*.py"), *(f for p in PLUGIN_PACKAGES for f in p.rglob("*.py"))])


@pytest.mark.parametrize("path", MODULES, ids=[str(p.relative_to(REPO)) for p in MODULES])
def test_nothing_but_the_entry_point_imports_the_cli(path: Path) -> None:
    if path in ENTRY_POINTS:
        return
    assert not {n for n in _imports(path) if n == "kdkit.cli" or n.startswith("kdkit.cli.")}


def test_the_core_never_imports_a_plugin() -> None:
    plugins = {p.name for p in PLUGIN_PACKAGES}
    assert plugins  # the walk sees the FAS plugin's package
    for path in (REPO / "kdkit").rglob("*.py"):
        found = {n.split(".")[0] for n in _imports(path)} & plugins
        assert not found, f"{path.relative_to(REPO)} imports {found}"
