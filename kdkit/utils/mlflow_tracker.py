"""The MLflow tracker (`train.loggers: [mlflow]`): one MLflow run per kdkit run, through
`MlflowClient` (no fluent global state), into any tracking URI (a server, `sqlite:///FILE`, ...).

Params: the resolved recipe as dotted keys (`train.lr`, `pipeline.teacher.train.epochs`), each
value cut to MLflow's length limit (the whole recipe is the `recipe.yaml` artefact). Metrics: every
metrics record's numbers as `<stage>/<key>` at the record's step; each stage's final result as
`<stage>.<key path>`. Tags: the run's identity, and `model.<stage>`: the path of its `model.pt`
(the checkpoint is not copied). Artefacts: the files the run hands over (summary, recipe, plots).
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, Param
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.utils.validation import MAX_ENTITY_KEY_LENGTH, MAX_PARAM_VAL_LENGTH

from kdkit.utils.runlog import console
from kdkit.utils.trackers import RunIdentity, Tracker, TrackerError, flat, numbers

_NOT_IN_A_NAME = re.compile(r"[^\w./\- :]")  # what MLflow refuses in a metric, param or tag name


class MlflowTracker(Tracker):
    """One MLflow run: a new one, or `run_id`'s when it exists (a resumed kdkit run)."""

    def __init__(self, identity: RunIdentity, tracking_uri: str | None, run_id: str | None = None) -> None:
        self.identity = identity
        try:
            self.client = MlflowClient(tracking_uri)
            self.run_id = self._continued(run_id) or self._new_run()
            self.logged_params = set(self.client.get_run(self.run_id).data.params)
        except MlflowException as exc:
            where = f"tracking URI {tracking_uri!r}" if tracking_uri else "MLflow's default tracking URI"
            raise TrackerError(f"mlflow: cannot start a run at {where}: {exc.message}") from None
        console.print(
            f"mlflow: run {self.run_id} of experiment {self.experiment!r} at {self.client.tracking_uri}",
            markup=False,
        )

    @property
    def experiment(self) -> str:
        """An ablation's runs share its experiment; a run alone goes to `train.experiment`."""
        return self.identity.group or self.identity.experiment

    def _continued(self, run_id: str | None) -> str | None:
        """`run_id` if that run exists here (the tracking URI may have changed since), reopened."""
        if run_id is None:
            return None
        try:
            self.client.get_run(run_id)
        except MlflowException:
            return None
        self.client.update_run(run_id, status="RUNNING")
        return run_id

    def _new_run(self) -> str:
        found = self.client.get_experiment_by_name(self.experiment)
        try:
            experiment_id = found.experiment_id if found else self.client.create_experiment(self.experiment)
        except MlflowException:  # another run of the ablation created it meanwhile
            experiment_id = self.client.get_experiment_by_name(self.experiment).experiment_id
        tags = {**self.identity.tags, **({"group": self.identity.group} if self.identity.group else {})}
        tags["run_dir"] = str(self.identity.run_dir)
        run = self.client.create_run(experiment_id, tags=tags, run_name=self.identity.name)
        return run.info.run_id

    def params(self, recipe: dict[str, Any]) -> None:
        """The recipe's keys not logged yet (MLflow refuses to change a logged param)."""
        params = [Param(_name(k), _param_value(v)) for k, v in flat(recipe).items()]
        self.client.log_batch(self.run_id, params=[p for p in params if p.key not in self.logged_params])
        self.logged_params.update(p.key for p in params)

    def metrics(self, record: dict[str, Any]) -> None:
        """A record's numbers as `<stage>/<key>` at its step and time."""
        stamp, step = int(record.get("time", time.time()) * 1000), int(record.get("step", 0))
        stage = record.get("stage", "run")
        values = [Metric(_name(f"{stage}/{k}"), v, stamp, step) for k, v in numbers(record).items()]
        self.client.log_batch(self.run_id, metrics=values)

    def stage_result(self, stage: str, result: dict[str, Any], model: Path | None) -> None:
        """The result's numbers as `<stage>.<key path>`; the model's path as tag `model.<stage>`."""
        stamp = int(time.time() * 1000)
        values = numbers(flat(result, f"{stage}."))
        self.client.log_batch(self.run_id, metrics=[Metric(_name(k), v, stamp, 0) for k, v in values.items()])
        if model is not None:
            self.client.set_tag(self.run_id, _name(f"model.{stage}"), str(model))

    def files(self, root: Path, paths: list[Path]) -> None:
        """Each file as an artefact at its folder relative to `root`."""
        for path in paths:
            folder = path.parent.relative_to(root).as_posix()
            self.client.log_artifact(self.run_id, str(path), None if folder == "." else folder)

    def close(self, failed: bool) -> None:
        """Mark the run finished (or failed)."""
        self.client.set_terminated(self.run_id, "FAILED" if failed else "FINISHED")


def _name(key: str) -> str:
    """`key` as MLflow accepts it: allowed characters only, at most its key length."""
    return _NOT_IN_A_NAME.sub("_", key)[:MAX_ENTITY_KEY_LENGTH]


def _param_value(value: Any) -> str:
    """A recipe value as a param: strings as they are, the rest as JSON; cut to MLflow's limit."""
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text if len(text) <= MAX_PARAM_VAL_LENGTH else text[: MAX_PARAM_VAL_LENGTH - 1] + "…"
