"""The training loop. Read it top to bottom: `Trainer.fit` is the whole story.

A *task* is any `nn.Module` whose `forward(images, labels, keys=None)` returns a dict with a
`loss` (and other named terms, all logged) and the `logits`, and which has `trainable_state_dict()`
/ `load_trainable_state_dict()` and a `model` attribute (the network being trained): `Distiller`
and `SupervisedTask` are the two in kdkit. `keys` are the batch's (sample index, augmentation slot)
pairs from `kdkit.data.build_loaders` (the teacher cache's key); loaders of plain
`(images, labels)` batches work too.

Under torchrun (see `kdkit.distributed`) every rank runs this same loop on its share of each
global batch through DDP; rank 0 alone evaluates, logs and writes checkpoints.
"""

from __future__ import annotations

import contextlib
import inspect
import itertools
import math
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from kdkit import distributed
from kdkit.checkpoint import atomic_save, load_file, rng_state, set_rng_state
from kdkit.evaluation import Evaluator, Predictions
from kdkit.optim import build_optimizer
from kdkit.recipe import TrainSpec
from kdkit.runlog import MetricsLog, console, progress


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


class TrainingInterrupted(KeyboardInterrupt):
    """SIGINT/SIGTERM stopped training after the state was saved; `--resume` continues exactly."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.signum = signum


@contextlib.contextmanager
def _stop_requests() -> Iterator[dict[str, int]]:
    """While training: the first SIGINT/SIGTERM only asks the loop to save and stop (`stop["signal"]`);
    a second SIGINT interrupts at once. Not in torchrun workers or outside the main thread, where
    stopping must stay collective and the default handling (resume from the last epoch) applies."""
    stop: dict[str, int] = {}
    if threading.current_thread() is not threading.main_thread() or distributed.world_size() > 1:
        yield stop
        return

    def request(signum: int, _frame: Any) -> None:
        if stop and signum == signal.SIGINT:
            raise KeyboardInterrupt
        stop["signal"] = signum
        console.print(
            f"[yellow]{signal.Signals(signum).name}: saving after this step, then stopping "
            "(Ctrl-C again to stop at once, keeping the last epoch's checkpoint)[/yellow]"
        )

    previous = {sig: signal.signal(sig, request) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def resolve_device(name: str) -> torch.device:
    """'auto' → CUDA when available, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"train.device: {name!r} requested but CUDA is not available; use 'cpu' or 'auto'")
    return device


def autocast(device: torch.device, amp: str) -> contextlib.AbstractContextManager[Any]:
    """The autocast context for `amp` ('none', 'bf16', 'fp16')."""
    if amp == "none":
        return contextlib.nullcontext()
    if amp == "fp16" and device.type != "cuda":
        raise ValueError("train.amp: fp16 needs a CUDA device; use bf16 on the CPU")
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


@torch.no_grad()
def predict(
    model: nn.Module,
    loader: DataLoader,
    device: torch.device,
    amp: str = "none",
    description: str = "predict",
) -> Predictions:
    """Run `model` over `loader` in eval mode; return logits and labels in dataset order."""
    was_training = model.training
    model.eval()
    logits, labels = [], []
    with progress(len(loader), description, unit="batches") as advance:
        for images, targets in loader:
            with autocast(device, amp):
                out = model(images.to(device, non_blocking=True))
            logits.append(out.float().cpu())
            labels.append(targets.cpu())
            advance()
    model.train(was_training)
    return Predictions(torch.cat(logits), torch.cat(labels).long(), loader.dataset)


@dataclass
class StageResult:
    """What a finished stage reports: best (on the monitored metric) and last-epoch metrics."""

    best: dict[str, float] = field(default_factory=dict)
    last: dict[str, float] = field(default_factory=dict)
    best_epoch: int = 0
    # with `train.track_test`: the epoch the evaluator's `optimistic_monitor` (a test metric) picks,
    # as published code selects epochs, and that epoch's test metrics; only ever reported
    best_on_test: dict[str, Any] = field(default_factory=dict)
    epochs: int = 0
    seconds: float = 0.0
    train_seconds_per_epoch: float = 0.0
    data_wait_seconds_per_epoch: float = 0.0  # of the training time, spent waiting for the loader


class Trainer:
    """Optimises a task, evaluates it, checkpoints it; resumes from `last.pt`."""

    def __init__(
        self,
        task: nn.Module,
        spec: TrainSpec,
        train_loader: DataLoader,
        eval_loaders: dict[str, DataLoader],
        evaluator: Evaluator,
        out_dir: Path,
        log: MetricsLog,
        stage: str,
        seed: int = 0,
        model_meta: dict[str, Any] | None = None,
        set_epoch: Callable[[int, int], None] | None = None,
    ) -> None:
        self.task, self.spec, self.stage, self.seed = task, spec, stage, seed
        self.train_loader, self.eval_loaders, self.evaluator = train_loader, eval_loaders, evaluator
        self.out_dir, self.log = Path(out_dir), log
        self.model_meta = model_meta or {}
        self.set_epoch = set_epoch
        self.device = resolve_device(distributed.device_for_rank(spec.device))
        self.task.to(self.device)
        self.step_module = distributed.wrap(task, self.device)  # DDP when launched by torchrun
        # Tasks written for `forward(images, labels)` keep working: keys are passed only if accepted.
        self.takes_keys = "keys" in inspect.signature(task.forward).parameters
        self.steps_per_epoch = len(train_loader)
        if spec.max_steps_per_epoch:
            self.steps_per_epoch = min(self.steps_per_epoch, spec.max_steps_per_epoch)
        self.optimizer, self.scheduler = build_optimizer(task, spec, self.steps_per_epoch)
        self.trainable = [p for p in task.parameters() if p.requires_grad]
        self.scaler = torch.amp.GradScaler("cuda", enabled=spec.amp == "fp16")
        self.epoch = 0  # completed epochs
        self.global_step = 0
        self.best: dict[str, Any] = {"value": None, "epoch": 0, "metrics": {}}
        self.best_on_test: dict[str, Any] = {}  # see StageResult.best_on_test
        self.last_metrics: dict[str, float] = {}
        self.train_seconds = 0.0
        self.data_seconds = 0.0
        self.epoch_progress: dict[str, Any] | None = None  # where an interrupted epoch stopped
        self.stop: dict[str, int] = {}  # set by SIGINT/SIGTERM while `fit` runs

    # ---------------------------------------------------------------- the loop
    def fit(self, resume: bool = False) -> StageResult:
        """Train for `spec.epochs` epochs (continuing from `last.pt` when `resume`)."""
        if resume and (self.out_dir / "last.pt").exists():
            self._load_state(self.out_dir / "last.pt")
            where = f"after epoch {self.epoch}"
            if self.epoch_progress:
                where = f"at step {self.epoch_progress['step']} of epoch {self.epoch + 1}"
            console.print(  # markup=False: "[stage]" is text, not a rich style tag
                f"[{self.stage}] resumed from {self.out_dir / 'last.pt'} {where}", markup=False
            )
        distributed.decorrelate_rng()  # ranks share the seed; dropout must differ between them
        start = time.perf_counter()
        main = distributed.is_main()
        with _stop_requests() as self.stop:
            for epoch in range(self.epoch, self.spec.epochs):
                self._fit_epoch(epoch, main)
        if main and not (self.out_dir / "model.pt").exists():  # resumed after the last epoch, or no eval
            self._save_model(self.last_metrics)
        distributed.barrier()  # later stages on every rank read the files rank 0 wrote
        return StageResult(
            best=self.best["metrics"],
            last=self.last_metrics,
            best_epoch=self.best["epoch"],
            best_on_test=self.best_on_test,
            epochs=self.epoch,
            seconds=time.perf_counter() - start,
            train_seconds_per_epoch=self.train_seconds / max(self.epoch, 1),
            data_wait_seconds_per_epoch=self.data_seconds / max(self.epoch, 1),
        )

    def _fit_epoch(self, epoch: int, main: bool) -> None:
        """Train one epoch, then (rank 0) evaluate when due, log and save `last.pt`."""
        epoch_start = time.perf_counter()
        train_terms = self.train_one_epoch(epoch)
        self.train_seconds += time.perf_counter() - epoch_start
        self.epoch = epoch + 1
        record = {
            "stage": self.stage,
            "epoch": self.epoch,
            "step": self.global_step,
            **{f"train/{k}": v for k, v in train_terms.items()},
        }
        if not main:  # the others wait for rank 0 in their next step's gradient all-reduce
            return
        if self.epoch % self.spec.eval_every == 0 or self.epoch == self.spec.epochs:
            metrics = self.evaluate()
            record.update(metrics)
            self._update_best(metrics)
            self._update_best_on_test(metrics)
        self.log.write(record)
        self._save_state()
        console.print(
            f"[{self.stage}] epoch {self.epoch}/{self.spec.epochs} {self._epoch_line(record)}", markup=False
        )
        if self.stop:  # also after the last epoch: the next stage must not start
            self._interrupted(f"after epoch {self.epoch}")

    def _epoch_line(self, record: dict[str, Any]) -> str:
        """The loss terms, the monitored metric and the evaluator's headline metrics of an epoch
        (every metric is in metrics.jsonl)."""
        shown = [k for k in record if k.startswith("train/")]
        shown += [self.evaluator.monitor, *getattr(self.evaluator, "summary_keys", [])]
        return " ".join(
            f"{k}={record[k]:.4g}" for k in dict.fromkeys(shown) if isinstance(record.get(k), float)
        )

    def train_one_epoch(self, epoch: int) -> dict[str, float]:
        """One pass over the training loader (at most `steps_per_epoch` batches); the epoch's mean terms."""
        self.task.train()
        resumed, self.epoch_progress = self.epoch_progress, None
        first = resumed["step"] if resumed else 0  # steps of this epoch trained before an interruption
        names: list[str] = resumed["names"] if resumed else []
        # Per term: sum over samples, kept on the device (no per-step sync).
        sums = resumed["sums"].to(self.device) if resumed else torch.zeros(0)
        seen = resumed["seen"] if resumed else 0
        tick = time.perf_counter()
        batches = self._batches(epoch, first)
        description = f"[{self.stage}] epoch {epoch + 1}/{self.spec.epochs}"
        with progress(
            self.steps_per_epoch, description, completed=first, show=distributed.is_main()
        ) as advance:
            for step in range(first, self.steps_per_epoch):
                wait = time.perf_counter()
                batch = next(batches)
                self.data_seconds += time.perf_counter() - wait
                out = self.train_step(*batch)
                if not names:
                    names = [key for key in out if key != "logits"]
                    sums = torch.zeros(len(names), device=self.device)
                n = len(batch[1])
                sums += torch.stack([out[key].detach() for key in names]).float() * n
                seen += n
                if self.global_step % self.spec.log_every == 0 or step + 1 == self.steps_per_epoch:
                    means = self._gathered_means(names, sums, seen)
                    rate = seen * distributed.world_size() / max(time.perf_counter() - tick, 1e-9)
                    info = " ".join(f"{k}={v:.3f}" for k, v in means.items()) + f" {rate:.0f} img/s"
                    advance(0, info=info)
                    if distributed.is_main():
                        self.log.write(
                            {
                                "stage": self.stage,
                                "epoch": epoch + 1,
                                "step": self.global_step,
                                "lr": self.optimizer.param_groups[0]["lr"],
                                "img_per_s": rate,
                                **{f"train/{k}": v for k, v in means.items()},
                            }
                        )
                advance()
                if self.stop and step + 1 < self.steps_per_epoch:
                    self._save_state({"step": step + 1, "names": names, "sums": sums.cpu(), "seen": seen})
                    self._interrupted(f"at step {step + 1}/{self.steps_per_epoch} of epoch {epoch + 1}")
        return self._gathered_means(names, sums, seen)

    def _batches(self, epoch: int, skip: int) -> Iterator[Any]:
        """The epoch's batches from number `skip` on (a run resumed mid-epoch trained the others)."""
        if self.set_epoch is None:  # a plain iterable: load the trained batches and drop them
            return itertools.islice(iter(self.train_loader), skip, None)
        # kdkit's sampler leaves them out, so nothing is loaded for them.
        self.set_epoch(epoch, skip * (self.train_loader.batch_size or 1))
        return iter(self.train_loader)

    def _interrupted(self, where: str) -> None:
        """Stop after SIGINT/SIGTERM: `last.pt` was just saved."""
        raise TrainingInterrupted(
            f"[{self.stage}] stopped {where}; saved {self.out_dir / 'last.pt'}. "
            "Continue with the same command plus --resume (and --out pointing at this run).",
            self.stop["signal"],
        )

    def train_step(
        self, images: torch.Tensor, labels: torch.Tensor, keys: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """One optimisation step on one batch; returns the task's outputs (loss terms and logits)."""
        images = images.to(self.device, non_blocking=True)
        labels = labels.to(self.device, non_blocking=True)
        if self.scheduler is not None:
            self.scheduler.step_update(self.global_step)
        with autocast(self.device, self.spec.amp):
            out = (
                self.step_module(images, labels, keys)
                if self.takes_keys
                else self.step_module(images, labels)
            )
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(out["loss"]).backward()
        if self.spec.clip_grad:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.trainable, self.spec.clip_grad)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.global_step += 1
        return out

    def _gathered_means(self, names: list[str], sums: torch.Tensor, seen: int) -> dict[str, float]:
        """Sample-weighted means of the terms over every rank (the one synchronisation point)."""
        totals = distributed.all_sum(torch.cat([sums, sums.new_tensor([seen])])).tolist()
        count = max(totals.pop(), 1)
        return self._check_finite({k: v / count for k, v in zip(names, totals, strict=True)})

    def _check_finite(self, terms: dict[str, float]) -> dict[str, float]:
        bad = {k: v for k, v in terms.items() if not math.isfinite(v)}
        if bad:
            raise TrainingDiverged(
                f"[{self.stage}] the loss became non-finite at step {self.global_step} ({bad}); stopped. "
                f"The last good checkpoint is kept in {self.out_dir} (last.pt, if an epoch had finished). "
                "Try a lower train.lr, train.clip_grad, or amp: none."
            )
        return terms

    # ---------------------------------------------------------------- evaluation
    def evaluate(self) -> dict[str, float]:
        """Predict on every evaluation split and let the evaluator turn that into metrics."""
        model = self.task.model
        predictions = {
            split: predict(model, loader, self.device, self.spec.amp, f"[{self.stage}] {split}")
            for split, loader in self.eval_loaders.items()
        }
        metrics = self.evaluator(predictions, None)
        self.last_metrics = metrics
        return metrics

    def _update_best(self, metrics: dict[str, float]) -> None:
        key = self.evaluator.monitor
        if key not in metrics:
            raise KeyError(f"evaluator monitor {key!r} not among the metrics {sorted(metrics)}")
        value = metrics[key]
        best = self.best["value"]
        better = best is None or (value > best if self.evaluator.mode == "max" else value < best)
        if better:
            self.best = {"value": value, "epoch": self.epoch, "metrics": metrics}
            self._save_model(metrics)

    def _update_best_on_test(self, metrics: dict[str, float]) -> None:
        """Record (never act on) the epoch a selection on the test split would keep."""
        key = getattr(self.evaluator, "optimistic_monitor", None)
        if key is None or key not in metrics:
            return
        value, best = metrics[key], self.best_on_test.get("value")
        if best is None or (value > best if self.evaluator.mode == "max" else value < best):
            tested = {k: v for k, v in metrics.items() if k.startswith(key.split("/", 1)[0] + "/")}
            self.best_on_test = {"monitor": key, "value": value, "epoch": self.epoch, "metrics": tested}

    # ---------------------------------------------------------------- checkpoints
    def _save_model(self, metrics: dict[str, float]) -> None:
        """`model.pt`: the trained network only (no optimizer, adapters or teacher)."""
        atomic_save(
            {
                "kdkit": 1,
                "kind": "model",
                "model": self.task.model.state_dict(),
                "epoch": self.epoch,
                "metrics": metrics,
                **self.model_meta,
            },
            self.out_dir / "model.pt",
        )

    def _save_state(self, epoch_progress: dict[str, Any] | None = None) -> None:
        """`last.pt`: everything needed to continue exactly where training stopped (at the end of
        epoch `self.epoch`, or `epoch_progress["step"]` steps into the next one)."""
        atomic_save(
            {
                "kdkit": 1,
                "kind": "trainer_state",
                "stage": self.stage,
                "epoch": self.epoch,
                "global_step": self.global_step,
                "trainable": self.task.trainable_state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict() if self.scheduler is not None else {},
                "scaler": self.scaler.state_dict(),
                "rng": rng_state(),
                "best": self.best,
                "best_on_test": self.best_on_test,
                "last_metrics": self.last_metrics,
                "train_seconds": self.train_seconds,
                "data_seconds": self.data_seconds,
                "epoch_progress": epoch_progress,
                **self.model_meta,
            },
            self.out_dir / "last.pt",
        )

    def _load_state(self, path: Path) -> None:
        state = load_file(path)
        self.task.load_trainable_state_dict(state["trainable"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None and state["scheduler"]:
            self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        set_rng_state(state["rng"])
        self.epoch, self.global_step = state["epoch"], state["global_step"]
        self.best, self.last_metrics = state["best"], state["last_metrics"]
        self.best_on_test = state.get("best_on_test", {})
        self.train_seconds = state["train_seconds"]
        self.data_seconds = state.get("data_seconds", 0.0)
        self.epoch_progress = state.get("epoch_progress")
