"""Decision thresholds that an evaluator fixed, kept beside the evaluation that produced them.

An evaluator may report thresholds among its metrics: every `<split>/<name>` whose name ends in
`threshold` (e.g. the FAS evaluator's `test/threshold`, fixed at the dev set's EER point, and
`test/frame_threshold`). `write_calibration` stores them as `calibration.json` in the evaluation's
output folder; `find_calibration` finds them again for a `RUN/<stage>/model.pt`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kdkit.utils.checkpoint import atomic_write_text

CALIBRATION_FILE = "calibration.json"


@dataclass
class Calibration:
    """The thresholds of one evaluation; `threshold` is the headline one (key `threshold`)."""

    thresholds: dict[str, float]
    source: str  # the file they were read from

    @property
    def threshold(self) -> float | None:
        """The evaluator's headline decision threshold, if it reported one."""
        return self.thresholds.get("threshold")


def thresholds_in(metrics: dict[str, Any], split: str) -> dict[str, float]:
    """`{name: value}` for every `<split>/<name>` metric whose name ends in 'threshold'."""
    prefix = f"{split}/"
    return {
        key.removeprefix(prefix): float(value)
        for key, value in metrics.items()
        if key.startswith(prefix) and key.endswith("threshold") and isinstance(value, (int, float))
    }


def write_calibration(out_dir: Path, metrics: dict[str, Any], split: str) -> Path | None:
    """Write `out_dir/calibration.json` when the metrics hold thresholds; return its path."""
    thresholds = thresholds_in(metrics, split)
    if not thresholds:
        return None
    path = Path(out_dir) / CALIBRATION_FILE
    atomic_write_text(json.dumps({"split": split, "thresholds": thresholds}, indent=2), path)
    return path


def find_calibration(checkpoint: Path) -> Calibration | None:
    """The newest calibration of the model in `RUN/<stage>/model.pt`, or None.

    Looked for in the run's evaluate stages (`RUN/<evaluate stage>/<stage>/calibration.json`),
    in `kdkit eval` output folders beside the checkpoint (`RUN/<stage>/<folder>/calibration.json`),
    and, for runs made before calibration files existed, in `RUN/summary.json`.
    """
    stage_dir = Path(checkpoint).resolve().parent
    run_dir = stage_dir.parent
    files = [
        *run_dir.glob(f"*/{stage_dir.name}/{CALIBRATION_FILE}"),
        *stage_dir.glob(f"*/{CALIBRATION_FILE}"),
    ]
    if files:
        newest = max(files, key=lambda p: p.stat().st_mtime)
        data = json.loads(newest.read_text(encoding="utf-8"))
        return Calibration({k: float(v) for k, v in data["thresholds"].items()}, str(newest))
    return _from_summary(run_dir / "summary.json", stage_dir.name)


def _from_summary(summary: Path, stage: str) -> Calibration | None:
    if not summary.is_file():
        return None
    for name, result in json.loads(summary.read_text(encoding="utf-8")).items():
        if isinstance(result, dict) and result.get("do") == "evaluate" and stage in result.get("results", {}):
            thresholds = thresholds_in(result["results"][stage], result["split"])
            if thresholds:
                return Calibration(thresholds, f"{summary} ({name}.results.{stage})")
    return None
