"""The training loop. Read it top to bottom: `Trainer.fit` is the whole story.

A *task* is any `nn.Module` whose `forward(images, labels, keys=None)` returns a dict with a
`loss` (and other named terms, all logged) and the `logits`, and which has `trainable_state_dict()`
/ `load_trainable_state_dict()` and a `model` attribute (the network being trained): `Distiller`
and `SupervisedTask` are the two in kdkit. `keys` are the batch's (sample index, augmentation slot)
pairs from `kdkit.data.datasets.build_loaders` (the teacher cache's key); loaders of plain
`(images, labels)` batches work too.

Under torchrun (see `kdkit.utils.distributed`) every rank runs this same loop on its share of each
global batch through DDP; rank 0 alone evaluates, logs and writes checkpoints. What it prints for
people (the epoch lines, the progress bar's running terms) is laid out by `kdkit.training.display`.
"""

from __future__ import annotations

import contextlib
import inspect
import itertools
import math
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from kdkit.config.schema import TrainSpec
from kdkit.data.augment import Frames, device_images
from kdkit.evaluation.predict import predict
from kdkit.evaluation.protocol import Evaluator
from kdkit.training.display import EpochPrinter, step_info
from kdkit.training.optim import build_optimizer
from kdkit.utils import distributed
from kdkit.utils.checkpoint import atomic_save, load_file, rng_state, set_rng_state
from kdkit.utils.device import autocast, resolve_device
from kdkit.utils.runlog import MetricsLog, console, progress


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


class TrainingInterrupted(KeyboardInterrupt):
    """SIGINT/SIGTERM stopped training after the state was saved; `--resume` continues exactly."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.signum = signum


@dataclass
class StopRequest:
    """Whether a SIGINT/SIGTERM asked `fit` to save and stop after the current step (`signum`)."""

    signum: int | None = None

    @property
    def requested(self) -> bool:
        """A signal arrived."""
        return self.signum is not None


@dataclass
class Best:
    """The best evaluation so far by `monitor`: its value, the epoch and that epoch's metrics
    (`value` None: nothing evaluated yet)."""

    monitor: str = ""  # absent from the `best` of a `last.pt` written before kdkit stored it
    value: float | None = None
    epoch: int = 0
    metrics: dict[str, float] = field(default_factory=dict)

    def improved_by(self, value: float, mode: str) -> bool:
        """Whether `value` beats the best so far in direction `mode` ('max' or 'min')."""
        if self.value is None:
            return True
        return value > self.value if mode == "max" else value < self.value


@dataclass
class EpochProgress:
    """An epoch's running loss terms after `step` of its steps: per term in `names`, the sum over
    its `seen` samples (on the training device: no synchronisation per step). `last.pt` keeps it
    when training stops mid-epoch, so the resumed epoch logs the means of all its steps."""

    step: int = 0
    names: list[str] = field(default_factory=list)
    sums: torch.Tensor = field(default_factory=lambda: torch.zeros(0))
    seen: int = 0

    def add(self, out: dict[str, torch.Tensor], samples: int) -> None:
        """Count one step's outputs (every term but the logits), the means of `samples` samples."""
        if not self.names:
            self.names = [key for key in out if key != "logits"]
            self.sums = torch.zeros(len(self.names), device=out["loss"].device)
        self.sums += torch.stack([out[key].detach() for key in self.names]).float() * samples
        self.seen += samples
        self.step += 1


@dataclass
class StepTiming:
    """What `Trainer.train_steps` ran: the steps, the seconds spent waiting for batches, and the
    seconds of all of it."""

    steps: int = 0
    data_seconds: float = 0.0
    seconds: float = 0.0


@contextlib.contextmanager
def _stop_requests() -> Iterator[StopRequest]:
    """While training: the first SIGINT/SIGTERM only asks the loop to save and stop (`stop.signum`);
    a second SIGINT interrupts at once. Not in torchrun workers or outside the main thread, where
    stopping must stay collective and the default handling (resume from the last epoch) applies."""
    stop = StopRequest()
    if threading.current_thread() is not threading.main_thread() or distributed.world_size() > 1:
        yield stop
        return

    def request(signum: int, _frame: Any) -> None:
        if stop.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        stop.signum = signum
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


def compile_task(task: nn.Module, mode: str = "default") -> None:
    """torch.compile the models of `task` in place, through its `compile_models(mode)` (the built-in
    tasks compile their models, not the loss code around them, so taps and the teacher cache keep
    working); a task without that method cannot be compiled and says so."""
    compile_models = getattr(task, "compile_models", None)
    if compile_models is None:
        raise TypeError(
            f"train.compile: {type(task).__name__} has no compile_models(mode) method; "
            "set train.compile: false, or give the task one that compiles its models"
        )
    compile_models(mode)


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
    """Optimises a task, evaluates it, checkpoints it; resumes from `last.pt`.

    `fit` needs the `evaluator`, `out_dir` and `log`; without them (None) a Trainer still runs
    training steps (`train_steps`, `train_one_epoch`), e.g. to time them. `train_loader` is the
    epoch: its length (at most `spec.max_steps_per_epoch`) sizes the learning-rate schedule.
    """

    def __init__(
        self,
        task: nn.Module,
        spec: TrainSpec,
        train_loader: DataLoader | Sequence[Any],
        eval_loaders: dict[str, DataLoader] | None = None,
        evaluator: Evaluator | None = None,
        out_dir: Path | None = None,
        log: MetricsLog | None = None,
        stage: str = "train",
        seed: int = 0,
        model_meta: dict[str, Any] | None = None,
        set_epoch: Callable[[int, int], None] | None = None,
    ) -> None:
        self.task, self.spec, self.stage, self.seed = task, spec, stage, seed
        self.train_loader, self.eval_loaders, self.evaluator = train_loader, eval_loaders or {}, evaluator
        self.out_dir, self.log = None if out_dir is None else Path(out_dir), log
        self.model_meta = model_meta or {}
        self.set_epoch = set_epoch
        self.device = resolve_device(distributed.device_for_rank(spec.device))
        self.task.to(self.device)
        if spec.compile:
            compile_task(task, spec.compile_mode)
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
        self.best = Best()
        self.best_on_test: Best | None = None  # see StageResult.best_on_test
        self.last_metrics: dict[str, float] = {}
        self.train_seconds = 0.0
        self.data_seconds = 0.0
        self.epoch_progress: EpochProgress | None = None  # where an interrupted epoch stopped
        self.stop = StopRequest()  # set by SIGINT/SIGTERM while `fit` runs

    # ---------------------------------------------------------------- the loop
    def fit(self, resume: bool = False) -> StageResult:
        """Train for `spec.epochs` epochs (continuing from `last.pt` when `resume`)."""
        self._needs("fit", "evaluator", "out_dir", "log")
        if resume and (self.out_dir / "last.pt").exists():
            self._load_state(self.out_dir / "last.pt")
            where = f"after epoch {self.epoch}"
            if self.epoch_progress:
                where = f"at step {self.epoch_progress.step} of epoch {self.epoch + 1}"
            console.print(  # markup=False: "[stage]" is text, not a rich style tag
                f"[{self.stage}] resumed from {self.out_dir / 'last.pt'} {where}", markup=False
            )
        distributed.decorrelate_rng()  # ranks share the seed; dropout must differ between them
        start = time.perf_counter()
        main = distributed.is_main()
        # new for each fit, so that a resumed run's log has the header again
        printer = EpochPrinter(self.stage, self.spec.epochs, self.evaluator.monitor)
        with _stop_requests() as self.stop:
            for epoch in range(self.epoch, self.spec.epochs):
                self._fit_epoch(epoch, main, printer)
        if main and not (self.out_dir / "model.pt").exists():  # resumed after the last epoch, or no eval
            self._save_model(self.last_metrics)
        distributed.barrier()  # later stages on every rank read the files rank 0 wrote
        return StageResult(
            best=self.best.metrics,
            last=self.last_metrics,
            best_epoch=self.best.epoch,
            best_on_test=asdict(self.best_on_test) if self.best_on_test else {},
            epochs=self.epoch,
            seconds=time.perf_counter() - start,
            train_seconds_per_epoch=self.train_seconds / max(self.epoch, 1),
            data_wait_seconds_per_epoch=self.data_seconds / max(self.epoch, 1),
        )

    def _fit_epoch(self, epoch: int, main: bool, printer: EpochPrinter) -> None:
        """Train one epoch, then (rank 0) evaluate when due, log, save `last.pt` and print the
        epoch's line."""
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
        printer.print(record, self.optimizer.param_groups[0]["lr"], time.perf_counter() - epoch_start)
        if self.stop.requested:  # also after the last epoch: the next stage must not start
            self._interrupted(f"after epoch {self.epoch}")

    def train_one_epoch(self, epoch: int) -> dict[str, float]:
        """One pass over the training loader (at most `steps_per_epoch` batches; the rest of an
        interrupted epoch when `epoch_progress` says where it stopped); the epoch's mean terms."""
        tally, self.epoch_progress = self.epoch_progress or EpochProgress(), None
        tally.sums = tally.sums.to(self.device)
        description = f"[{self.stage}] epoch {epoch + 1}/{self.spec.epochs}"
        with progress(
            self.steps_per_epoch, description, completed=tally.step, show=distributed.is_main()
        ) as advance:
            batches = self._batches(epoch, tally.step)
            timing = self.train_steps(batches, self.steps_per_epoch - tally.step, tally, advance)
        self.data_seconds += timing.data_seconds
        return self._gathered_means(tally)

    def train_steps(
        self,
        batches: Iterable[Any],
        n: int,
        tally: EpochProgress | None = None,
        advance: Callable[..., None] | None = None,
    ) -> StepTiming:
        """Run `n` optimisation steps on the first `n` of `batches`, each `(images, labels)` or
        `(images, labels, keys)` (fewer steps when they run out), with the loop's bookkeeping: the
        terms summed into `tally` (a fresh one by default), their means gathered every
        `spec.log_every` steps and after the n-th, for the progress display (`advance`) and the
        metrics log (when there is one). Nothing else is written, so this needs no evaluator, run
        directory or log (`kdkit bench` times it). A stop asked for by a signal while `fit` runs
        saves `last.pt` mid-epoch and raises `TrainingInterrupted`."""
        tally = EpochProgress() if tally is None else tally
        advance = advance or (lambda *_, **__: None)
        self.task.train()
        timing, samples, iterator = StepTiming(), 0, iter(batches)
        start = time.perf_counter()
        while timing.steps < n:
            wait = time.perf_counter()
            batch = next(iterator, None)
            timing.data_seconds += time.perf_counter() - wait
            if batch is None:
                break
            out = self.train_step(*batch)
            tally.add(out, len(batch[1]))
            samples += len(batch[1])
            timing.steps += 1
            if self.global_step % self.spec.log_every == 0 or timing.steps == n:
                self._log_terms(tally, samples / max(time.perf_counter() - start, 1e-9), advance)
            advance()
            if self.stop.requested and timing.steps < n:
                self._save_state(tally)
                self._interrupted(f"at step {tally.step}/{self.steps_per_epoch} of epoch {self.epoch + 1}")
        timing.seconds = time.perf_counter() - start
        return timing

    def _log_terms(self, tally: EpochProgress, rate: float, advance: Callable[..., None]) -> None:
        """The running means of the epoch's terms (a synchronisation point) on the progress display
        and, on rank 0, in the metrics log (every term) with the learning rate and images/s."""
        means = self._gathered_means(tally)
        rate *= distributed.world_size()
        advance(0, info=step_info(means, rate))
        if self.log is not None and distributed.is_main():
            self.log.write(
                {
                    "stage": self.stage,
                    "epoch": self.epoch + 1,
                    "step": self.global_step,
                    "lr": self.optimizer.param_groups[0]["lr"],
                    "img_per_s": rate,
                    **{f"train/{k}": v for k, v in means.items()},
                }
            )

    def _batches(self, epoch: int, skip: int) -> Iterator[Any]:
        """The epoch's batches from number `skip` on (a run resumed mid-epoch trained the others)."""
        if self.set_epoch is None:  # a plain iterable: load the trained batches and drop them
            return itertools.islice(iter(self.train_loader), skip, None)
        # kdkit's sampler leaves them out, so nothing is loaded for them.
        batch_size = getattr(self.train_loader, "batch_size", None) or 1
        self.set_epoch(epoch, skip * batch_size)
        return iter(self.train_loader)

    def _needs(self, method: str, *parts: str) -> None:
        """ValueError naming those of `parts` (evaluator, out_dir, log) that `method` needs but
        this Trainer was given as None."""
        missing = [name for name in parts if getattr(self, name) is None]
        if missing:
            raise ValueError(
                f"Trainer.{method} needs {', '.join(missing)} (got None); without them, use train_steps"
            )

    def _interrupted(self, where: str) -> None:
        """Stop after SIGINT/SIGTERM: `last.pt` was just saved."""
        raise TrainingInterrupted(
            f"[{self.stage}] stopped {where}; saved {self.out_dir / 'last.pt'}. "
            "Continue with the same command plus --resume (and --out pointing at this run).",
            self.stop.signum,
        )

    def train_step(
        self, images: torch.Tensor | Frames, labels: torch.Tensor, keys: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """One optimisation step on one batch; returns the task's outputs (loss terms and logits).
        `Frames` (augmentation finished on the device) are finished on the trainer's device."""
        images = device_images(images, self.device)
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

    def _gathered_means(self, tally: EpochProgress) -> dict[str, float]:
        """Sample-weighted means of the terms over every rank (the one synchronisation point)."""
        totals = distributed.all_sum(torch.cat([tally.sums, tally.sums.new_tensor([tally.seen])])).tolist()
        count = max(totals.pop(), 1)
        return self._check_finite({k: v / count for k, v in zip(tally.names, totals, strict=True)})

    def _check_finite(self, terms: dict[str, float]) -> dict[str, float]:
        """`terms`, or TrainingDiverged when one of them is NaN or infinite."""
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
        self._needs("evaluate", "evaluator")
        model = self.task.model
        predictions = {
            split: predict(model, loader, self.device, self.spec.amp, f"[{self.stage}] {split}")
            for split, loader in self.eval_loaders.items()
        }
        metrics = self.evaluator(predictions, None)
        self.last_metrics = metrics
        return metrics

    def _update_best(self, metrics: dict[str, float]) -> None:
        """Keep `model.pt` of the best epoch by the evaluator's monitor."""
        key = self.evaluator.monitor
        if key not in metrics:
            raise KeyError(f"evaluator monitor {key!r} not among the metrics {sorted(metrics)}")
        if self.best.improved_by(metrics[key], self.evaluator.mode):
            self.best = Best(key, metrics[key], self.epoch, metrics)
            self._save_model(metrics)

    def _update_best_on_test(self, metrics: dict[str, float]) -> None:
        """Record (never act on) the epoch a selection on the test split would keep."""
        key = getattr(self.evaluator, "optimistic_monitor", None)
        if key is None or key not in metrics:
            return
        best = self.best_on_test or Best(key)
        if best.improved_by(metrics[key], self.evaluator.mode):
            tested = {k: v for k, v in metrics.items() if k.startswith(key.split("/", 1)[0] + "/")}
            self.best_on_test = Best(key, metrics[key], self.epoch, tested)

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

    def _save_state(self, epoch_progress: EpochProgress | None = None) -> None:
        """`last.pt`: everything needed to continue exactly where training stopped (at the end of
        epoch `self.epoch`, or `epoch_progress.step` steps into the next one). The state is plain
        dicts, tensors and numbers (what `torch.load(weights_only=True)` reads back)."""
        if epoch_progress is not None:
            epoch_progress = replace(epoch_progress, sums=epoch_progress.sums.cpu())
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
                "best": asdict(self.best),
                "best_on_test": asdict(self.best_on_test) if self.best_on_test else {},
                "last_metrics": self.last_metrics,
                "train_seconds": self.train_seconds,
                "data_seconds": self.data_seconds,
                "epoch_progress": asdict(epoch_progress) if epoch_progress else None,
                **self.model_meta,
            },
            self.out_dir / "last.pt",
        )

    def _load_state(self, path: Path) -> None:
        """Continue from `last.pt` (also one written by an earlier kdkit: the same plain dicts)."""
        state = load_file(path)
        self.task.load_trainable_state_dict(state["trainable"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None and state["scheduler"]:
            self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        set_rng_state(state["rng"])
        self.epoch, self.global_step = state["epoch"], state["global_step"]
        self.best, self.last_metrics = Best(**state["best"]), state["last_metrics"]
        self.best_on_test = Best(**state["best_on_test"]) if state.get("best_on_test") else None
        self.train_seconds = state["train_seconds"]
        self.data_seconds = state.get("data_seconds", 0.0)
        progress_ = state.get("epoch_progress")
        self.epoch_progress = EpochProgress(**progress_) if progress_ else None
