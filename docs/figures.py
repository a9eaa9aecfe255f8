"""Draw the documentation's figures (`make figures`).

- `docs/img/architecture.png`: kdkit's modules in layers, with the arrows between layers read
  from the code's imports (`ast`, nothing is imported), so the picture follows the code. Before
  drawing, the rules the picture shows are checked, and a module that breaks one stops the
  script naming it: the library never imports the commands; the layers of the main flow only
  import layers below them; the foundation imports no other layer; the core never imports the
  deployment package or a plugin. The graph is stored in the PNG (text chunk `kdkit-graph`), so
  `tests/test_docs.py` can tell when the picture is out of date.
- `docs/img/roc-det-demo.png`: copied from a finished `kdkit run recipes/kdfas-demo.yaml`
  (`--run`, default `runs/kdfas-demo`).
- `docs/img/ablation-demo.png`: copied from a finished `kdkit ablate` folder (`--ablation`,
  default `runs/ablation-kdfas-demo`).
- `docs/img/methods-digits.png`: redrawn, with kdkit's current chart layout, from the
  `ablation.json` of docs/methods.md's ablation (`--methods`, default `runs/ablation-digits-methods`).
- `docs/img/bridges.png`: every width bridge's paired difference to the student alone, drawn from
  the `ablation.json` of the bridge ablations in `--bridges` (default `runs/bridges`; folders
  `<demo|digits>-a<alpha>-b<batch>`, as docs/adapters.md's "Evidence" runs them).

A copy whose source does not exist is skipped with a note; the architecture is always drawn.
"""

from __future__ import annotations

import argparse
import ast
import json
import shutil
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
IMG = REPO / "docs" / "img"
ARCHITECTURE_PNG = IMG / "architecture.png"
GRAPH_KEY = "kdkit-graph"  # PNG text chunk holding the drawn graph

# The main flow, top to bottom: folders of kdkit/ whose modules import only folders below them.
# Every other folder of kdkit/ (and its top-level modules) is the foundation; each box's title is
# its folder's `__init__.py` docstring (up to a colon), so the folders say what the picture shows.
FLOW = ("cli", "run", "training", "distill")
FOLDERS = sorted(p.parent.name for p in (REPO / "kdkit").glob("*/__init__.py"))
ENTRY_POINTS = {"kdkit", "kdkit.__main__"}  # the package facade and `python -m kdkit`: not drawn
# Calls that are not imports: the trainer runs the task it is given (a Distiller), and kdkit
# finds plugins through the `kdkit.plugins` entry-point group.
RUNTIME = [
    ("training", "distill", "runs task(x, y)"),
    ("foundation", "plugin:*", "plugins.py finds it\nby entry point"),
]


@dataclass
class Graph:
    """Modules per group and the group-level import edges between them."""

    groups: dict[str, list[str]]
    edges: set[tuple[str, str]]
    module_edges: set[tuple[str, str]]

    def as_json(self) -> str:
        """What the picture shows, stored in it: groups with their modules, and the edges."""
        return json.dumps({"groups": self.groups, "edges": sorted(self.edges)}, sort_keys=True)


def module_files(repo: Path = REPO) -> dict[str, Path]:
    """Dotted module name -> file for kdkit/ and every plugin package under plugins/*/."""
    files = sorted((repo / "kdkit").rglob("*.py"))
    files += sorted(f for pkg in (repo / "plugins").glob("*/*/__init__.py") for f in pkg.parent.rglob("*.py"))
    modules = {}
    for path in files:
        parts = list(path.relative_to(repo).with_suffix("").parts)
        if parts[0] == "plugins":
            parts = parts[2:]
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The known modules `name` imports (`from pkg import module` counts as the module)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against the importing module's package
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            found.add(base)
            found |= {f"{base}.{alias.name}" for alias in node.names}
    return {m for m in found & known if m != name}


def folder_of(module: str) -> str:
    """The folder of kdkit/ a module is in ('' for kdkit/'s own modules)."""
    parts = module.split(".")
    return parts[1] if parts[0] == "kdkit" and len(parts) > 1 and parts[1] in FOLDERS else ""


def group_of(module: str) -> str:
    """The group a module is drawn in: its flow folder, deployment, its plugin, or the foundation."""
    package = module.split(".")[0]
    if package != "kdkit":
        return f"plugin:{package}"
    folder = folder_of(module)
    if folder == "deploy":
        return "deployment"
    return folder if folder in FLOW else "foundation"


def purpose(folder: str, repo: Path = REPO) -> str:
    """What a folder is for: its package docstring's first line up to a colon (the box title)."""
    tree = ast.parse((repo / "kdkit" / folder / "__init__.py").read_text())
    return (ast.get_docstring(tree) or folder).splitlines()[0].split(":")[0].rstrip(".")


def build_graph(repo: Path = REPO) -> Graph:
    """Read every module's imports and fold them into groups."""
    files = module_files(repo)
    known = set(files)
    groups: dict[str, list[str]] = {}
    module_edges = set()
    for name, path in files.items():
        if name in ENTRY_POINTS:
            continue
        groups.setdefault(group_of(name), []).append(name)
        module_edges |= {
            (name, other) for other in imports_of(name, path, known) if other not in ENTRY_POINTS
        }
    edges = {(group_of(a), group_of(b)) for a, b in module_edges if group_of(a) != group_of(b)}
    return Graph({g: sorted(m) for g, m in sorted(groups.items())}, edges, module_edges)


def violations(graph: Graph) -> list[str]:
    """Every import that breaks a rule the picture shows (empty when the code keeps them all)."""
    rank = {group: i for i, group in enumerate(FLOW)}
    problems = []
    for a, b in sorted(graph.module_edges):
        ga, gb = group_of(a), group_of(b)
        if gb == "cli" and ga != "cli":
            problems.append(f"{a} imports {b}: the library never imports the commands")
        elif gb.startswith("plugin:") and not ga.startswith("plugin:"):
            problems.append(f"{a} imports {b}: the core never imports a plugin")
        elif gb == "deployment" and ga not in ("cli", "deployment") and not ga.startswith("plugin:"):
            problems.append(f"{a} imports {b}: the core never imports the deployment package")
        elif ga in rank and gb in rank and rank[gb] < rank[ga]:
            problems.append(f"{a} ({ga}) imports {b} ({gb}): the flow only imports layers below it")
        elif ga == "foundation" and gb != "foundation":
            problems.append(
                f"{a} imports {b} ({gb}): the foundation imports no other layer; "
                f"move {a} into a folder of the flow ({', '.join(FLOW)}) or stop the import"
            )
    return problems


# Drawing. Coordinates are fractions of a 12 x 7.6 inch canvas (1200 x 760 px at 100 dpi), cropped
# to what is drawn when saved.
FLOW_X, FLOW_W = 0.13, 0.50
SIDE_X, SIDE_W = 0.68, 0.31
BOX_H, GAP, TOP = 0.095, 0.045, 0.93
LINE = 0.026  # height of one line of module names
LANE = 0.022  # distance between the left-margin lanes of arrows that skip a layer
CHAR = 0.0066  # width of one monospace character of the module lists
COLORS = {
    "cli": "#dbe9f6",
    "run": "#d5ecd4",
    "training": "#fdebd0",
    "distill": "#fadbd8",
    "deployment": "#d6eaf8",
    "plugin": "#fcf3cf",
    "foundation": "#eeeeee",
}
Box = tuple[float, float, float, float]  # x, y (bottom), width, height


def _short(module: str) -> str:
    """A module as its file is named in its folder: `pipeline`, `__init__`."""
    parts = module.split(".")
    return "__init__" if len(parts) == 1 or module == f"kdkit.{folder_of(module)}" else parts[-1]


def _listing(modules: list[str], width: float) -> list[str]:
    """The modules' short names wrapped to a box `width`."""
    return textwrap.wrap("  ".join(_short(m) for m in modules), int((width - 0.02) / CHAR))


def _box(ax, box: Box, title: str, lines: list[str], color: str) -> None:
    """A rounded box: bold title on top, the module lines below it."""
    from matplotlib.patches import FancyBboxPatch

    x, y, w, h = box
    style = "round,pad=0.004,rounding_size=0.01"
    ax.add_patch(FancyBboxPatch((x, y), w, h, boxstyle=style, fc=color, ec="#555555", lw=1))
    ax.text(x + 0.01, y + h - 0.014, title, fontsize=10.5, weight="bold", va="top")
    ax.text(
        x + 0.01,
        y + h - 0.045,
        "\n".join(lines),
        fontsize=9.5,
        family="monospace",
        va="top",
        linespacing=1.35,
    )


def _arrow(ax, points: list[tuple[float, float]], label: str = "", dashed: bool = False) -> None:
    """A polyline through `points` with an arrowhead at the last one, and an optional label."""
    style = "--" if dashed else "-"
    xs, ys = zip(*points[:-1], strict=True)
    ax.plot(xs, ys, style, color="#333333", lw=1.3)
    props = {
        "arrowstyle": "-|>",
        "color": "#333333",
        "lw": 1.3,
        "shrinkA": 0,
        "shrinkB": 0,
        "linestyle": style,
    }
    ax.annotate("", xy=points[-1], xytext=points[-2], arrowprops=props)
    if label:
        (x0, y0), (x1, y1) = points[-2], points[-1]
        ax.text((x0 + x1) / 2 + 0.008, (y0 + y1) / 2, label, fontsize=9, style="italic", va="center")


def draw(graph: Graph, path: Path) -> None:
    """Draw the layered picture of `graph` into `path`, the graph stored in the PNG."""
    from matplotlib.figure import Figure  # Agg canvas, no pyplot global state

    fig = Figure(figsize=(12, 7.6))
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_axis_off()
    ax.set(xlim=(0, 1), ylim=(0, 1))
    title = "kdkit: its layers and the imports between them, read from the code (docs/figures.py)"
    ax.text(0.01, 0.985, title, fontsize=13, weight="bold", va="top")
    boxes: dict[str, Box] = {}
    for i, group in enumerate(FLOW):
        boxes[group] = (FLOW_X, TOP - (i + 1) * BOX_H - i * GAP, FLOW_W, BOX_H)
        heading = f"kdkit/{group}/  {purpose(group)}"
        _box(ax, boxes[group], heading, _listing(graph.groups.get(group, []), FLOW_W), COLORS[group])
    _draw_side(ax, graph, boxes)
    _draw_foundation(ax, graph, boxes)
    _draw_imports(ax, graph, boxes)
    _draw_runtime(ax, boxes)
    legend = "solid arrow: imports (read from the code);  dashed arrow: calls without importing"
    ax.text(0.01, boxes["foundation"][1] - 0.02, legend, fontsize=9, va="top", color="#333333")
    path.parent.mkdir(parents=True, exist_ok=True)
    metadata = {GRAPH_KEY: graph.as_json(), "Software": None}
    fig.savefig(path, format="png", dpi=100, bbox_inches="tight", pad_inches=0.1, metadata=metadata)


def _draw_side(ax, graph: Graph, boxes: dict[str, Box]) -> None:
    """Deployment and the plugins in a column right of the main flow, each as tall as its list."""
    top = TOP
    side = [("deployment", "deployment  kdkit/deploy/", "deployment")]
    for group in (g for g in graph.groups if g.startswith("plugin:")):
        folder = next((REPO / "plugins").glob(f"*/{group.split(':', 1)[1]}")).relative_to(REPO)
        side.append((group, f"plugin  {folder}/", "plugin"))
    for group, heading, color in side:
        lines = _listing(graph.groups.get(group, []), SIDE_W)
        height = 0.06 + LINE * len(lines)
        boxes[group] = (SIDE_X, top - height, SIDE_W, height)
        _box(ax, boxes[group], heading, lines, COLORS[color])
        top -= height + 2 * GAP


def _draw_foundation(ax, graph: Graph, boxes: dict[str, Box]) -> None:
    """The foundation across the bottom, its modules listed by sub-group."""
    by_folder: dict[str, list[str]] = {}
    for module in graph.groups.get("foundation", []):
        by_folder.setdefault(folder_of(module), []).append(module)
    rows = [
        f"{'kdkit/' + (folder + '/' if folder else ''):<19}{purpose(folder) if folder else '':<16}"
        + "  ".join(_short(m) for m in modules)
        for folder, modules in sorted(by_folder.items())
    ]
    top = boxes[FLOW[-1]][1] - GAP
    height = 0.06 + LINE * len(rows)
    boxes["foundation"] = (0.01, top - height, 0.98, height)
    heading = "foundation  (every box above imports it; it imports none of them)"
    _box(ax, boxes["foundation"], heading, rows, COLORS["foundation"])


def _draw_imports(ax, graph: Graph, boxes: dict[str, Box]) -> None:
    """One arrow per group-level import edge (none into the foundation, which every box uses):
    down the middle between neighbouring layers, along the left margin where a layer is skipped
    (longer skips further out, so the lanes do not cross), straight across to the side column."""
    rank = {group: i for i, group in enumerate(FLOW)}
    edges = [(a, b) for a, b in graph.edges if b != "foundation" and a in boxes and b in boxes]
    skips = sorted(
        ((a, b) for a, b in edges if a in rank and b in rank and rank[b] > rank[a] + 1),
        key=lambda e: (rank[e[1]] - rank[e[0]], rank[e[0]]),
    )
    leaving = {g: 0 for g in boxes}
    arriving = {g: 0 for g in boxes}
    for lane, (a, b) in reversed(list(enumerate(skips, start=1))):  # outermost lane first
        (x, ya, _, ha), (_, yb, _, hb) = boxes[a], boxes[b]
        start_y = ya + ha - 0.02 - 0.012 * leaving[a]
        end_y = yb + 0.02 + 0.012 * arriving[b]
        leaving[a] += 1
        arriving[b] += 1
        lane_x = x - LANE * lane
        _arrow(ax, [(x, start_y), (lane_x, start_y), (lane_x, end_y), (x, end_y)])
    for a, b in edges:
        (xa, ya, wa, ha), (xb, yb, wb, hb) = boxes[a], boxes[b]
        if a in rank and b in rank and rank[b] == rank[a] + 1:
            _arrow(ax, [(xa + wa * 0.3, ya), (xb + wb * 0.3, yb + hb)])
        elif xa < xb:  # from the main flow to the side column
            _arrow(ax, [(xa + wa, ya + ha * 0.5), (xb, ya + ha * 0.5)])
        elif a not in rank and b not in rank:  # within the side column: a plugin uses deployment
            _arrow(ax, [(xa + wa * 0.5, ya + ha), (xb + wb * 0.5, yb)])


def _draw_runtime(ax, boxes: dict[str, Box]) -> None:
    """The dashed arrows of RUNTIME: calls that are not imports."""
    for a, b, label in RUNTIME:
        for target in [g for g in boxes if g == b or (b.endswith("*") and g.startswith(b[:-1]))]:
            (xa, ya, wa, ha), (xb, yb, wb, hb) = boxes[a], boxes[target]
            if ya < yb:  # from below (the foundation's plugin loader) up to a side box
                _arrow(ax, [(xb + wb * 0.5, ya + ha), (xb + wb * 0.5, yb)], label, dashed=True)
            else:
                _arrow(ax, [(xa + wa * 0.7, ya), (xb + wb * 0.7, yb + hb)], label, dashed=True)


def redraw_ablation(folder: Path, target: Path) -> None:
    """Draw an ablation's chart into `target` from its `ablation.json`, with the layout of
    `kdkit.run.ablation_report.bar_chart` today (its own ablation.png keeps the layout it was drawn
    with), or say why not."""
    source = folder / "ablation.json"
    if not source.is_file():
        print(f"skipped {target.name}: no {source} (kdkit ablate writes it)")
        return
    from kdkit.run.ablation_report import bar_chart  # only here: the architecture needs no kdkit

    report = json.loads(source.read_text())
    metric = report["main_metric"]
    seeds = ", ".join(map(str, sorted({s for v in report["variants"] for s in v["seeds"]})))
    title = f"{report['stage']}: {metric} (seeds {seeds})"
    bar_chart(report["variants"], metric, report["direction"], target, title)
    print(f"drew {target.name} from {source}")


def copy_figure(source: Path, target: Path, made_by: str) -> None:
    """Copy one PNG a command wrote into docs/img/, or say why not."""
    if source.is_file():
        shutil.copyfile(source, target)
        print(f"copied {source} -> {target.relative_to(REPO)}")
    else:
        print(f"skipped {target.relative_to(REPO)}: no {source} ({made_by} writes it)")


BRIDGE_DATASETS = (
    ("demo", "synthetic FAS demo: Δ HTER (points, lower is better)"),
    ("digits", "digits, 10 % labels: Δ accuracy (points, higher is better)"),
)


def draw_bridges(folder: Path, path: Path) -> None:
    """One panel per data set: each bridge's mean paired difference to the student alone with its
    95 % interval, one marker per (alpha, batch) setting; skipped, with a note, without results."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    reports = {
        d.name: json.loads((d / "ablation.json").read_text())
        for d in sorted(folder.glob("*-a*-b*"))
        if (d / "ablation.json").is_file()
    }
    if not reports:
        print(f"skipped {path.name}: no ablation.json under {folder}")
        return
    fig, axes = plt.subplots(1, len(BRIDGE_DATASETS), figsize=(13, 5.2))
    for ax, (name, title) in zip(axes, BRIDGE_DATASETS, strict=True):
        settings = sorted(k for k in reports if k.startswith(f"{name}-"))
        first = reports[settings[0]]["variants"] if settings else []
        variants = [v["variant"] for v in first if not v["baseline"]]
        for j, key in enumerate(settings):
            report = reports[key]
            metric = report["main_metric"]
            by_name = {v["variant"]: v["difference"].get(metric) for v in report["variants"]}
            ys = [i + (j - (len(settings) - 1) / 2) * 0.18 for i in range(len(variants))]
            diffs = [by_name.get(v) for v in variants]
            shown = [(y, d) for y, d in zip(ys, diffs, strict=True) if d and d["low"] is not None]
            xs = [100 * d["mean"] for _, d in shown]
            errors = [
                [100 * (d["mean"] - d["low"]) for _, d in shown],
                [100 * (d["high"] - d["mean"]) for _, d in shown],
            ]
            label = (
                key.removeprefix(f"{name}-").replace("-", ", ").replace("a", "α=", 1).replace("b", "batch ")
            )
            ax.errorbar(xs, [y for y, _ in shown], xerr=errors, fmt="o", ms=4, capsize=2, label=label)
        ax.axvline(0, color="grey", lw=1)
        ax.set_yticks(range(len(variants)), variants)
        ax.invert_yaxis()  # the first variant on top
        ax.set_title(title, fontsize=10)
        if settings:
            ax.legend(fontsize=8, loc="best")
    fig.suptitle(
        "Each bridge minus the student trained alone: mean over seeds, 95 % interval (seeds × test units)"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"drew {path}")


def main(argv: list[str] | None = None) -> int:
    """Draw the architecture and the bridges chart; copy the ROC/DET plot and the ablation chart
    and redraw the methods chart when their sources exist."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--run", type=Path, default=REPO / "runs" / "kdfas-demo", help="a finished kdfas-demo run"
    )
    parser.add_argument("--stage", default="student_kd", help="the run whose ROC/DET plot is copied")
    parser.add_argument(
        "--ablation",
        type=Path,
        default=REPO / "runs" / "ablation-kdfas-demo",
        help="a finished kdkit ablate folder",
    )
    parser.add_argument(
        "--methods",
        type=Path,
        default=REPO / "runs" / "ablation-digits-methods",
        help="the kdkit ablate folder of docs/methods.md's comparison of the methods",
    )
    parser.add_argument(
        "--bridges",
        type=Path,
        default=REPO / "runs" / "bridges",
        help="the folder of the bridge ablations (docs/adapters.md, Evidence)",
    )
    args = parser.parse_args(argv)
    graph = build_graph()
    problems = violations(graph)
    if problems:
        print(
            "the code breaks a rule the architecture picture shows:", *problems, sep="\n  ", file=sys.stderr
        )
        return 1
    draw(graph, ARCHITECTURE_PNG)
    print(f"drew {ARCHITECTURE_PNG.relative_to(REPO)}")
    copy_figure(args.run / "test" / args.stage / "roc_det_test.png", IMG / "roc-det-demo.png", "make demo")
    copy_figure(args.ablation / "ablation.png", IMG / "ablation-demo.png", "kdkit ablate")
    redraw_ablation(args.methods, IMG / "methods-digits.png")
    draw_bridges(args.bridges, IMG / "bridges.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
