"""The results of `kdkit ablate`: per run and per variant, with the baseline and intervals.

A run row holds the run's identity (run, variant, the varied keys, seed) and numbers: every metric
the evaluator reported for the compared stage on the evaluate stage's split, plus its cost columns
(`COST_COLUMNS`). The baseline is the student trained without a teacher, in the same run
directory (same seed, same data and schedule, `kdkit.run.variants.baseline_stage`). Per variant:
mean ± sample std over seeds, a 95 % interval over seeds and test units, and the paired difference
to the baseline with its interval (`kdkit.evaluation.stats`).
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from rich.markup import escape
from rich.table import Table

from kdkit.evaluation.comparison import (
    ARROWS,
    EXCLUDES_ZERO,
    NO_INTERVAL,
    difference_cell,
    direction,
    load_replicates,
)
from kdkit.evaluation.stats import LEVEL, Replicates, over_seeds, paired_difference
from kdkit.utils.checkpoint import atomic_open, atomic_write_text
from kdkit.utils.runlog import console, output

COST_COLUMNS = ("adapter_params", "train_s_per_epoch", "peak_MiB")
BASELINE_LABEL = "baseline: student alone (no teacher)"
_TITLES = {"adapter_params": "adapter params", "train_s_per_epoch": "train s/epoch", "peak_MiB": "peak MiB"}
_FORMATS = {"adapter_params": ".0f", "train_s_per_epoch": ".2f", "peak_MiB": ".0f", "wall_s": ".0f"}


# ------------------------------------------------------------------------------------ reading runs
def _read(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8"))


@dataclass
class Measured:
    """One evaluated model of a run: its row of numbers and its bootstrap replicates (None when the
    evaluator cannot resample or no evaluate stage tested it)."""

    row: dict[str, Any]
    replicates: Replicates | None
    cache_key: str | None = None  # the stage-cache entry of a trained baseline (its identity)


def _tested(summary: dict[str, Any], stage: str) -> tuple[str, dict[str, Any]] | None:
    """The last evaluate stage that tested `stage`: (its name, its result)."""
    tested = [(n, s) for n, s in summary.items() if s.get("do") == "evaluate" and stage in s["results"]]
    return tested[-1] if tested else None


def measure(run_dir: Path, stage: str, run_costs: bool = True) -> Measured:
    """The numbers of `stage` in a complete run: the evaluate stage's metrics plus cost columns
    (with `run_costs`, also the run's peak memory and wall time, which belong to the compared stage).

    Without an evaluate stage that tested `stage`, its best validation metrics are used."""
    summary = _read(run_dir / "summary.json")
    info = _read(run_dir / "run.json") if run_costs else {}
    fit = summary[stage]
    tested = _tested(summary, stage)
    metrics = tested[1]["results"][stage] if tested else fit["best"]
    split = tested[1]["split"] if tested else "val"
    row = {
        "split": split,
        **{k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)},
        "adapter_params": fit["adapter_params"],
        "train_s_per_epoch": fit["train_seconds_per_epoch"],
    }
    if info:
        row |= {"peak_MiB": info.get("peak_cuda_MiB", info["peak_rss_MiB"]), "wall_s": info["wall_seconds"]}
    replicates = load_replicates(run_dir / tested[0] / stage, split) if tested else None
    return Measured(row, replicates, fit.get("cache", {}).get("key"))


def memory_measure(run_dir: Path) -> str:
    """What `peak_MiB` means for this run."""
    if "peak_cuda_MiB" in _read(run_dir / "run.json"):
        return "peak CUDA memory allocated by torch (torch.cuda.max_memory_allocated)"
    return "peak resident memory of the run's own process (VmHWM; includes Python and torch)"


def cache_use(run_dirs: list[Path]) -> dict[str, dict[str, int]]:
    """Per cached train stage: how many distinct models the runs used (each trained once) and how many
    times one was reused."""
    keys: dict[str, list[str]] = {}
    for run_dir in run_dirs:
        for name, stage in _read(run_dir / "summary.json").items():
            if "cache" in stage:
                keys.setdefault(name, []).append(stage["cache"]["key"])
    return {name: {"trained": len(set(k)), "reused": len(k) - len(set(k))} for name, k in keys.items()}


# ------------------------------------------------------------------------------------ numbers
def numeric_columns(rows: list[dict[str, Any]]) -> list[str]:
    """Columns holding numbers in every row, in first-seen order (the seed excluded)."""
    keys = list(dict.fromkeys(k for row in rows for k in row))
    return [
        k
        for k in keys
        if k != "seed"
        and all(isinstance(r.get(k), (int, float)) and not isinstance(r.get(k), bool) for r in rows)
    ]


@dataclass
class Group:
    """The runs of one variant (or of the baseline), one per seed, in seed order."""

    label: str
    seeds: list[int]
    measured: list[Measured]
    baseline: list[Measured] | None = None  # each run's baseline (same seed), for variants
    is_baseline: bool = False
    runs: list[str] | None = None  # the run names of the rows (default: the label and seed)
    values: dict[str, str] | None = None  # the variant's recipe keys and values

    def rows(self) -> list[dict[str, Any]]:
        """One row per run: its identity, then its numbers."""
        runs = self.runs or [f"{self.label}__seed{seed}" for seed in self.seeds]
        return [
            {"run": run, "variant": self.label, **(self.values or {}), "seed": seed} | m.row
            for run, seed, m in zip(runs, self.seeds, self.measured, strict=True)
        ]


def summarise(group: Group, columns: list[str], keys: list[str]) -> dict[str, Any]:
    """n, mean and sample std (None for n = 1) per column; per headline key the interval over seeds
    and test units and, with a baseline, the paired difference to it."""
    rows = [m.row for m in group.measured]
    mean = {c: float(np.mean([r[c] for r in rows])) for c in columns if all(c in r for r in rows)}
    std = {c: float(np.std([r[c] for r in rows], ddof=1)) if len(rows) > 1 else None for c in mean}
    entry: dict[str, Any] = {
        "variant": group.label,
        "baseline": group.is_baseline,
        "n": len(rows),
        "seeds": group.seeds,
        "mean": mean,
        "std": std,
        "interval": {},
        "difference": {},
    }
    replicates = [m.replicates for m in group.measured]
    for key in keys:
        if all(r is not None and key in r.values for r in replicates):
            spread = over_seeds([r[key] for r in rows], replicates, key)  # type: ignore[arg-type]
            entry["interval"][key] = [spread["low"], spread["high"]]
        if group.baseline is None:
            continue
        base = group.baseline
        paired = [*replicates, *(b.replicates for b in base)]
        if all(r is not None and key in r.values for r in paired):
            entry["difference"][key] = paired_difference(
                [r[key] for r in rows],
                [b.row[key] for b in base],
                replicates,  # type: ignore[arg-type]
                [b.replicates for b in base],  # type: ignore[misc]
                key,
            )
    return entry


def pairwise(groups: list[Group], key: str) -> list[dict[str, Any]]:
    """Every pair of variants (a listed before b): a − b on metric `key`, paired by seed and test
    unit like the differences to the baseline. Answers "does covariance beat projection?"."""
    variants = [g for g in groups if not g.is_baseline]
    pairs = []
    for i, a in enumerate(variants):
        for b in variants[i + 1 :]:
            replicates = [m.replicates for m in (*a.measured, *b.measured)]
            if a.seeds != b.seeds or not all(r is not None and key in r.values for r in replicates):
                continue
            diff = paired_difference(
                [m.row[key] for m in a.measured],
                [m.row[key] for m in b.measured],
                replicates[: len(a.measured)],  # type: ignore[arg-type]
                replicates[len(a.measured) :],  # type: ignore[arg-type]
                key,
            )
            pairs.append({"a": a.label, "b": b.label, **diff})
    return pairs


def table_columns(rows: list[dict[str, Any]], evaluator: Any) -> list[str]:
    """The metrics a reader compares: the evaluator's `summary_keys` (or every metric of the tested
    split). The first is the main metric."""
    split = rows[0]["split"]
    numeric = numeric_columns(rows)
    keys = [k for k in getattr(evaluator, "summary_keys", None) or [] if k in numeric]
    return keys or [k for k in numeric if k.startswith(f"{split}/")] or [numeric[0]]


def format_cell(summary: dict[str, Any], column: str) -> str:
    """`0.1250 ± 0.0177 [0.0900, 0.1600]`: mean ± std over seeds [interval]; parts that do not exist
    (one seed, no interval, a missing column) are left out."""
    if column not in summary["mean"]:
        return "-"
    spec = _FORMATS.get(column, ".4f")
    text = f"{summary['mean'][column]:{spec}}"
    if summary["std"][column] is not None:
        text += f" ± {summary['std'][column]:{spec}}"
    if column in summary["interval"]:
        low, high = summary["interval"][column]
        text += f" {NO_INTERVAL}" if low is None else f" [{low:{spec}}, {high:{spec}}]"  # None: too few units
    return text


# ------------------------------------------------------------------------------------ outputs
def _header(column: str, mode: str, short: bool = False) -> str:
    name = _TITLES.get(column, column.split("/", 1)[-1] if short else column)
    return f"{name} {ARROWS[direction(column, mode)]}"


def markdown_tables(
    summary: list[dict[str, Any]],
    keys: list[str],
    costs: list[str],
    mode: str,
    pairs: list[dict[str, Any]] | None = None,
) -> str:
    """Markdown tables: every group's metrics (and costs), each variant's paired difference to the
    baseline, and (with `pairs`) the main metric's paired difference between every two variants."""
    columns = [*keys, *costs]
    lines = [
        "| variant | " + " | ".join(_header(c, mode) for c in columns) + " |",
        "|---|" + "---:|" * len(columns),
    ]
    for s in summary:
        label = s["variant"].replace("|", "\\|")
        lines.append(f"| {label} | " + " | ".join(format_cell(s, c) for c in columns) + " |")
    compared = [s for s in summary if s["difference"]]
    if compared:
        lines += [
            "",
            "| variant − baseline | " + " | ".join(f"Δ {_header(k, mode)}" for k in keys) + " |",
            "|---|" + "---:|" * len(keys),
        ]
        for s in compared:
            cells = [difference_cell(s["difference"][k]) if k in s["difference"] else "-" for k in keys]
            lines.append(f"| {s['variant'].replace('|', chr(92) + '|')} | " + " | ".join(cells) + " |")
    if pairs:
        lines += ["", f"| variant a − variant b | Δ {_header(keys[0], mode)} |", "|---|---:|"]
        for pair in pairs:
            names = f"{pair['a']} − {pair['b']}".replace("|", "\\|")
            lines.append(f"| {names} | {difference_cell(pair)} |")
    return "\n".join(lines) + "\n"


def csv_text(rows: list[dict[str, Any]], summary: list[dict[str, Any]]) -> str:
    """One row per run (baseline runs included), then per group its `mean`, `std`, `ci_low` and
    `ci_high` rows and, for variants, `diff_mean`, `diff_low`, `diff_high`, `diff_excludes_zero`
    (in the seed column)."""
    columns = list(dict.fromkeys(k for row in rows for k in row))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    for s in summary:
        stats = {
            "mean": s["mean"],
            "std": s["std"],
            "ci_low": {k: v[0] for k, v in s["interval"].items()},
            "ci_high": {k: v[1] for k, v in s["interval"].items()},
        }
        if s["difference"]:
            for part in ("mean", "low", "high", "excludes_zero"):
                stats[f"diff_{part}"] = {k: d[part] for k, d in s["difference"].items()}
        for name, values in stats.items():
            cells = {c: "" if v is None else v for c, v in values.items() if c in columns}
            writer.writerow({"variant": s["variant"], "seed": name, **cells})
    return buffer.getvalue()


def rich_table(
    summary: list[dict[str, Any]], keys: list[str], costs: list[str], mode: str, title: str
) -> Table:
    """The terminal table: metrics with intervals, the main metric's difference to the baseline, costs."""
    table = Table(title=escape(title))
    table.add_column("variant")
    main = keys[0]
    show_diff = any(s["difference"] for s in summary)
    for c in keys:
        table.add_column(_header(c, mode, short=True), justify="right")
    if show_diff:
        table.add_column(f"Δ {_header(main, mode, short=True)} vs baseline", justify="right")
    for c in costs:
        table.add_column(_header(c, mode, short=True), justify="right")
    for s in summary:
        cells = [format_cell(s, c).replace(" [", "\n[") for c in keys]
        if show_diff:
            diff = s["difference"].get(main)
            cells.append(difference_cell(diff).replace(" [", "\n[") if diff else "-")
        cells += [format_cell(s, c).split(" [")[0] for c in costs]
        table.add_row(escape(s["variant"]), *cells)
    return table


# The chart: one row per group down the y-axis (the first on top), so that its width is fixed and
# its height grows with the number of groups; the names are shortened, the tables hold them in full.
CHART_DPI = 120
CHART_WIDTH = 11.0  # inches: 1,320 px whatever the number of groups
CHART_ROW = 0.32  # inches per group
CHART_MARGINS = 2.2  # inches of titles and axis labels above and below the rows
CHART_LABEL_CHARS = 32  # longer names are cut with "…"
CHART_TITLE_CHARS = 48  # panel titles wrap at this width (two panels side by side)


def chart_labels(summary: list[dict[str, Any]]) -> list[str]:
    """The y-axis labels: a baseline as `baseline` (or `baseline for <its variants>`), every name
    cut to `CHART_LABEL_CHARS`, all numbered when the cut leaves two alike."""
    labels = []
    for s in summary:
        label = s["variant"]
        if s["baseline"]:
            label = label.replace(BASELINE_LABEL, "baseline", 1)
        cut = len(label) > CHART_LABEL_CHARS
        labels.append(f"{label[: CHART_LABEL_CHARS - 1]}…" if cut else label)
    if len(set(labels)) < len(labels):
        labels = [f"{i}. {label}" for i, label in enumerate(labels, 1)]
    return labels


def chart_figure(summary: list[dict[str, Any]], metric: str, mode: str, title: str) -> Any:
    """The matplotlib Figure of `bar_chart` (an Agg canvas, no pyplot global state), laid out."""
    import textwrap

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    compared = any(metric in s["difference"] for s in summary)
    fig = Figure(figsize=(CHART_WIDTH, CHART_MARGINS + CHART_ROW * len(summary)), dpi=CHART_DPI)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2 if compared else 1, squeeze=False, sharey=True)[0]
    _metric_panel(axes[0], summary, metric, mode)
    if compared:
        _difference_panel(axes[1], summary, metric, mode)
    axes[0].set_yticks(range(len(summary)), chart_labels(summary), fontsize=8)
    axes[0].set_ylim(len(summary) - 0.5, -0.5)  # the first group on top
    for ax in axes:
        ax.set_title(textwrap.fill(ax.get_title(), CHART_TITLE_CHARS), fontsize=9)
    fig.suptitle(textwrap.fill(title, 2 * CHART_TITLE_CHARS), fontsize=10)
    fig.tight_layout()
    return fig


def bar_chart(summary: list[dict[str, Any]], metric: str, mode: str, path: Path, title: str) -> None:
    """Write `path` (PNG, atomically). Left: the main metric per group (mean over seeds, 95 %
    interval as error bars, each seed a dot). Right, with a baseline: each variant's paired
    difference to it with its interval, in the variant's row; green where the interval excludes 0
    in the better direction, red in the worse one."""
    fig = chart_figure(summary, metric, mode, title)
    with atomic_open(path, "wb") as handle:
        fig.savefig(handle, format="png")


def _error_bars(centre: list[float], intervals: list[list[float] | None]) -> np.ndarray:
    """Distances from `centre` to each interval's ends (0 where there is no interval)."""
    shown = [i if i and i[0] is not None else None for i in intervals]  # None ends: too few units
    low = [c - i[0] if i else 0.0 for c, i in zip(centre, shown, strict=True)]
    high = [i[1] - c if i else 0.0 for c, i in zip(centre, shown, strict=True)]
    return np.array([low, high])


def _metric_panel(ax: Any, summary: list[dict[str, Any]], metric: str, mode: str) -> None:
    means = [s["mean"][metric] for s in summary]
    colours = ["tab:grey" if s["baseline"] else "tab:blue" for s in summary]
    bars = _error_bars(means, [s["interval"].get(metric) for s in summary])
    ax.barh(range(len(summary)), means, xerr=bars, capsize=3, color=colours, alpha=0.85)
    for i, s in enumerate(summary):
        ax.scatter(s["per_seed"], [i] * len(s["per_seed"]), color="black", s=10, zorder=3)
    better = "higher" if direction(metric, mode) == "max" else "lower"
    ax.set_xlabel(f"{metric} ({better} is better)")
    ax.set_title(f"mean over seeds, {LEVEL:.0%} interval (seeds and test units); dots: seeds")


def _difference_panel(ax: Any, summary: list[dict[str, Any]], metric: str, mode: str) -> None:
    """Each compared variant's difference in its own row (a baseline's row stays empty)."""
    rows = [(i, s["difference"][metric]) for i, s in enumerate(summary) if metric in s["difference"]]
    means = [d["mean"] for _, d in rows]
    better = direction(metric, mode)
    colours = []
    for _, d in rows:
        improved = d["excludes_zero"] and (d["high"] < 0 if better == "min" else d["low"] > 0)
        colours.append("tab:green" if improved else "tab:red" if d["excludes_zero"] else "tab:blue")
    bars = _error_bars(means, [[d["low"], d["high"]] for _, d in rows])
    ax.barh([i for i, _ in rows], means, xerr=bars, capsize=3, color=colours, alpha=0.85)
    ax.axvline(0.0, color="black", linewidth=0.8)
    ax.set_xlabel(f"Δ {metric} vs baseline")
    ax.set_title(f"paired difference to the baseline, {LEVEL:.0%} interval")


def write_report(out: Path, groups: list[Group], evaluator: Any, info: dict[str, Any]) -> dict[str, Any]:
    """Write ablation.csv/.json/.md/.png into `out`, print the table; return what ablation.json holds.

    `groups` are the baselines (first, when there are any) and the variants."""
    mode = getattr(evaluator, "mode", "max")
    rows = [row for g in groups for row in g.rows()]
    variant_rows = [m.row for g in groups if not g.is_baseline for m in g.measured]
    keys = table_columns(variant_rows, evaluator)
    numeric = numeric_columns(variant_rows)
    costs = [c for c in COST_COLUMNS if c in numeric]
    summary = [
        summarise(g, numeric, keys) | {"per_seed": [m.row[keys[0]] for m in g.measured]} for g in groups
    ]
    main = keys[0]
    seeds = sorted({s for g in groups for s in g.seeds})
    listed = ", ".join(map(str, seeds))
    note = f"mean ± sample std over seeds {listed}" if len(seeds) > 1 else f"seed {listed}"
    caption = (
        f"{info['recipe']}, compared stage `{info['stage']}` on {variant_rows[0]['split']}; {note}; "
        f"[{LEVEL:.0%} interval: bootstrap over seeds and test units]. The second table is each "
        f"variant minus the baseline, the third each variant minus each other on {main}, paired by "
        f"seed and test unit; {EXCLUDES_ZERO} = the interval excludes 0 (↓ lower / ↑ higher is "
        f"better). Peak MiB: {info['memory_measure']}."
    )
    if info.get("failed"):
        caption = f"{incomplete_note(info['failed'])}\n\n{caption}"
    pairs = pairwise(groups, main)
    report = {
        **info,
        "main_metric": main,
        "direction": direction(main, mode),
        "columns": [*keys, *costs],
        "confidence": LEVEL,
        "variants": summary,
        "pairwise": {main: pairs},
        "runs": rows,
    }
    atomic_write_text(json.dumps(report, indent=2), out / "ablation.json")
    atomic_write_text(csv_text(rows, summary), out / "ablation.csv")
    tables = markdown_tables(summary, keys, costs, mode, pairs)
    atomic_write_text(f"{caption}\n\n{tables}", out / "ablation.md")
    bar_chart(summary, main, mode, out / "ablation.png", f"{info['stage']}: {main} ({note})")
    title = f"ablation ({note}; [{LEVEL:.0%} interval])"
    if info.get("failed"):
        title = f"INCOMPLETE {title}: {len(info['failed'])} run(s) failed"
    output.print(rich_table(summary, keys, costs, mode, title))
    console.print(f"wrote {out}/ablation.csv, .json, .md, .png", markup=False)
    return report


def incomplete_note(failed: list[dict[str, Any]]) -> str:
    """The line that marks a report of an ablation whose runs in `failed` did not finish."""
    runs = ", ".join(f"{f['run']} ({f['variant']}, seed {f['seed']})" for f in failed)
    return (
        f"**Incomplete:** {len(failed)} run(s) failed and are not in these tables: {runs}. "
        "`ablation.json` (`failed`) holds each error and its log; the same command again retries them."
    )
