"""Experiment trackers beside `metrics.jsonl`: TensorBoard, MLflow and Weights & Biases, chosen by
`train.loggers` (docs/tracking.md).

A `Tracker` receives what a run logs: its parameters once (the resolved recipe), every metrics
record (a `metrics.jsonl` line), each stage's final result and model file, and at the end the run's
artefact files. `open_trackers` starts the named ones for a run directory and remembers their run
ids in `RUN/trackers.json`, so that a resumed run (`kdkit run --resume`, an ablation run retried)
continues the same tracker runs. The packages are imported only when a tracker is used.
"""

from __future__ import annotations

import importlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kdkit.utils.checkpoint import atomic_write_text

# name -> (the module it needs, how to install it); `jsonl` is kdkit's own metrics.jsonl
LOGGERS: dict[str, tuple[str | None, str]] = {
    "jsonl": (None, ""),
    "tensorboard": ("torch.utils.tensorboard", "pip install tensorboard"),
    "mlflow": ("mlflow", "pip install 'kdkit[trackers]'"),
    "wandb": ("wandb", "pip install 'kdkit[trackers]'"),
}
IDS_FILE = "trackers.json"  # in the run directory: each tracker's run id, for a resumed run
TRACKER_DIRS = ("tensorboard", "wandb")  # the folders trackers write into the run directory
NOT_METRICS = ("step", "epoch", "time")  # keys of a metrics record that are its coordinates


class TrackerError(RuntimeError):
    """A tracker that cannot start its run (a tracking URI it cannot open, no W&B login, ...)."""


@dataclass(frozen=True)
class RunIdentity:
    """How trackers file a run: its name, its experiment (MLflow experiment, W&B project), where
    its files are once it is complete (an ablation moves its runs there), the group it belongs to
    (an ablation: MLflow experiment and W&B group) and its tags."""

    name: str
    experiment: str
    run_dir: Path
    group: str | None = None
    tags: dict[str, str] = field(default_factory=dict)


class Tracker:
    """What a tracker receives; each method does nothing unless a tracker needs it."""

    run_id: str | None = None  # the tracker's own id of the run, when it has one (kept for a resume)

    def params(self, recipe: dict[str, Any]) -> None:
        """The resolved recipe (nested mappings), once per run."""

    def metrics(self, record: dict[str, Any]) -> None:
        """One metrics record: `stage`, `step`, `epoch`, `time` and the named values."""

    def stage_result(self, stage: str, result: dict[str, Any], model: Path | None) -> None:
        """A finished stage's result (its part of summary.json) and where its `model.pt` is once
        the run is complete, if it has one."""

    def files(self, root: Path, paths: list[Path]) -> None:
        """Artefact files under `root` (kept at their paths relative to it)."""

    def close(self, failed: bool) -> None:
        """End the tracker's run (marked failed when the run raised)."""


class TensorBoardTracker(Tracker):
    """Scalars as `<stage>/<key>` at the record's step, in `RUN/tensorboard/`."""

    def __init__(self, run_dir: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))

    def metrics(self, record: dict[str, Any]) -> None:
        """Each number of a record that has a step."""
        if "step" not in record:
            return
        for key, value in numbers(record).items():
            self.writer.add_scalar(f"{record.get('stage', 'run')}/{key}", value, record["step"])

    def close(self, failed: bool) -> None:
        """Flush and close the event file."""
        self.writer.close()


def missing_package(name: str) -> str | None:
    """None when logger `name` can be used, else the problem and its install line."""
    module, install = LOGGERS[name]
    if module is None:
        return None
    try:
        importlib.import_module(module)
    except ImportError:
        return f"{name} needs the {module.split('.')[-1]} package: {install}"
    except Exception as exc:  # installed but broken (e.g. a clashing dependency)
        return f"{name}: importing {module} failed ({type(exc).__name__}: {exc}); reinstall it: {install}"
    return None


def chosen_loggers(names: list[str] | None) -> list[str]:
    """The trackers to start for `train.loggers` (jsonl is metrics.jsonl, always written): null
    means tensorboard when it is installed, as before `train.loggers` existed."""
    if names is None:
        return [] if missing_package("tensorboard") else ["tensorboard"]
    return [name for name in dict.fromkeys(names) if name != "jsonl"]


def open_trackers(
    names: list[str], run_dir: Path, identity: RunIdentity, tracking_uri: str | None
) -> list[Tracker]:
    """Start the trackers `names` for the run in `run_dir`, continuing the runs recorded in its
    `trackers.json`; raise `TrackerError` when one cannot start (those started are closed)."""
    ids_path = run_dir / IDS_FILE
    ids = json.loads(ids_path.read_text()) if ids_path.exists() else {}
    trackers: list[Tracker] = []
    try:
        for name in names:
            trackers.append(_open(name, run_dir, identity, tracking_uri, ids.get(name)))
            if trackers[-1].run_id is not None:
                ids[name] = trackers[-1].run_id
    except Exception:
        for tracker in trackers:
            tracker.close(failed=True)
        raise
    if ids:
        atomic_write_text(json.dumps(ids, indent=2), ids_path)
    return trackers


def _open(name: str, run_dir: Path, identity: RunIdentity, uri: str | None, run_id: str | None) -> Tracker:
    if name == "tensorboard":
        return TensorBoardTracker(run_dir)
    if name == "mlflow":
        from kdkit.utils.mlflow_tracker import MlflowTracker

        return MlflowTracker(identity, uri, run_id)
    from kdkit.utils.wandb_tracker import WandbTracker

    return WandbTracker(identity, run_dir, run_id)


def numbers(record: dict[str, Any]) -> dict[str, float]:
    """The numeric values of a metrics record, without its coordinates (step, epoch, time)."""
    return {
        key: float(value)
        for key, value in record.items()
        if isinstance(value, int | float) and not isinstance(value, bool) and key not in NOT_METRICS
    }


def flat(mapping: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mappings as one level of dotted keys; a list of mappings that all have a `name` (the
    pipeline) by those names, as `--set` addresses them (`pipeline.teacher.train.epochs`); other
    lists are values."""
    out: dict[str, Any] = {}
    for key, value in mapping.items():
        path = f"{prefix}{key}"
        if isinstance(value, list) and value and all(isinstance(v, dict) and "name" in v for v in value):
            value = {v["name"]: v for v in value}
        if isinstance(value, dict) and value:
            out.update(flat(value, f"{path}."))
        else:
            out[path] = value
    return out
