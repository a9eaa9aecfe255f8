"""Tests for kdkit.training.trainer: determinism, exact resume, divergence, best vs last, checkpoints."""

from __future__ import annotations

import itertools
import json
import signal
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import (
    TINY_DATA,
    tiny_distill_task,
    tiny_supervised_task,
    tiny_train_spec,
    tiny_trainer,
    tiny_vit,
)

from kdkit.data.datasets import build_loaders
from kdkit.evaluation.predict import predict
from kdkit.evaluation.protocol import Predictions
from kdkit.training.task import SupervisedTask
from kdkit.training.trainer import Trainer, TrainingDiverged, TrainingInterrupted
from kdkit.utils.checkpoint import load_file, seed_everything


def records(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def epoch_records(out: Path, epoch: int) -> list[dict[str, Any]]:
    """The run's records of one epoch without wall-clock fields."""
    drop = {"time", "img_per_s"}
    return [{k: v for k, v in r.items() if k not in drop} for r in records(out) if r["epoch"] == epoch]


def same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_two_runs_with_the_same_seed_are_identical(tmp_path: Path) -> None:
    states = []
    for name in ("a", "b"):
        seed_everything(0)
        trainer = tiny_trainer(tmp_path / name, tiny_supervised_task(), tiny_train_spec())
        result = trainer.fit()
        states.append(trainer.task.trainable_state_dict())
        assert result.epochs == 2
    assert same_state(*states)
    assert epoch_records(tmp_path / "a", 2) == epoch_records(tmp_path / "b", 2)
    # ... and training changed the weights at all.
    seed_everything(0)
    assert not same_state(states[0], tiny_supervised_task().trainable_state_dict())


def test_resume_continues_exactly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seed_everything(0)
    straight = tiny_trainer(tmp_path / "straight", tiny_distill_task(), tiny_train_spec())
    straight.fit()

    seed_everything(0)
    interrupted = tiny_trainer(tmp_path / "resumed", tiny_distill_task(), tiny_train_spec())
    save_state = interrupted._save_state

    def save_then_stop() -> None:
        save_state()
        raise KeyboardInterrupt  # stopped right after epoch 1 was checkpointed

    monkeypatch.setattr(interrupted, "_save_state", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        interrupted.fit()
    assert load_file(tmp_path / "resumed" / "last.pt")["epoch"] == 1

    seed_everything(123)  # a fresh process: other initial weights and RNG state
    resumed = tiny_trainer(tmp_path / "resumed", tiny_distill_task(), tiny_train_spec())
    result = resumed.fit(resume=True)
    assert result.epochs == 2
    assert same_state(straight.task.trainable_state_dict(), resumed.task.trainable_state_dict())
    assert straight.optimizer.state_dict()["state"].keys() == resumed.optimizer.state_dict()["state"].keys()
    assert epoch_records(tmp_path / "straight", 2) == epoch_records(tmp_path / "resumed", 2)
    assert len(epoch_records(tmp_path / "resumed", 1)) == len(epoch_records(tmp_path / "straight", 1))


def test_resume_without_a_checkpoint_starts_from_scratch(tmp_path: Path) -> None:
    result = tiny_trainer(tmp_path, tiny_supervised_task(), tiny_train_spec(epochs=1)).fit(resume=True)
    assert result.epochs == 1


class NanInEpoch2(SupervisedTask):
    """A task whose loss becomes NaN after the first epoch's three steps."""

    calls = 0

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        out = super().forward(images, labels)
        self.calls += 1
        if self.calls > 3:
            out["loss"] = out["loss"] * float("nan")
        return out


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path: Path) -> None:
    torch.manual_seed(0)
    trainer = tiny_trainer(tmp_path, NanInEpoch2(tiny_vit()), tiny_train_spec(epochs=3))
    with pytest.raises(TrainingDiverged, match=r"non-finite at step [45].*'loss': nan"):
        trainer.fit()
    state = load_file(tmp_path / "last.pt")
    assert state["epoch"] == 1 and state["global_step"] == 3
    assert all(torch.isfinite(v).all() for v in state["trainable"].values() if v.is_floating_point())
    assert all(r["epoch"] == 1 for r in records(tmp_path))  # every line is valid JSON, none from epoch 2
    # The kept checkpoint is usable: a healthy task resumes from it.
    result = tiny_trainer(tmp_path, SupervisedTask(tiny_vit()), tiny_train_spec(epochs=3)).fit(resume=True)
    assert result.epochs == 3


class ScriptedEvaluator:
    """Reports a fixed accuracy per evaluation and snapshots the model it was given."""

    monitor = "val/accuracy"
    mode = "max"

    def __init__(self, model: torch.nn.Module, accuracies: list[float]) -> None:
        self.model, self.accuracies, self.snapshots = model, list(accuracies), []

    def __call__(self, predictions: dict[str, Predictions], out_dir: Path | None = None) -> dict[str, float]:
        assert set(predictions) == {"val"} and predictions["val"].logits.shape[1] == 10
        self.snapshots.append({k: v.clone() for k, v in self.model.state_dict().items()})
        return {"val/accuracy": self.accuracies.pop(0), "val/n": float(len(predictions["val"].labels))}


def test_best_and_last_metrics_and_model_pt(tmp_path: Path) -> None:
    task = tiny_supervised_task()
    evaluator = ScriptedEvaluator(task.model, [0.5, 0.9, 0.7])
    result = tiny_trainer(tmp_path, task, tiny_train_spec(epochs=3), evaluator).fit()
    assert (result.best_epoch, result.best["val/accuracy"], result.last["val/accuracy"]) == (2, 0.9, 0.7)
    assert [r["val/accuracy"] for r in records(tmp_path) if "val/accuracy" in r] == [0.5, 0.9, 0.7]

    saved = torch.load(tmp_path / "model.pt", map_location="cpu", weights_only=True)
    assert (saved["kind"], saved["epoch"], saved["metrics"]["val/accuracy"]) == ("model", 2, 0.9)
    assert saved["spec"] == {"name": "tiny"}
    assert same_state(saved["model"], evaluator.snapshots[1])  # the weights of the best epoch
    fresh = tiny_vit()
    fresh.load_state_dict(saved["model"])
    last = load_file(tmp_path / "last.pt")
    assert last["epoch"] == 3 and last["best"]["epoch"] == 2
    assert same_state({f"model.{k}": v for k, v in evaluator.snapshots[2].items()}, last["trainable"])


def test_eval_every_and_the_log(tmp_path: Path) -> None:
    task = tiny_supervised_task()
    evaluator = ScriptedEvaluator(task.model, [0.1, 0.2])
    tiny_trainer(tmp_path, task, tiny_train_spec(epochs=3, eval_every=2), evaluator).fit()
    epochs = [r for r in records(tmp_path) if "lr" not in r]
    assert [(r["epoch"], "val/accuracy" in r) for r in epochs] == [(1, False), (2, True), (3, True)]
    steps = [r for r in records(tmp_path) if "lr" in r]
    assert [r["step"] for r in steps] == [2, 3, 4, 6, 8, 9]  # every log_every steps and each epoch's end
    assert all({"stage", "epoch", "train/loss", "train/ce", "lr"} <= r.keys() for r in steps)
    assert len({r["lr"] for r in steps}) == len(steps)  # the schedule moves every step


@pytest.mark.filterwarnings("ignore:torch.cuda.amp.GradScaler is enabled")
def test_bf16_autocast_on_cpu(tmp_path: Path) -> None:
    result = tiny_trainer(
        tmp_path, tiny_supervised_task(), tiny_train_spec(epochs=1, amp="bf16", clip_grad=1.0)
    ).fit()
    assert 0.0 <= result.last["val/accuracy"] <= 1.0
    with pytest.raises(ValueError, match="fp16 needs a CUDA device"):
        tiny_trainer(tmp_path / "fp16", tiny_supervised_task(), tiny_train_spec(epochs=1, amp="fp16")).fit()


def test_fit_names_what_it_is_missing(tmp_path: Path) -> None:
    train_loader, _, _ = build_loaders(TINY_DATA, seed=0)
    trainer = Trainer(tiny_supervised_task(), tiny_train_spec(), train_loader, out_dir=tmp_path)
    with pytest.raises(ValueError, match=r"Trainer\.fit needs evaluator, log \(got None\)"):
        trainer.fit()
    assert not list(tmp_path.iterdir())


def test_train_steps_runs_n_steps_without_a_run_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # anything written would land here
    train_loader, _, _ = build_loaders(TINY_DATA, seed=0)
    batches = list(itertools.islice(train_loader, 3))
    task = tiny_supervised_task()
    before = {k: v.clone() for k, v in task.trainable_state_dict().items()}
    trainer = Trainer(task, tiny_train_spec(), train_loader)  # no evaluator, out_dir or log
    timing = trainer.train_steps(batches, 2)
    assert (timing.steps, trainer.global_step) == (2, 2)
    assert 0 <= timing.data_seconds <= timing.seconds
    assert not same_state(before, task.trainable_state_dict())
    assert trainer.train_steps(batches, 5).steps == 3  # the batches ran out
    assert trainer.global_step == 5 and not list(tmp_path.iterdir())


def test_a_last_pt_of_the_previous_version_resumes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`last.pt` holds plain dicts; one written before `best` named its monitor, stopped mid-epoch,
    still continues exactly."""
    seed_everything(0)
    straight = tiny_trainer(tmp_path / "straight", tiny_supervised_task(), tiny_train_spec())
    straight.fit()

    seed_everything(0)
    stopped = tiny_trainer(tmp_path / "old", tiny_supervised_task(), tiny_train_spec())
    step = stopped.train_step

    def signal_at_step_4(*batch: torch.Tensor) -> dict[str, torch.Tensor]:
        out = step(*batch)
        if stopped.global_step == 4:
            stopped.stop.signum = signal.SIGTERM  # what the handler of `fit` sets
        return out

    monkeypatch.setattr(stopped, "train_step", signal_at_step_4)
    with pytest.raises(TrainingInterrupted, match="stopped at step 1/3 of epoch 2"):
        stopped.fit()
    path = tmp_path / "old" / "last.pt"
    state = load_file(path)
    assert state["epoch_progress"]["step"] == 1 and state["best"]["monitor"] == "val/accuracy"
    del state["best"]["monitor"]  # the previous version's `best`: value, epoch, metrics
    torch.save(state, path)

    seed_everything(123)
    resumed = tiny_trainer(tmp_path / "old", tiny_supervised_task(), tiny_train_spec())
    result = resumed.fit(resume=True)
    assert (result.epochs, result.best_epoch) == (2, straight.best.epoch)
    assert same_state(straight.task.trainable_state_dict(), resumed.task.trainable_state_dict())
    assert epoch_records(tmp_path / "straight", 2)[-1] == epoch_records(tmp_path / "old", 2)[-1]


def test_predict_returns_logits_in_order_without_a_graph_and_restores_train_mode() -> None:
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Dropout(0.5), torch.nn.Linear(4, 3))
    model.train()
    images = torch.randn(10, 1, 2, 2)
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(images, torch.arange(10) % 3), batch_size=4
    )
    out = predict(model, loader, torch.device("cpu"))
    # Under no_grad (no graph kept for a whole split) and in eval mode (dropout off: exact logits).
    assert not out.logits.requires_grad
    torch.testing.assert_close(out.logits, model[2](images.flatten(1)).detach())
    assert out.labels.tolist() == (torch.arange(10) % 3).tolist() and model.training
