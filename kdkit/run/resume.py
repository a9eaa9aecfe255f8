"""`kdkit run --resume` of a run whose recipe changed: keep what the change does not touch.

A stage runs again when its own inputs changed (`kdkit.run.stage_cache.stage_inputs`: its data, model,
training and distill settings, ...), when it is new, or when an earlier stage it reads
(`stage_upstream`: a distill stage's teacher, an evaluate stage's runs) runs again; every other
finished stage is kept. Before the run continues, the earlier results of the stages that run again
(and of stages the recipe no longer has) are moved to ``RUN/.superseded/<time>/`` with the previous
`recipe.yaml`, `summary.json` and `metrics.jsonl`, and removed from the run's own summary and
metrics, so no table mixes old and new results. (A stage name cannot start with '.', so that
folder never meets a stage's.)
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kdkit.config.loading import diff_keys, read_yaml, recipe_changes
from kdkit.config.schema import Recipe, RecipeError
from kdkit.config.validation import parse_recipe
from kdkit.errors import UsageError
from kdkit.run.stage_cache import stage_inputs, stage_upstream
from kdkit.utils.checkpoint import atomic_write_text
from kdkit.utils.runlog import console

SUPERSEDED = ".superseded"


@dataclass
class ResumePlan:
    """How a resumed run meets its changed recipe: the recipe keys that differ, the finished stages
    it keeps, the stages that run again (name → why) and the stages the recipe no longer has."""

    changed_keys: list[str]
    kept: list[str]
    rerun: dict[str, str]
    dropped: list[str]

    def apply(self, run_dir: Path) -> None:
        """Say what is kept and what runs again, and set the earlier results of the latter aside."""
        if not self.changed_keys:
            return
        console.print(
            f"--resume: the recipe differs from the one this run started with at "
            f"{', '.join(self.changed_keys)}",
            markup=False,
        )
        for name in self.kept:
            console.print(f"[{name}] kept: finished, and nothing it depends on changed", markup=False)
        for name, why in self.rerun.items():
            console.print(f"[{name}] runs again: {why}", markup=False)
        for name in self.dropped:
            console.print(f"[{name}] is no longer in the recipe", markup=False)
        if not self.rerun and not self.dropped:
            console.print("--resume: no stage depends on what changed; every stage is kept", markup=False)
            return
        moved = _set_aside(run_dir, [*self.rerun, *self.dropped])
        console.print(f"--resume: the earlier results of those stages are kept in {moved}", markup=False)


def plan_resume(run_dir: Path, recipe: Recipe) -> ResumePlan:
    """Compare `recipe` with the one the run in `run_dir` started with (its `recipe.yaml`)."""
    saved_path = run_dir / "recipe.yaml"
    data = read_yaml(saved_path)
    changed = recipe_changes(data, recipe.to_dict())
    if not changed:
        return ResumePlan([], [], {}, [])
    try:
        saved = parse_recipe(data, str(saved_path))
    except RecipeError as exc:
        raise UsageError(
            f"--resume: the recipe this run started with ({saved_path}) cannot be read by this kdkit "
            f"version ({'; '.join(exc.problems[:3])}), so which of its stages the change at "
            f"{', '.join(changed[:8])} touches is unknown; start a new run (another --out)"
        ) from None
    rerun = stages_to_rerun(saved, recipe)
    names = [s.name for s in recipe.pipeline]
    kept = [name for name in names if name not in rerun and (run_dir / name / "done.json").exists()]
    dropped = [s.name for s in saved.pipeline if s.name not in names]
    return ResumePlan(changed, kept, rerun, dropped)


def stages_to_rerun(saved: Recipe, recipe: Recipe) -> dict[str, str]:
    """The stages of `recipe` whose results from a run of `saved` cannot be kept, in pipeline order,
    each with the reason: new, its inputs changed (at which keys), or an earlier stage it reads
    runs again."""
    before = {s.name: s for s in saved.pipeline}
    rerun: dict[str, str] = {}
    for stage in recipe.pipeline:
        old = before.get(stage.name)
        if old is None:
            rerun[stage.name] = "a new stage"
            continue
        changed = sorted(diff_keys(stage_inputs(saved, old), stage_inputs(recipe, stage)))
        upstream = [name for name in stage_upstream(recipe, stage) if name in rerun]
        if changed:
            rerun[stage.name] = f"its inputs changed at {', '.join(changed)}"
        elif upstream:
            verb = "runs" if len(upstream) == 1 else "run"
            rerun[stage.name] = f"it reads {', '.join(upstream)}, which {verb} again"
    return rerun


def _set_aside(run_dir: Path, stages: list[str]) -> Path:
    """Move the folders of `stages` and a copy of the run's recipe, summary and metrics into a new
    folder under RUN/.superseded/, and drop those stages from the run's summary and metrics."""
    folder = _new_folder(run_dir / SUPERSEDED)
    for name in ("recipe.yaml", "summary.json", "metrics.jsonl"):
        if (run_dir / name).exists():
            shutil.copy2(run_dir / name, folder / name)
    # Summary and metrics first: were this cut short, the next --resume finds the same stages to
    # set aside (the saved recipe is replaced only when the run starts).
    summary_path = run_dir / "summary.json"
    if summary_path.exists():
        summary = json.loads(summary_path.read_text(encoding="utf-8"))
        kept = {name: result for name, result in summary.items() if name not in stages}
        atomic_write_text(json.dumps(kept, indent=2), summary_path)
    metrics_path = run_dir / "metrics.jsonl"
    if metrics_path.exists():
        lines = metrics_path.read_text(encoding="utf-8").splitlines(keepends=True)
        atomic_write_text("".join(line for line in lines if _stage_of(line) not in stages), metrics_path)
    for name in stages:
        if (run_dir / name).exists():
            os.replace(run_dir / name, folder / name)
    return folder


def _stage_of(line: str) -> Any:
    """The `stage` of one metrics.jsonl line (None for a line cut by a crash)."""
    try:
        return json.loads(line).get("stage")
    except (ValueError, AttributeError):
        return None


def _new_folder(parent: Path) -> Path:
    """A new folder under `parent` named by the local time (with -2, -3, ... when taken)."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    candidate, n = parent / stamp, 1
    while candidate.exists():
        n += 1
        candidate = parent / f"{stamp}-{n}"
    candidate.mkdir(parents=True)
    return candidate
