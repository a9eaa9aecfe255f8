"""The import graph runs one way: the commands (`kdkit.cli`) import the library, the library
never imports them; the core never imports the deployment package (`kdkit.deploy`) or a plugin."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CLI = REPO / "kdkit" / "cli"
ENTRY_POINTS = {REPO / "kdkit" / "__main__.py"}  # `python -m kdkit` calls the CLI


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
def test_the_library_never_imports_the_commands(path: Path) -> None:
    if path in ENTRY_POINTS or CLI in path.parents:
        return
    found = {n for n in _imports(path) if n == "kdkit.cli" or n.startswith("kdkit.cli.")}
    assert not found, f"{path.relative_to(REPO)} imports {found}: the library must not depend on its commands"


def test_the_core_never_imports_deployment() -> None:
    deploy = REPO / "kdkit" / "deploy"
    core = [p for p in (REPO / "kdkit").rglob("*.py") if p not in ENTRY_POINTS and deploy not in p.parents]
    core = [p for p in core if CLI not in p.parents]
    assert len(core) > 40  # the walk sees the core modules, in their subpackages
    for path in core:
        found = {n for n in _imports(path) if n.startswith("kdkit.deploy")}
        assert not found, f"{path.relative_to(REPO)} imports {found}"


def test_the_commands_live_in_the_cli_package() -> None:
    """Every `add_parser` of a core command is in kdkit/cli/; the library registers no command."""
    outside = [
        p.relative_to(REPO)
        for p in (REPO / "kdkit").rglob("*.py")
        if CLI not in p.parents and "def add_parser(" in p.read_text()
    ]
    assert not outside


def test_the_core_never_imports_a_plugin() -> None:
    plugins = {p.name for p in PLUGIN_PACKAGES}
    assert plugins  # the walk sees the FAS plugin's package
    for path in (REPO / "kdkit").rglob("*.py"):
        found = {n.split(".")[0] for n in _imports(path)} & plugins
        assert not found, f"{path.relative_to(REPO)} imports {found}"
