"""Crash safety of `kdkit run`, in real subprocesses: SIGKILL mid-epoch then `--resume`, SIGINT/SIGTERM
saving a mid-epoch checkpoint, and output directories that cannot hold the run.

The signal is sent by the process to itself from inside a training step (a patched
`Trainer.train_step`, installed by the harness below before `kdkit.cli.main` runs), so it lands at an
exact step every time, with nothing timed.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from conftest import tiny_recipe_dict

from kdkit.cli import main
from kdkit.utils.checkpoint import OutputDirError, check_output_dir, load_file

# Runs `kdkit.cli.main(argv)`; in stage STAGE, after training step AT, sends SIGNAL to itself.
HARNESS = """
import os, signal, sys
from kdkit.training.trainer import Trainer
stage, at, sig, argv = sys.argv[1], int(sys.argv[2]), getattr(signal, sys.argv[3]), sys.argv[4:]
step = Trainer.train_step
def train_step(self, *args, **kwargs):
    out = step(self, *args, **kwargs)
    if self.stage == stage and self.global_step == at:
        os.kill(os.getpid(), sig)
    return out
Trainer.train_step = train_step
from kdkit.cli import main
sys.exit(main(argv))
"""

STEPS = 4  # per epoch; 3 epochs per stage


@pytest.fixture(scope="module")
def recipe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """teacher → student_kd → test, 3 epochs of 4 steps each (the teacher-output cache on)."""
    data = tiny_recipe_dict()
    data["train"].update(epochs=3, max_steps_per_epoch=STEPS, log_every=1)
    data["pipeline"] = [
        {"name": "teacher", "do": "train", "model": "teacher"},
        {"name": "student_kd", "do": "distill"},
        {"name": "test", "do": "evaluate", "runs": ["teacher", "student_kd"], "split": "test"},
    ]
    path = tmp_path_factory.mktemp("crash") / "tiny.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def kdkit(*argv: str | Path, signal_at: tuple[str, int, str] | None = None) -> subprocess.CompletedProcess:
    """`kdkit ARGV` in a fresh process (one thread, like the tests), optionally signalled at a step."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200"}
    if signal_at is None:
        command = [sys.executable, "-m", "kdkit", *map(str, argv)]
    else:
        stage, at, name = signal_at
        command = [sys.executable, "-c", HARNESS, stage, str(at), name, *map(str, argv)]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)


def weights(run: Path) -> dict[str, dict[str, torch.Tensor]]:
    """Every trained tensor of a run: both stages' final states (model and optimizer) and best models."""
    out = {}
    for stage in ("teacher", "student_kd"):
        last = load_file(run / stage / "last.pt")
        out[f"{stage}/last"] = {
            **last["trainable"],
            **{f"exp_avg.{k}": v["exp_avg"] for k, v in last["optimizer"]["state"].items()},
        }
        out[f"{stage}/model"] = load_file(run / stage / "model.pt")["model"]
    return out


def assert_same_weights(a: dict[str, dict[str, torch.Tensor]], b: dict[str, dict[str, torch.Tensor]]) -> None:
    assert a.keys() == b.keys()
    for part in a:
        assert a[part].keys() == b[part].keys()
        for name, tensor in a[part].items():
            assert torch.equal(tensor, b[part][name]), f"{part}: {name} differs"


@pytest.fixture(scope="module")
def reference(recipe: Path) -> dict[str, dict[str, torch.Tensor]]:
    """The weights of an uninterrupted run."""
    done = kdkit("run", recipe, "--out", recipe.parent / "reference")
    assert done.returncode == 0, done.stderr
    return weights(recipe.parent / "reference")


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_ends_with_the_uninterrupted_weights(
    recipe: Path, tmp_path: Path, reference: dict[str, dict[str, torch.Tensor]]
) -> None:
    run = tmp_path / "killed"
    # Killed at step 6 of the student: 2 steps into its second epoch; the teacher stage is complete.
    killed = kdkit("run", recipe, "--out", run, signal_at=("student_kd", STEPS + 2, "SIGKILL"))
    assert killed.returncode == -signal.SIGKILL
    assert (run / "teacher" / "done.json").exists() and not (run / "student_kd" / "done.json").exists()
    assert load_file(run / "student_kd" / "last.pt")["epoch"] == 1  # the last complete checkpoint
    assert not list(run.rglob("*.tmp"))  # no half-written file left behind

    resumed = kdkit("run", recipe, "--out", run, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "[teacher] complete, skipped (resume)" in resumed.stderr + resumed.stdout
    assert "[student_kd] resumed from" in resumed.stderr + resumed.stdout
    assert_same_weights(weights(run), reference)


@pytest.mark.slow
@pytest.mark.parametrize(("name", "status"), [("SIGINT", 130), ("SIGTERM", 143)])
def test_sigint_or_sigterm_saves_mid_epoch_and_resume_continues_exactly(
    recipe: Path, tmp_path: Path, reference: dict[str, dict[str, torch.Tensor]], name: str, status: int
) -> None:
    run = tmp_path / "stopped"
    stopped = kdkit("run", recipe, "--out", run, signal_at=("teacher", STEPS + 1, name))
    output = stopped.stdout + stopped.stderr
    assert stopped.returncode == status, output
    assert f"[teacher] stopped at step 1/{STEPS} of epoch 2; saved {run / 'teacher' / 'last.pt'}" in output
    assert "--resume" in output and "Traceback" not in output
    state = load_file(run / "teacher" / "last.pt")
    assert (state["epoch"], state["global_step"], state["epoch_progress"]["step"]) == (1, STEPS + 1, 1)
    assert not (run / "student_kd").exists()  # stopped means stopped: no later stage started

    resumed = kdkit("run", recipe, "--out", run, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "[teacher] resumed from" in resumed.stdout + resumed.stderr
    assert "at step 1 of epoch 2" in resumed.stdout + resumed.stderr
    assert_same_weights(weights(run), reference)


def test_a_signal_in_the_last_epoch_still_stops_before_the_next_stage(
    recipe: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import kdkit.training.trainer

    step = kdkit.training.trainer.Trainer.train_step

    def train_step(self: Any, *args: Any, **kwargs: Any) -> Any:
        out = step(self, *args, **kwargs)
        if self.stage == "teacher" and self.global_step == 3 * STEPS:  # its very last step
            os.kill(os.getpid(), signal.SIGINT)
        return out

    monkeypatch.setattr(kdkit.training.trainer.Trainer, "train_step", train_step)
    run = tmp_path / "run"
    assert main(["run", str(recipe), "--out", str(run)]) == 130
    assert "[teacher] stopped after epoch 3" in capsys.readouterr().err
    assert not (run / "student_kd").exists() and not (run / "teacher" / "done.json").exists()
    monkeypatch.setattr(kdkit.training.trainer.Trainer, "train_step", step)
    assert main(["run", str(recipe), "--out", str(run), "--resume"]) == 0
    assert (run / "test" / "done.json").exists()


def test_resumed_epoch_leaves_out_exactly_the_trained_samples() -> None:
    from kdkit.data.samplers import EpochSampler

    sampler = EpochSampler(10, seed=3)
    sampler.set_epoch(2)
    full = list(sampler)
    sampler.set_epoch(2, skip=4)
    assert list(sampler) == full[4:]


# ------------------------------------------------------------------------------------ output directory
def test_unwritable_output_directory_is_refused_before_any_work(
    tiny_recipe: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access
    # What access(2) answers for a directory without write permission or on a read-only mount
    # (chmod cannot show it: the tests may run as root, who writes anywhere).
    monkeypatch.setattr(os, "access", lambda path, mode: Path(path) != locked and real_access(path, mode))
    import kdkit.run.checks

    monkeypatch.setattr(kdkit.run.checks, "check_recipe", lambda *a, **k: pytest.fail("checked before --out"))
    assert main(["run", str(tiny_recipe), "--out", str(locked / "run")]) == 2
    err = capsys.readouterr().err
    assert f"--out {locked / 'run'}: {locked} is not writable" in err and "Traceback" not in err
    assert not (locked / "run").exists()


def test_output_directory_checks_name_the_path_and_create_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    afile = tmp_path / "a-file"
    afile.write_text("x")
    with pytest.raises(OutputDirError, match=f"--out {afile / 'run'}: {afile} is a file"):
        check_output_dir(afile / "run")
    monkeypatch.setattr(os, "access", lambda *_: False)  # what a read-only file system answers
    with pytest.raises(OutputDirError, match="is not writable"):
        check_output_dir(tmp_path / "new" / "run")
    monkeypatch.undo()
    free = shutil.disk_usage(tmp_path).free
    with pytest.raises(OutputDirError, match=r"MiB free on its file system, the run's checkpoints need"):
        check_output_dir(tmp_path / "new" / "run", need_bytes=free * 2)
    check_output_dir(tmp_path / "new" / "run", need_bytes=1)
    assert not (tmp_path / "new").exists()


def test_full_disk_is_refused_before_training_with_the_size_needed(
    tiny_recipe: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda _: usage._replace(free=1000))
    out = tmp_path / "run"
    assert main(["run", str(tiny_recipe), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"--out {out}: only 0.0 MiB free" in err
    assert not out.exists()


def test_disk_full_while_writing_names_the_file_and_exits_1(
    tiny_recipe: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import kdkit.training.trainer

    def no_space(obj: Any, path: str | Path) -> None:
        raise OSError(28, "No space left on device", str(path))

    monkeypatch.setattr(kdkit.training.trainer, "atomic_save", no_space)
    assert main(["run", str(tiny_recipe), "--out", str(tmp_path / "run")]) == 1
    err = capsys.readouterr().err
    assert "No space left on device" in err and "model.pt" in err and "Traceback" not in err
