"""The Weights & Biases tracker (`train.loggers: [wandb]`): one W&B run per kdkit run, its files
in `RUN/wandb/`. W&B's own settings choose where it goes: `WANDB_MODE=offline` logs without an
account (`wandb sync RUN/wandb/offline-run-*` uploads it later), `WANDB_API_KEY` or `wandb login`
for the service, `WANDB_ENTITY` for a team.

Project: `train.experiment` (default: the recipe's name); group: the ablation; tags: `key=value`.
Config: the resolved recipe (nested). Metrics: every record's numbers as `<stage>/<key>` against
their own step axis `<stage>/step` (each stage counts its steps from 0, and W&B's own step may
never go back). Summary: each stage's result and its model's path. Files: the run's artefacts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import wandb

from kdkit.utils.trackers import RunIdentity, Tracker, TrackerError, numbers

MAX_TAG_CHARS = 64  # W&B refuses longer tags


class WandbTracker(Tracker):
    """One W&B run in `run_dir/wandb/`: a new one, or `run_id`'s continued (a resumed kdkit run)."""

    def __init__(self, identity: RunIdentity, run_dir: Path, run_id: str | None = None) -> None:
        tags = [f"{key}={value}"[:MAX_TAG_CHARS] for key, value in identity.tags.items()]
        try:
            self.run = wandb.init(
                project=identity.experiment,
                group=identity.group,
                name=identity.name,
                tags=tags,
                dir=str(run_dir),
                id=run_id,
                resume="allow" if run_id else None,
                settings=wandb.Settings(console="off"),  # kdkit's own output stays as it is
            )
        except Exception as exc:  # wandb raises several types (no login, no network, bad settings)
            raise TrackerError(
                f"wandb: cannot start a run ({type(exc).__name__}: {exc}); log in (`wandb login` or "
                "WANDB_API_KEY), or log without an account: WANDB_MODE=offline"
            ) from None
        self.run_id = self.run.id
        self.stages: set[str] = set()

    def params(self, recipe: dict[str, Any]) -> None:
        """The recipe as the run's config (a resumed run's changed values are updated)."""
        self.run.config.update(recipe, allow_val_change=True)

    def metrics(self, record: dict[str, Any]) -> None:
        """A record's numbers as `<stage>/<key>`, with `<stage>/step` as their x-axis."""
        if "step" not in record:
            return
        stage = record.get("stage", "run")
        if stage not in self.stages:
            self.stages.add(stage)
            self.run.define_metric(f"{stage}/step")
            self.run.define_metric(f"{stage}/*", step_metric=f"{stage}/step")
        values = {f"{stage}/{key}": value for key, value in numbers(record).items()}
        self.run.log({**values, f"{stage}/step": record["step"]})

    def stage_result(self, stage: str, result: dict[str, Any], model: Path | None) -> None:
        """The result under the stage's name in the run's summary, with its model's path."""
        self.run.summary.update({stage: {**result, **({"model": str(model)} if model else {})}})

    def files(self, root: Path, paths: list[Path]) -> None:
        """Each file into the run's files, at its path relative to `root`."""
        for path in paths:
            self.run.save(str(path), base_path=str(root), policy="now")

    def close(self, failed: bool) -> None:
        """Finish the run (exit code 1 when the kdkit run failed)."""
        self.run.finish(exit_code=1 if failed else 0)
