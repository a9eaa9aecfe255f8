"""The results of `kdkit ablate`: rows per run, mean ± std per variant, CSV/JSON/Markdown/PNG and a table.

A row holds the run's identity (run, variant, the varied keys, seed) and numbers: every metric the
evaluator reported for the compared stage on the evaluate stage's split, plus its cost columns
(`COST_COLUMNS`).
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import re
import statistics
from pathlib import Path
from typing import Any

from rich.markup import escape
from rich.table import Table

from kdkit.checkpoint import atomic_write_text
from kdkit.runlog import console

COST_COLUMNS = ("adapter_params", "train_s_per_epoch", "peak_MiB")
_HIGHER_IS_BETTER = re.compile(r"acc|auc|tpr|precision|recall|f1|top[0-9]")
_LOWER_IS_BETTER = re.compile(r"err|eer|loss|hter|acer|apcer|bpcer|far|frr|fpr|params|_s_|MiB|seconds")
_TITLES = {"adapter_params": "adapter params", "train_s_per_epoch": "train s/epoch", "peak_MiB": "peak MiB"}
_FORMATS = {"adapter_params": ".0f", "train_s_per_epoch": ".2f", "peak_MiB": ".0f", "wall_s": ".0f"}


# ------------------------------------------------------------------------------------ reading runs
def _read(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8"))


def run_row(run_dir: Path, stage: str) -> dict[str, Any]:
    """The numbers of one complete run: the evaluate stage's metrics of `stage` plus cost columns.

    Without an evaluate stage that tested `stage`, its best validation metrics are used."""
    summary = _read(run_dir / "summary.json")
    info = _read(run_dir / "run.json")
    fit = summary[stage]
    tested = [s for s in summary.values() if s.get("do") == "evaluate" and stage in s["results"]]
    metrics = tested[-1]["results"][stage] if tested else fit["best"]
    return {
        "split": tested[-1]["split"] if tested else "val",
        **metrics,
        "adapter_params": fit["adapter_params"],
        "train_s_per_epoch": fit["train_seconds_per_epoch"],
        "peak_MiB": info.get("peak_cuda_MiB", info["peak_rss_MiB"]),
        "wall_s": info["wall_seconds"],
    }


def memory_measure(run_dir: Path) -> str:
    """What `peak_MiB` means for this run."""
    if "peak_cuda_MiB" in _read(run_dir / "run.json"):
        return "peak CUDA memory allocated by torch (torch.cuda.max_memory_allocated)"
    return "peak resident memory of the run's own process (ru_maxrss; includes Python and torch)"


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
def direction(key: str, evaluator_mode: str) -> str:
    """'max' or 'min': whether a higher value of column `key` is better (names first, then the
    evaluator's mode: HTER and EER are lower-better, AUC and accuracy higher-better)."""
    name = key.rsplit("/", 1)[-1]
    if _HIGHER_IS_BETTER.search(name):
        return "max"
    if _LOWER_IS_BETTER.search(name):
        return "min"
    return "max" if evaluator_mode == "max" else "min"


def numeric_columns(rows: list[dict[str, Any]]) -> list[str]:
    """Columns holding numbers in every row, in first-seen order (the seed excluded)."""
    keys = list(dict.fromkeys(k for row in rows for k in row))
    return [
        k
        for k in keys
        if k != "seed"
        and all(isinstance(r.get(k), (int, float)) and not isinstance(r.get(k), bool) for r in rows)
    ]


def aggregate(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One entry per variant (first-seen order): n, and mean and sample std (None for n = 1) per column."""
    columns = numeric_columns(rows)
    groups: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(row["variant"], []).append(row)
    out = []
    for variant, members in groups.items():
        values = {c: [float(m[c]) for m in members] for c in columns}
        out.append(
            {
                "variant": variant,
                "n": len(members),
                "seeds": [m["seed"] for m in members],
                "mean": {c: statistics.fmean(v) for c, v in values.items()},
                "std": {c: statistics.stdev(v) if len(v) > 1 else None for c, v in values.items()},
            }
        )
    return out


def table_columns(rows: list[dict[str, Any]], evaluator: Any) -> list[str]:
    """The columns a reader compares: the evaluator's `summary_keys` (or every metric of the tested
    split), then the cost columns. The first is the main metric."""
    split = rows[0]["split"]
    numeric = numeric_columns(rows)
    keys = [k for k in getattr(evaluator, "summary_keys", None) or [] if k in numeric]
    keys = keys or [k for k in numeric if k.startswith(f"{split}/")] or [numeric[0]]
    return [*keys, *(c for c in COST_COLUMNS if c in numeric)]


def best_values(summary: list[dict[str, Any]], columns: list[str], mode: str) -> dict[str, float]:
    """The best mean of each column over the variants."""
    pick = {"max": max, "min": min}
    return {c: pick[direction(c, mode)](s["mean"][c] for s in summary) for c in columns}


def format_cell(mean: float, std: float | None, column: str) -> str:
    """`0.1250 ± 0.0177`, or just the mean when there is one seed."""
    spec = _FORMATS.get(column, ".4f")
    return f"{mean:{spec}}" if std is None else f"{mean:{spec}} ± {std:{spec}}"


# ------------------------------------------------------------------------------------ outputs
def markdown_table(summary: list[dict[str, Any]], columns: list[str], mode: str) -> str:
    """A Markdown table (mean ± std per variant), the best value of each column in bold."""
    best = best_values(summary, columns, mode)
    arrows = {"max": "↑", "min": "↓"}
    lines = [
        "| variant | "
        + " | ".join(f"{_TITLES.get(c, c)} {arrows[direction(c, mode)]}" for c in columns)
        + " |",
        "|---|" + "---:|" * len(columns),
    ]
    for s in summary:
        cells = []
        for c in columns:
            text = format_cell(s["mean"][c], s["std"][c], c)
            cells.append(f"**{text}**" if math.isclose(s["mean"][c], best[c], rel_tol=1e-12) else text)
        variant = s["variant"].replace("|", "\\|")
        lines.append(f"| {variant} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def csv_text(rows: list[dict[str, Any]], summary: list[dict[str, Any]]) -> str:
    """One row per run, then per variant a `mean` and a `std` row (in the seed column)."""
    columns = list(dict.fromkeys(k for row in rows for k in row))
    numeric = numeric_columns(rows)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    for s in summary:
        for stat in ("mean", "std"):
            values = {c: "" if s[stat][c] is None else s[stat][c] for c in numeric}
            writer.writerow({"variant": s["variant"], "seed": stat, **values})
    return buffer.getvalue()


def rich_table(summary: list[dict[str, Any]], columns: list[str], mode: str, title: str) -> Table:
    """The Markdown table for the terminal (best values in bold)."""
    best = best_values(summary, columns, mode)
    table = Table(title=escape(title))
    table.add_column("variant")
    for c in columns:
        table.add_column(_TITLES.get(c, c), justify="right")
    for s in summary:
        cells = [format_cell(s["mean"][c], s["std"][c], c) for c in columns]
        bold = [math.isclose(s["mean"][c], best[c], rel_tol=1e-12) for c in columns]
        table.add_row(
            escape(s["variant"]), *(f"[bold]{t}[/bold]" if b else t for t, b in zip(cells, bold, strict=True))
        )
    return table


def bar_chart(
    rows: list[dict[str, Any]], summary: list[dict[str, Any]], metric: str, mode: str, path: Path, title: str
) -> None:
    """Bars of the main metric's mean per variant with ±std error bars (the best bar highlighted)
    and every seed's value as a dot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    means = [s["mean"][metric] for s in summary]
    stds = [s["std"][metric] or 0.0 for s in summary]
    best = best_values(summary, [metric], mode)[metric]
    colours = ["tab:green" if math.isclose(m, best, rel_tol=1e-12) else "tab:blue" for m in means]
    position = {s["variant"]: i for i, s in enumerate(summary)}
    fig, ax = plt.subplots(figsize=(max(5.0, 1.2 * len(summary) + 2.0), 4.0))
    ax.bar(range(len(summary)), means, yerr=stds, capsize=5, color=colours, alpha=0.85)
    ax.scatter(
        [position[r["variant"]] for r in rows], [r[metric] for r in rows], color="black", s=12, zorder=3
    )
    ax.set_xticks(range(len(summary)), [s["variant"] for s in summary], rotation=20, ha="right")
    better = "higher" if direction(metric, mode) == "max" else "lower"
    ax.set_ylabel(f"{metric} ({better} is better)")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
    os.replace(tmp, path)


def write_report(
    out: Path, rows: list[dict[str, Any]], evaluator: Any, info: dict[str, Any]
) -> dict[str, Any]:
    """Write ablation.csv/.json/.md/.png into `out`, print the table; return what ablation.json holds."""
    mode = getattr(evaluator, "mode", "max")
    summary = aggregate(rows)
    columns = table_columns(rows, evaluator)
    main = columns[0]
    seeds = sorted({r["seed"] for r in rows})
    listed = ", ".join(map(str, seeds))
    note = f"mean ± sample std over seeds {listed}" if len(seeds) > 1 else f"seed {listed}"
    caption = (
        f"{info['recipe']}, compared stage `{info['stage']}` on {rows[0]['split']}; {note}; "
        "**bold** = best per column (↓ lower / ↑ higher is better). "
        f"Peak MiB: {info['memory_measure']}."
    )
    report = {
        **info,
        "main_metric": main,
        "direction": direction(main, mode),
        "columns": columns,
        "variants": summary,
        "runs": rows,
    }
    atomic_write_text(json.dumps(report, indent=2), out / "ablation.json")
    atomic_write_text(csv_text(rows, summary), out / "ablation.csv")
    markdown = markdown_table(summary, columns, mode)
    atomic_write_text(f"{caption}\n\n{markdown}", out / "ablation.md")
    bar_chart(rows, summary, main, mode, out / "ablation.png", f"{info['stage']}: {main}\n{note}")
    console.print(rich_table(summary, columns, mode, f"ablation ({note})"))
    console.print(f"wrote {out}/ablation.csv, .json, .md, .png", markup=False)
    return report
