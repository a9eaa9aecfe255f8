"""Run logging: `metrics.jsonl` (one JSON object per line), TensorBoard when installed, console."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from rich.console import Console

console = Console(stderr=True, highlight=False)


def _clean(value: Any) -> Any:
    """JSON-safe value: non-finite floats become strings so the file stays valid JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


class MetricsLog:
    """Appends metric records to `run_dir/metrics.jsonl` and, if available, TensorBoard."""

    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._tb = None
        try:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"))
        except Exception:  # tensorboard is optional; any import/setup failure just disables it
            self._tb = None

    def write(self, record: dict[str, Any]) -> None:
        """Append one record (it gets a wall-clock `time` field)."""
        record = {"time": round(time.time(), 3), **{k: _clean(v) for k, v in record.items()}}
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
        if self._tb is not None and "step" in record:
            prefix = record.get("stage", "run")
            for key, value in record.items():
                if isinstance(value, (int, float)) and key not in ("step", "epoch", "time"):
                    self._tb.add_scalar(f"{prefix}/{key}", value, record["step"])

    def close(self) -> None:
        """Flush and close TensorBoard files."""
        if self._tb is not None:
            self._tb.close()
