"""The docs stay true to the code: the architecture picture shows the current import graph and the
rules it draws hold, every picture and page a doc links exists, and every `kdkit` command line in
the pages checked names a real command and real options."""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
import shlex
import sys
from pathlib import Path

import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
PAGES = sorted([REPO / "README.md", REPO / "CHANGELOG.md", *(REPO / "docs").glob("*.md")])
# The pages whose command lines are checked option by option (the others quote commands inside
# prose less strictly).
COMMAND_PAGES = [
    REPO / "README.md",
    *(REPO / "docs" / name for name in ("architecture.md", "fas.md", "ablations.md", "quickstart.md")),
    *(REPO / "docs" / name for name in ("deployment.md", "performance.md", "scaling.md")),
]


def _figures():
    spec = importlib.util.spec_from_file_location("figures", REPO / "docs" / "figures.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


figures = _figures()


def test_the_code_keeps_the_rules_the_architecture_picture_draws() -> None:
    graph = figures.build_graph()
    drawn = {*figures.FLOW, "deployment", "foundation", "plugin:kdkit_fas"}
    assert drawn <= set(graph.groups)
    assert "kdkit.training.trainer" in graph.groups["training"]
    assert "kdkit.cli.run" in graph.groups["cli"]
    assert ("cli", "run") in graph.edges  # the walk sees the imports
    assert figures.violations(graph) == []


def test_the_layers_are_the_folders() -> None:
    """Every folder of kdkit/ is drawn (in the flow, as deployment or in the foundation) under the
    purpose its package docstring states, and every module is in its folder's group."""
    graph = figures.build_graph()
    folders = {p.parent.name for p in (REPO / "kdkit").glob("*/__init__.py")}
    assert set(figures.FLOW) < folders and {"config", "data", "utils"} < folders
    for folder in folders:
        assert figures.purpose(folder) != folder, f"kdkit/{folder}/__init__.py states no purpose"
        modules = {m for m in figures.module_files() if figures.folder_of(m) == folder}
        group = {"deploy": "deployment"}.get(folder, folder if folder in figures.FLOW else "foundation")
        assert modules <= set(graph.groups[group]), folder


@pytest.mark.parametrize(
    ("edge", "rule"),
    [
        (("kdkit.training.trainer", "kdkit.cli.run"), "never imports the commands"),
        (("kdkit.distill.taps", "kdkit.training.trainer"), "only imports layers below it"),
        (("kdkit.config.schema", "kdkit.training.trainer"), "move kdkit.config.schema into a folder"),
        (("kdkit.run.pipeline", "kdkit.deploy.modelfile"), "never imports the deployment package"),
        (("kdkit.models.factory", "kdkit_fas.plugin"), "never imports a plugin"),
    ],
)
def test_a_back_edge_is_named_with_the_rule_it_breaks(edge: tuple[str, str], rule: str) -> None:
    graph = figures.Graph(
        groups={}, edges=set(), module_edges={edge, ("kdkit.cli.run", "kdkit.run.pipeline")}
    )
    (problem,) = figures.violations(graph)
    assert problem.startswith(f"{edge[0]}") and rule in problem


def test_relative_imports_resolve_to_their_module() -> None:
    files = figures.module_files()
    path = files["kdkit_fas.metrics_cli"]
    assert "kdkit_fas.metrics" in figures.imports_of("kdkit_fas.metrics_cli", path, set(files))


def test_the_committed_architecture_picture_shows_the_current_code() -> None:
    drawn = Image.open(figures.ARCHITECTURE_PNG).text.get(figures.GRAPH_KEY)
    assert drawn == figures.build_graph().as_json(), (
        "docs/img/architecture.png is out of date with the modules and imports of kdkit/: run `make figures`"
    )


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_every_linked_file_exists(page: Path) -> None:
    text = page.read_text()
    targets = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text)
    local = [t for t in targets if not re.match(r"[a-z]+://", t)]
    missing = [t for t in local if not (page.parent / t).exists()]
    assert not missing, f"{page.name} links missing files: {missing}"
    assert not re.search(r"(?<![\w.])/(work|tmp)/", text), f"{page.name} names a path of a particular machine"


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    # argparse offers no public way to list subparsers
    actions = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(actions[0].choices) if actions else {}


def _options(parser: argparse.ArgumentParser) -> set[str]:
    return {flag for action in parser._actions for flag in action.option_strings}


def _command_lines(page: Path) -> list[str]:
    """`kdkit ...` lines of the page's code blocks, continuation lines joined, comments dropped."""
    lines, in_code = [], False
    for line in page.read_text().replace("\\\n", " ").splitlines():
        if line.lstrip().startswith("```"):
            in_code = not in_code
            continue
        words = line.split("#", 1)[0].split()
        if in_code and words and words[0] in ("kdkit", ".venv/bin/kdkit"):
            lines.append(" ".join(words))
    return lines


def test_every_documented_command_line_names_real_commands_and_options() -> None:
    from kdkit.cli.entry import build_parser
    from kdkit.plugins import load_plugins

    load_plugins()
    commands = _subcommands(build_parser())
    checked = 0
    for page in COMMAND_PAGES:
        for line in _command_lines(page):
            words = shlex.split(line.replace("[", " ").replace("]", " ").replace("|", " "))
            parser = commands.get(words[1])
            assert parser is not None, f"{page.name}: `{line}`: no command {words[1]!r}"
            sub = _subcommands(parser)
            if sub and len(words) > 2 and words[2] in sub:
                parser = sub[words[2]]
            flags = {w.split("=", 1)[0] for w in words if w.startswith("--")}
            unknown = flags - _options(parser)
            assert not unknown, f"{page.name}: `{line}`: {words[1]} has no option {sorted(unknown)}"
            checked += 1
    assert checked > 30  # the pages' code blocks were read


def test_the_bridges_chart_is_drawn_from_ablation_reports(tmp_path: Path) -> None:
    """docs/img/bridges.png comes from the bridge ablations' ablation.json; a folder without them is
    skipped, not an error."""

    def variant(name: str, mean: float | None) -> dict:
        difference = (
            {} if mean is None else {"test/hter": {"mean": mean, "low": mean - 0.02, "high": mean + 0.02}}
        )
        return {"variant": name, "baseline": mean is None, "difference": difference}

    for setting, shift in (("demo-a0.7-b32", 0.0), ("demo-a0.0-b128", 0.01)):
        (tmp_path / setting).mkdir()
        report = {
            "main_metric": "test/hter",
            "variants": [
                variant("alone", None),
                variant("covariance", 0.1 + shift),
                variant("procrustes", -0.05),
            ],
        }
        (tmp_path / setting / "ablation.json").write_text(json.dumps(report))
    chart = tmp_path / "bridges.png"
    figures.draw_bridges(tmp_path, chart)
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    empty = tmp_path / "none"
    empty.mkdir()
    figures.draw_bridges(empty, tmp_path / "skipped.png")
    assert not (tmp_path / "skipped.png").exists()


def test_the_methods_chart_is_redrawn_from_its_ablation_report(tmp_path: Path) -> None:
    """docs/img/methods-digits.png is drawn from the ablation's numbers with today's layout: 13
    methods fit in a bounded width (drawn by an older layout, it was 3,720 px wide)."""
    from conftest import ABLATION_METRIC, fake_ablation_variants

    variants = [v | {"seeds": [0, 1, 2]} for v in fake_ablation_variants(13)]
    report = {"main_metric": ABLATION_METRIC, "direction": "max", "stage": "student_kd", "variants": variants}
    (tmp_path / "ablation.json").write_text(json.dumps(report))
    chart = tmp_path / "methods.png"
    figures.redraw_ablation(tmp_path, chart)
    with Image.open(chart) as image:
        assert image.size[0] <= 2000 and image.size[1] <= 2000
    figures.redraw_ablation(tmp_path / "none", tmp_path / "skipped.png")
    assert not (tmp_path / "skipped.png").exists()


# A measured speed-up ("3× faster", "2.8 times the images/s") is stated once, in docs/performance.md
# beside the command and machine that measured it; other pages link there. Restated, the copies
# drifted apart (README 3×, CHANGELOG 3.3×, fas.md 2.8× for one measurement). A past release's
# CHANGELOG entry may keep its figure, marked "(measured then; current: docs/performance.md#...)".
SPEED_UP = re.compile(r"\d(?:\.\d+)?\s*(?:×|x|times)\s+(?:faster|the images|its speed|a worker's)")


def test_measured_speed_ups_are_stated_only_in_performance_md() -> None:
    restated = [
        f"{page.name}: {line.strip()}"
        for page in PAGES
        if page.name != "performance.md"
        for line in page.read_text().splitlines()
        if SPEED_UP.search(line) and "measured then" not in line
    ]
    assert not restated, "link to docs/performance.md instead of restating its figures:\n" + "\n".join(
        restated
    )
    assert SPEED_UP.search((REPO / "docs" / "performance.md").read_text())  # the one place has them
