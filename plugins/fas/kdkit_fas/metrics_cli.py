"""``kdkit fas metrics``: FAS metrics from score CSV files
(``score,label[,attack_type][,video][,subject]``), with 95 % bootstrap intervals."""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

from rich.table import Table

from kdkit.data.csvfile import read_csv
from kdkit.data.datasets import DataError
from kdkit.evaluation.stats import DRAWS, LEVEL, MIN_UNITS, enough_units
from kdkit.utils.runlog import output

from .metrics import (
    BPCER_AT_APCER_CONVENTION,
    TIE_CONVENTION,
    TPR_AT_FPR_CONVENTION,
    ScoreSet,
    bootstrap,
    evaluate_scores,
    plot_roc_det,
)

_REQUIRED = ("score", "label")
_OPTIONAL = ("attack_type", "video", "subject")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the options of ``kdkit fas metrics`` to ``parser``."""
    parser.add_argument(
        "--scores",
        type=Path,
        required=True,
        help="test CSV with header: score,label[,attack_type][,video][,subject]",
    )
    parser.add_argument(
        "--dev", type=Path, help="dev CSV (same columns); its EER threshold is applied to the test set"
    )
    parser.add_argument("--json", action="store_true", help="print the metrics as JSON instead of a table")
    parser.add_argument("--plot", type=Path, metavar="FILE.png", help="write ROC and DET curves to this PNG")
    parser.add_argument(
        "--draws",
        type=int,
        default=DRAWS,
        help=f"bootstrap resamples for the {LEVEL * 100:.0f}%% intervals (subjects, else videos, are "
        f"resampled; default {DRAWS}; 0 = no intervals)",
    )


def _parse_row(row: dict[str, Any], path: Path, line: int) -> tuple[float, int]:
    """Score and label of one CSV row; ValueError naming file, line and column on a bad value."""
    raw = {c: (row.get(c) or "").strip() for c in _REQUIRED}
    for c in _REQUIRED:
        if not raw[c]:
            raise ValueError(f"{path}, line {line}, column '{c}': empty value")
    decimal_comma = "," in raw["score"] and "." not in raw["score"]  # '0,93' from a European locale
    try:
        score = float(raw["score"].replace(",", ".") if decimal_comma else raw["score"])
    except ValueError:
        raise ValueError(f"{path}, line {line}, column 'score': not a number: {raw['score']!r}") from None
    if not math.isfinite(score):
        raise ValueError(f"{path}, line {line}, column 'score': must be finite, got {raw['score']!r}")
    if raw["label"] not in ("0", "1"):
        raise ValueError(
            f"{path}, line {line}, column 'label': expected 0 (attack) or 1 (bona fide), got {raw['label']!r}"
        )
    return score, int(raw["label"])


def load_score_csv(path: Path) -> ScoreSet:
    """Read a score CSV (header required, extra columns ignored) into a validated ScoreSet; files
    saved by spreadsheet programs are read too (`kdkit.data.csvfile`; a decimal comma in scores)."""
    table = read_csv(path, required=_REQUIRED)
    columns: dict[str, list[Any]] = {c: [] for c in (*_REQUIRED, *_OPTIONAL) if c in table.columns}
    for line, row in zip(table.lines, table.rows, strict=True):
        score, label = _parse_row(row, path, line)
        columns["score"].append(score)
        columns["label"].append(label)
        for c in _OPTIONAL:
            if c in columns:
                value = row[c]
                if not value and (c != "attack_type" or label == 0):
                    raise ValueError(f"{path}, line {line}, column '{c}': empty value")
                columns[c].append(value)
    try:
        return ScoreSet(
            columns["score"],
            columns["label"],
            columns.get("attack_type"),
            columns.get("video"),
            columns.get("subject"),
        )
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None


def _pct(x: float) -> str:
    return f"{100 * x:.2f}%"


def _table(result: dict[str, Any]) -> Table:
    """Rich table with one column per level (frame, video) and one row per metric; the bootstrap
    intervals of the headline level follow its values."""
    levels = [lvl for lvl in ("frame", "video") if lvl in result]
    intervals = result.get("intervals", {})
    table = Table(title=f"FAS metrics (threshold from the {result['threshold_source']} set's EER)")
    table.add_column("metric")
    for lvl in levels:
        table.add_column(f"{lvl} level", justify="right")

    def row(name: str, fmt, key: str, sub: str | None = None) -> None:
        cells = []
        for lvl in levels:
            value = result[lvl].get(key)
            value = value.get(sub) if sub is not None and value is not None else value
            text = "-" if value is None else fmt(value)
            if lvl == intervals.get("level") and key in intervals.get("metrics", {}):
                low, high = intervals["metrics"][key]
                text += f" [{fmt(low)}, {fmt(high)}]"
            cells.append(text)
        table.add_row(name, *cells)

    first = result[levels[0]]
    if first["apcer_pooled"]:
        row("APCER (all attacks pooled, no types)", _pct, "apcer")
    else:
        row("APCER (worst species)", _pct, "apcer")
        for species in first["apcer_per_species"]:
            row(f"  APCER species {species}", _pct, "apcer_per_species", species)
        for instrument in first["apcer_per_instrument"]:
            if instrument not in first["apcer_per_species"]:
                row(f"  APCER instrument {instrument}", _pct, "apcer_per_instrument", instrument)
    row("BPCER", _pct, "bpcer")
    row("ACER", _pct, "acer")
    row("HTER", _pct, "hter")
    row("EER (test)", _pct, "eer")
    row("AUC", lambda v: f"{v:.4f}", "auc")
    row("BPCER@APCER=1%", _pct, "bpcer_at_apcer_1pct")
    row("TPR@FPR=1% (live positive)", _pct, "tpr_at_fpr_1pct")
    row("TPR@FPR=0.1% (live positive)", _pct, "tpr_at_fpr_0.1pct")
    row("threshold", lambda v: f"{v:.6g}", "threshold")
    if "dev_eer" in first:
        row("EER (dev)", _pct, "dev_eer")
    row("optimistic: HTER at the test EER threshold", _pct, "optimistic_hter")
    return table


def _intervals(test: ScoreSet, result: dict[str, Any], draws: int) -> dict[str, Any]:
    """Bootstrap intervals of the headline level (video when ids are given), at its threshold."""
    level = "video" if test.videos is not None else "frame"
    scores = test.per_video() if level == "video" else test
    replicates = bootstrap(scores, result[level]["threshold"], draws)
    return {
        "level": level,
        "confidence": LEVEL,
        "draws": draws,
        "unit": replicates.unit,
        "n_units": replicates.n_units,
        "metrics": {key: list(replicates.interval(key)) for key in replicates.values}
        if enough_units(replicates.n_units)
        else {},  # too few units for an interval (`kdkit.evaluation.stats.MIN_UNITS`)
    }


def _plot(test: ScoreSet, dev: ScoreSet | None, path: Path, name: str) -> None:
    """Plot video-level curves when video ids are given (the usual test unit), else frame-level."""
    if test.videos is None:
        plot_roc_det(test, dev, path, title=f"{name} (frame level)")
        return
    dev_videos = None if dev is None else dev.per_video()
    plot_roc_det(test.per_video(), dev_videos, path, title=f"{name} (video level)")


def run(args: argparse.Namespace) -> int:
    """Run ``kdkit fas metrics``; returns 0. Bad input raises `DataError` (exit status 2)."""
    try:
        test = load_score_csv(args.scores)
        dev = None if args.dev is None else load_score_csv(args.dev)
        if args.draws < 0:
            raise ValueError(f"--draws: expected 0 or more, got {args.draws}")
        result = evaluate_scores(test, dev)
        if args.draws:
            result["intervals"] = _intervals(test, result, args.draws)
        if args.plot is not None:
            _plot(test, dev, args.plot, args.scores.name)
    except (ValueError, FileNotFoundError, IsADirectoryError) as e:  # bad input: exit 2 (kdkit.cli.main)
        raise DataError(str(e)) from None
    if dev is None:
        print(
            "notice: no --dev set given, so the threshold is the test set's own EER threshold; "
            "HTER is optimistic (it equals the test EER). Pass --dev for a proper a-priori threshold.",
            file=sys.stderr,
        )
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        output.print(_table(result))
        if "intervals" in result:
            i = result["intervals"]
            output.print(
                f"[...]: {i['confidence']:.0%} bootstrap intervals ({i['draws']} resamples of the "
                f"{i['n_units']} test {i['unit']}s, threshold fixed)."
                if i["metrics"]
                else f"No intervals: {i['n_units']} test {i['unit']}(s), fewer than the {MIN_UNITS} an "
                "interval needs."
            )
        output.print(
            f"Ties: {TIE_CONVENTION}.\nBPCER@APCER=1%: {BPCER_AT_APCER_CONVENTION}.\n"
            f"TPR@FPR: {TPR_AT_FPR_CONVENTION}.\nOptimistic: the threshold is chosen on the test set "
            "itself, as much published code does; only for comparison with published numbers.",
            markup=False,
        )
    return 0
