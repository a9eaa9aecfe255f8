"""``kdkit fas metrics``: FAS metrics from score CSV files (``score,label[,attack_type][,video]``)."""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from .metrics import (
    BPCER_AT_APCER_CONVENTION,
    TIE_CONVENTION,
    ScoreSet,
    evaluate_scores,
    plot_roc_det,
)

_REQUIRED = ("score", "label")
_OPTIONAL = ("attack_type", "video")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the options of ``kdkit fas metrics`` to ``parser``."""
    parser.add_argument(
        "--scores", type=Path, required=True, help="test CSV with header: score,label[,attack_type][,video]"
    )
    parser.add_argument(
        "--dev", type=Path, help="dev CSV (same columns); its EER threshold is applied to the test set"
    )
    parser.add_argument("--json", action="store_true", help="print the metrics as JSON instead of a table")
    parser.add_argument("--plot", type=Path, metavar="FILE.png", help="write ROC and DET curves to this PNG")


def _parse_row(row: dict[str, Any], path: Path, line: int) -> tuple[float, int]:
    """Score and label of one CSV row; ValueError naming file, line and column on a bad value."""
    raw = {c: (row.get(c) or "").strip() for c in _REQUIRED}
    for c in _REQUIRED:
        if not raw[c]:
            raise ValueError(f"{path}, line {line}, column '{c}': empty value")
    try:
        score = float(raw["score"])
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
    """Read a score CSV (header required, extra columns ignored) into a validated ScoreSet."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            header = [(name or "").strip().lower() for name in reader.fieldnames or []]
            missing = [c for c in _REQUIRED if c not in header]
            if missing:
                raise ValueError(
                    f"{path}, line 1: missing column(s) {', '.join(missing)} in header {header} "
                    f"(expected score,label[,attack_type][,video])"
                )
            reader.fieldnames = header
            columns: dict[str, list[Any]] = {c: [] for c in (*_REQUIRED, *_OPTIONAL) if c in header}
            for row in reader:
                score, label = _parse_row(row, path, reader.line_num)
                columns["score"].append(score)
                columns["label"].append(label)
                for c in _OPTIONAL:
                    if c in columns:
                        value = (row.get(c) or "").strip()
                        if not value and (c == "video" or label == 0):
                            raise ValueError(f"{path}, line {reader.line_num}, column '{c}': empty value")
                        columns[c].append(value)
    except OSError as e:
        raise ValueError(f"cannot read {path}: {e.strerror or e}") from None
    except (csv.Error, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not a readable CSV file: {e}") from None
    try:
        return ScoreSet(columns["score"], columns["label"], columns.get("attack_type"), columns.get("video"))
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None


def _pct(x: float) -> str:
    return f"{100 * x:.2f}%"


def _table(result: dict[str, Any]) -> Table:
    """Rich table with one column per level (frame, video) and one row per metric."""
    levels = [lvl for lvl in ("frame", "video") if lvl in result]
    table = Table(title=f"FAS metrics (threshold from the {result['threshold_source']} set's EER)")
    table.add_column("metric")
    for lvl in levels:
        table.add_column(f"{lvl} level", justify="right")

    def row(name: str, fmt, key: str, sub: str | None = None) -> None:
        cells = []
        for lvl in levels:
            value = result[lvl].get(key)
            value = value.get(sub) if sub is not None and value is not None else value
            cells.append("-" if value is None else fmt(value))
        table.add_row(name, *cells)

    first = result[levels[0]]
    if first["apcer_pooled"]:
        row("APCER (all attacks pooled, no types)", _pct, "apcer")
    else:
        row("APCER (worst type)", _pct, "apcer")
        for species in first["apcer_per_type"]:
            row(f"  APCER {species}", _pct, "apcer_per_type", species)
    row("BPCER", _pct, "bpcer")
    row("ACER", _pct, "acer")
    row("HTER", _pct, "hter")
    row("EER (test)", _pct, "eer")
    row("AUC", lambda v: f"{v:.4f}", "auc")
    row("BPCER@APCER=1%", _pct, "bpcer_at_apcer_1pct")
    row("threshold", lambda v: f"{v:.6g}", "threshold")
    if "dev_eer" in first:
        row("EER (dev)", _pct, "dev_eer")
    return table


def _plot(test: ScoreSet, dev: ScoreSet | None, path: Path, name: str) -> None:
    """Plot video-level curves when video ids are given (the usual test unit), else frame-level."""
    if test.videos is None:
        plot_roc_det(test, dev, path, title=f"{name} (frame level)")
        return
    dev_videos = None if dev is None else dev.per_video()
    plot_roc_det(test.per_video(), dev_videos, path, title=f"{name} (video level)")


def run(args: argparse.Namespace) -> int:
    """Run ``kdkit fas metrics``; returns 0, or 2 on bad input (message on stderr)."""
    try:
        test = load_score_csv(args.scores)
        dev = None if args.dev is None else load_score_csv(args.dev)
        result = evaluate_scores(test, dev)
        if args.plot is not None:
            _plot(test, dev, args.plot, args.scores.name)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if dev is None:
        print(
            "notice: no --dev set given, so the threshold is the test set's own EER threshold; "
            "HTER is optimistic (it equals the test EER). Pass --dev for a proper a-priori threshold.",
            file=sys.stderr,
        )
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        console = Console()
        console.print(_table(result))
        console.print(f"Ties: {TIE_CONVENTION}.\nBPCER@APCER=1%: {BPCER_AT_APCER_CONVENTION}.")
    return 0
