"""Experiment trackers (`train.loggers`), for real: MLflow into a local file store read back with
`MlflowClient`, W&B in offline mode read back from its run file, an ablation's runs in one MLflow
experiment with their variant and seed tags, and the recipe checks (names, missing packages)."""

from __future__ import annotations

import json
import struct
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import small_ablation_recipe_dict

from kdkit.cli import main
from kdkit.config.loading import apply_overrides
from kdkit.config.schema import RecipeError
from kdkit.config.validation import parse_recipe
from kdkit.run.ablation import Ablation, _run_and_publish, plan_jobs
from kdkit.run.stage_cache import train_stage_key
from kdkit.run.variants import expand_grid
from kdkit.utils.runlog import MetricsLog
from kdkit.utils.trackers import Tracker

pytestmark = pytest.mark.slow  # a run with both trackers: W&B's start alone takes seconds

LOSS = "student_kd/train/loss"  # as trackers name train/loss of stage student_kd


def _tracked_recipe(root: Path, loggers: list[str]) -> dict[str, Any]:
    """The tiny teacher → student_kd → test recipe, logging to `loggers` and a file store in `root`."""
    data = small_ablation_recipe_dict()
    data["train"].update(loggers=loggers, tracking_uri=(root / "mlruns").as_uri())
    return data


@pytest.fixture(scope="module")
def tracker_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A folder to run in, MLflow's file store allowed (fast to create; SQLite's first use runs
    every schema migration, seconds) and W&B offline with its own folders inside."""
    root = tmp_path_factory.mktemp("trackers")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        mp.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
        mp.setenv("WANDB_MODE", "offline")
        for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
            mp.setenv(name, str(root / "wandb-home"))
        yield root


@pytest.fixture(scope="module")
def tracked_run(tracker_env: Path) -> Path:
    """`kdkit run` of the tiny recipe with loggers [jsonl, mlflow, wandb]."""
    (tracker_env / "tiny.yaml").write_text(
        yaml.safe_dump(_tracked_recipe(tracker_env, ["jsonl", "mlflow", "wandb"]), sort_keys=False)
    )
    assert main(["run", "tiny.yaml", "--out", "run"]) == 0
    return tracker_env / "run"


def _jsonl_steps(run: Path, stage: str, key: str) -> list[tuple[int, float]]:
    """(step, value) of `key` in the records of `stage` in metrics.jsonl, in order."""
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r[key]) for r in records if r["stage"] == stage and key in r]


def _mlflow_client(root: Path) -> Any:
    """A client of the file store in `root` (mlflow is imported here: collecting stays fast)."""
    from mlflow import MlflowClient

    return MlflowClient((root / "mlruns").as_uri())


def _mlflow_run(run: Path) -> Any:
    """The client of the run's store and the MLflow run it logged to."""
    client = _mlflow_client(run.parent)
    return client, client.get_run(json.loads((run / "trackers.json").read_text())["mlflow"])


def test_mlflow_holds_the_recipe_metrics_per_step_summary_and_artefacts(tracked_run: Path) -> None:
    client, run = _mlflow_run(tracked_run)
    assert client.get_experiment(run.info.experiment_id).name == "digits-kd"  # the recipe's name
    assert run.info.run_name == "run" and run.info.status == "FINISHED"
    params, recipe = run.data.params, yaml.safe_load((tracked_run / "recipe.yaml").read_text())
    assert float(params["train.lr"]) == recipe["train"]["lr"] and params["pipeline.teacher.do"] == "train"
    assert params["models.student.name"] == "vit_tiny_patch16_224"
    assert json.loads(params["distill.pairs"]) == [[1, 1], [2, 2]]
    history = [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, LOSS)]
    assert history == _jsonl_steps(tracked_run, "student_kd", "train/loss") and len(history) >= 2
    summary = json.loads((tracked_run / "summary.json").read_text())
    accuracy = summary["student_kd"]["best"]["val/accuracy"]
    assert run.data.metrics["student_kd.best.val/accuracy"] == pytest.approx(accuracy)
    assert run.data.tags["model.teacher"] == str((tracked_run / "teacher" / "model.pt").resolve())
    assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {"summary.json", "recipe.yaml"}


def _wandb_records(run_file: Path) -> Iterator[Any]:
    """The records of a W&B run file (`run-ID.wandb`: W&B's LevelDB-style log of protobuf records;
    wandb ships no reader of its own for it)."""
    from wandb.proto import wandb_internal_pb2

    data, block, pos, chunk = run_file.read_bytes(), 32768, 7, b""  # 7: the file's header
    while pos + 7 <= len(data):
        left = block - pos % block
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if left < 7 or (kind == 0 and length == 0):  # the rest of a block is padding
            pos += left
            continue
        chunk, pos = chunk + data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind in (1, 4):  # a full record, or the last piece of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunk)
            chunk = b""
            yield record


def test_wandb_offline_run_holds_the_config_metrics_summary_and_files(tracked_run: Path) -> None:
    (offline,) = (tracked_run / "wandb").glob("offline-run-*")
    records = list(_wandb_records(next(offline.glob("run-*.wandb"))))
    (start,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert (start.project, start.display_name) == ("digits-kd", "run")
    configs = [start.config, *(r.config for r in records if r.WhichOneof("record_type") == "config")]
    config = {u.key: json.loads(u.value_json) for c in configs for u in c.update}
    recipe = yaml.safe_load((tracked_run / "recipe.yaml").read_text())
    assert config["train"] == recipe["train"] and config["pipeline"][0]["name"] == "teacher"
    rows = [
        {"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in r.history.item}
        for r in records
        if r.WhichOneof("record_type") == "history"
    ]
    logged = [(row["student_kd/step"], row[LOSS]) for row in rows if LOSS in row]
    assert logged == _jsonl_steps(tracked_run, "student_kd", "train/loss")
    summary = {
        "/".join(u.nested_key) or u.key: u.value_json
        for r in records
        if r.HasField("summary")
        for u in r.summary.update
    }
    assert "student_kd" in summary and "val/accuracy" in json.loads(summary["student_kd"])["best"]
    assert (offline / "files" / "summary.json").exists()


def test_a_resumed_run_continues_its_tracker_runs(tracked_run: Path) -> None:
    ids = json.loads((tracked_run / "trackers.json").read_text())
    assert main(["run", "tiny.yaml", "--out", "run", "--resume"]) == 0
    assert json.loads((tracked_run / "trackers.json").read_text()) == ids
    client, run = _mlflow_run(tracked_run)
    assert len(client.search_runs([run.info.experiment_id])) == 1 and run.info.status == "FINISHED"


def test_an_ablation_logs_its_runs_as_one_experiment_tagged_by_variant_and_seed(tracker_env: Path) -> None:
    ablation = Ablation(
        recipe=Path("tiny.yaml"),
        base=_tracked_recipe(tracker_env, ["mlflow"]),
        variants=expand_grid(["distill.adapter=projection"]),
        seeds=[0, 1],
        command_line="kdkit ablate tiny.yaml",
        out=tracker_env / "abl",
    )
    jobs, _, _ = plan_jobs(ablation)
    for job in jobs:  # in this process: the runs `kdkit ablate` hands to its worker processes
        _run_and_publish(job)
    client = _mlflow_client(tracker_env)
    experiment = client.get_experiment_by_name("abl")
    runs = client.search_runs([experiment.experiment_id])
    tags = sorted((r.info.run_name, r.data.tags["variant"], r.data.tags["seed"]) for r in runs)
    assert tags == [(job.name, "adapter=projection", str(job.seed)) for job in jobs]
    for run in runs:  # the model paths name the folder the ablation moved each run into
        assert Path(run.data.tags["model.student_kd"]).is_file()


# ------------------------------------------------------------------------------------ recipe checks
def test_an_unknown_logger_is_named_with_its_key_path() -> None:
    data = apply_overrides(small_ablation_recipe_dict(), ["train.loggers=[jsonl, mlfow]"])
    with pytest.raises(
        RecipeError, match=r"train\.loggers\[1\]: unknown logger 'mlfow'\. Did you mean 'mlflow'\?"
    ):
        parse_recipe(data)


def test_a_stage_cannot_log_elsewhere_than_its_run() -> None:
    data = apply_overrides(small_ablation_recipe_dict(), ["pipeline.teacher.train.loggers=[mlflow]"])
    with pytest.raises(RecipeError, match=r"pipeline\.teacher\.train\.loggers: a run logs to one place"):
        parse_recipe(data)


def test_a_missing_package_stops_the_run_before_training_with_its_install_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "mlflow", None)  # as if it were not installed
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(_tracked_recipe(tmp_path, ["mlflow"])))
    assert main(["run", str(tmp_path / "tiny.yaml"), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "train.loggers: mlflow needs the mlflow package: pip install 'kdkit[trackers]'" in err
    assert "Traceback" not in err and not (tmp_path / "run" / "metrics.jsonl").exists()


def test_where_a_run_logs_changes_no_stage_cache_key() -> None:
    plain = parse_recipe(small_ablation_recipe_dict())
    data = _tracked_recipe(Path("/tmp"), ["tensorboard", "mlflow", "wandb"])
    logged = parse_recipe(apply_overrides(data, ["train.experiment=elsewhere"]))
    teacher = plain.pipeline[0]
    assert train_stage_key(logged, teacher) == train_stage_key(plain, teacher)


class _Broken(Tracker):
    def metrics(self, record: dict[str, Any]) -> None:
        raise ConnectionError("tracking server gone")


def test_a_tracker_that_fails_mid_run_is_dropped_and_the_metrics_log_goes_on(tmp_path: Path) -> None:
    log = MetricsLog(tmp_path, [_Broken()])
    log.write({"stage": "s", "step": 1, "train/loss": 1.0})
    log.write({"stage": "s", "step": 2, "train/loss": 0.5})
    assert log.trackers == [] and len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 2
