"""Comparing evaluated runs: each run's metrics with their intervals, its paired difference to a
baseline run (normally the student trained without a teacher), and the tables that show them.

Used by the pipeline's evaluate stage (one seed) and, through `kdkit.evaluation.stats`, by `kdkit ablate`
(several seeds). An interval needs the evaluator's bootstrap (`kdkit.evaluation.protocol`); without one,
values and differences are shown without intervals; with fewer than `kdkit.evaluation.stats.MIN_UNITS` test
units, `NO_INTERVAL` stands where the interval would be.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

from rich.markup import escape
from rich.table import Table

from kdkit.evaluation.stats import LEVEL, MIN_UNITS, Replicates, enough_units, paired_difference

_HIGHER_IS_BETTER = re.compile(r"acc|auc|tpr|precision|recall|f1|top[0-9]")
_LOWER_IS_BETTER = re.compile(r"err|eer|loss|hter|acer|apcer|bpcer|far|frr|fpr|params|_s_|MiB|seconds")
ARROWS = {"max": "↑", "min": "↓"}
EXCLUDES_ZERO = "✓"  # marks a difference whose interval excludes 0
NO_INTERVAL = f"n/a (n < {MIN_UNITS} units)"  # in place of an interval over too few test units


def direction(key: str, evaluator_mode: str) -> str:
    """'max' or 'min': whether a higher value of column `key` is better (names first, then the
    evaluator's mode: HTER and EER are lower-better, AUC and accuracy higher-better)."""
    name = key.rsplit("/", 1)[-1]
    if _HIGHER_IS_BETTER.search(name):
        return "max"
    if _LOWER_IS_BETTER.search(name):
        return "min"
    return "max" if evaluator_mode == "max" else "min"


def replicates_path(out_dir: Path, split: str) -> Path:
    """Where an evaluation of `split` in `out_dir` keeps its bootstrap replicates."""
    return Path(out_dir) / f"bootstrap_{split}.npz"


def load_replicates(out_dir: Path, split: str) -> Replicates | None:
    """The replicates of an evaluation, or None when its evaluator has no bootstrap."""
    path = replicates_path(out_dir, split)
    return Replicates.load(path) if path.is_file() else None


def differences(
    results: dict[str, dict[str, Any]],
    replicates: dict[str, Replicates | None],
    baseline: str,
    keys: list[str],
) -> dict[str, dict[str, dict[str, Any]]]:
    """Per run other than `baseline`, per metric key: its difference to the baseline, paired by the
    shared bootstrap resamples (`kdkit.evaluation.stats.paired_difference`, one seed)."""
    out = {}
    for run, metrics in results.items():
        if run == baseline:
            continue
        out[run] = {}
        for key in keys:
            if key not in metrics or key not in results[baseline]:
                continue
            point, base = metrics[key], results[baseline][key]
            paired = replicates.get(run), replicates.get(baseline)
            if paired[0] is None or paired[1] is None or key not in paired[0].values:
                out[run][key] = {"mean": point - base, "low": None, "high": None, "excludes_zero": None}
            else:
                out[run][key] = paired_difference([point], [base], [paired[0]], [paired[1]], key)
    return out


def value_cell(
    value: float,
    interval: list[float] | tuple[float, float] | None = None,
    fmt: str = ".4f",
    sep: str = " ",
    n_units: int | None = None,
) -> str:
    """`0.0833 [0.0510, 0.1190]` (`sep` between value and interval), the value alone, or
    `0.0833 n/a (n < 10 units)` when the interval was resampled over too few `n_units`."""
    text = f"{value:{fmt}}"
    if n_units is not None and not enough_units(n_units):  # whether or not an interval was kept
        return f"{text}{sep}{NO_INTERVAL}"
    if interval is not None and all(math.isfinite(v) for v in interval):
        text += f"{sep}[{interval[0]:{fmt}}, {interval[1]:{fmt}}]"
    return text


def difference_cell(diff: dict[str, Any], sep: str = " ") -> str:
    """`-0.0417 [-0.0800, -0.0100] ✓` (✓: the interval excludes 0; `sep` before the interval), or
    `-0.0417 n/a (n < 10 units)`: too few test units for an interval, never marked."""
    text = f"{diff['mean']:+.4f}"
    if diff.get("n_units") is not None and not enough_units(diff["n_units"]):
        text += f"{sep}{NO_INTERVAL}"
    elif diff.get("low") is not None:
        text += f"{sep}[{diff['low']:+.4f}, {diff['high']:+.4f}]"
        text += f" {EXCLUDES_ZERO}" if diff["excludes_zero"] else ""
    return text


def _metric_name(key: str) -> str:
    """A column header: the metric without its split (the table's title names the split)."""
    return key.split("/", 1)[-1]


def split_keys(keys: list[str] | None, split: str) -> list[str]:
    """An evaluator's headline keys (`summary_keys`, written for 'test') for `split`:
    'test/hter' -> 'val/hter' when the reported split is 'val'."""
    return [f"{split}/{key.partition('/')[2] or key}" for key in keys or []]


def results_table(
    results: dict[str, dict[str, Any]], split: str, keys: list[str] | None = None, mode: str = "max"
) -> Table:
    """One row per run: the headline metrics on `split` with their intervals, plus size columns."""
    first = next(iter(results.values()), {})
    keys = split_keys(keys, split) or [
        k for k in first if k.startswith(f"{split}/") and isinstance(first[k], (int, float))
    ]
    unit = first.get("resampling", {}).get("unit")
    table = Table(
        title=f"results on {split} — strict: threshold and checkpoint chosen on dev"
        + (f"; [{LEVEL:.0%} interval, test {unit}s resampled]" if unit else "")
    )
    table.add_column("run", no_wrap=True)
    for key in keys:
        table.add_column(f"{_metric_name(key)} {ARROWS[direction(key, mode)]}", justify="right")
    table.add_column("params (M)", justify="right")
    table.add_column("MiB", justify="right")
    for run, metrics in results.items():
        intervals = metrics.get("intervals", {})
        n_units = metrics.get("resampling", {}).get("n_units")
        cells = [
            value_cell(metrics[k], intervals.get(k), sep="\n", n_units=n_units) if k in metrics else "-"
            for k in keys
        ]
        table.add_row(escape(run), *cells, f"{metrics['params_M']:.3f}", f"{metrics['MiB']:.2f}")
    return table


def differences_table(diffs: dict[str, dict[str, dict[str, Any]]], baseline: str, mode: str = "max") -> Table:
    """One row per compared run: its paired difference to `baseline` per metric."""
    keys = list(dict.fromkeys(k for per_run in diffs.values() for k in per_run))
    table = Table(
        title=f"difference to {baseline}: run − {baseline} on the same test items "
        f"[{LEVEL:.0%} paired interval]; {EXCLUDES_ZERO} = the interval excludes 0"
    )
    table.add_column("run", no_wrap=True)
    for key in keys:
        table.add_column(f"Δ {_metric_name(key)} {ARROWS[direction(key, mode)]}", justify="right")
    for run, per_key in diffs.items():
        cells = [difference_cell(per_key[k], sep="\n") if k in per_key else "-" for k in keys]
        table.add_row(escape(run), *cells)
    return table


def paper_section(
    results: dict[str, dict[str, Any]], fitted: dict[str, dict[str, Any]], keys: list[str]
) -> dict[str, dict[str, Any]]:
    """Per run: the evaluator's `paper_keys` values and, when the test split was tracked during
    training, the epoch a test-set selection would have kept (`fitted[run]['best_on_test']`)."""
    section = {}
    for run, metrics in results.items():
        entry: dict[str, Any] = {k: metrics[k] for k in keys if k in metrics}
        best = fitted.get(run, {}).get("best_on_test") or {}
        if best:
            entry["best_on_test"] = {k: best[k] for k in ("monitor", "epoch", "value")}
        if entry:
            section[run] = entry
    return section


def paper_table(section: dict[str, dict[str, Any]]) -> Table:
    """The paper-comparable numbers, under a title that says they are not for selection."""
    keys = list(dict.fromkeys(k for entry in section.values() for k in entry if k != "best_on_test"))
    monitors = {e["best_on_test"]["monitor"] for e in section.values() if "best_on_test" in e}
    table = Table(
        title="for comparison with published numbers only — optimistic: threshold or epoch chosen on "
        "test, as most published code does; never used for selection"
        + (f" (best-on-test epoch by {', '.join(sorted(monitors))})" if monitors else "")
    )
    table.add_column("run", no_wrap=True)
    for key in keys:
        table.add_column(_metric_name(key), justify="right", overflow="fold")
    if monitors:
        table.add_column("best-on-test epoch (value)", justify="right")
    for run, entry in section.items():
        cells = [f"{entry[k]:.4f}" if k in entry else "-" for k in keys]
        if monitors:
            best = entry.get("best_on_test")
            cells.append(f"{best['epoch']} ({best['value']:.4f})" if best else "-")
        table.add_row(escape(run), *cells)
    return table
