"""Interrupted and concurrent multi-process commands, in real subprocesses: `kdkit ablate` stopped by
a worker's death and by a signal at a random moment exits 128 + signal within seconds with one line
that says how to continue (the same command), and that command finishes the ablation; a second
writer of a run or ablation folder is refused, naming the first."""

from __future__ import annotations

import json
import random
import signal
import time
from pathlib import Path

import pytest
import yaml
from conftest import small_ablation_recipe_dict as small_recipe_dict
from interrupting import Command, LockHolder, assert_one_continue_line, assert_refused_by_lock

from kdkit.cli import main

GRID = ["--vary", "distill.adapter=covariance,projection", "--seeds", "0", "--no-baseline", "--jobs", "2"]
RUNS = ["adapter-covariance__seed0", "adapter-projection__seed0"]


@pytest.fixture
def small_recipe(tmp_path: Path) -> Path:
    """`conftest.small_ablation_recipe_dict()` written to a file."""
    data = small_recipe_dict()
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="finds the worker processes in /proc")
def test_ablate_stops_cleanly_when_a_worker_dies_or_at_a_random_signal_and_the_same_command_finishes(
    small_recipe: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    argv = ["ablate", small_recipe.name, *GRID, "--out", "abl"]
    command = " ".join(["kdkit", *argv])

    # A worker of the runs (the teacher is trained first, in a job of its own) gets SIGTERM, as from
    # `kill` or a scheduler: the others are stopped too, instead of the parent waiting for ever.
    first = Command(*argv, cwd=tmp_path)
    first.wait_for("[ablate] train stages for")
    first.send(signal.SIGTERM, to="worker")
    status, _, err = first.finish(timeout=30)
    assert status == 128 + signal.SIGTERM, err
    assert_one_continue_line(err, command)
    assert "its worker process" in err and "--resume" not in err  # ablate has no --resume

    # The same command again, stopped at a random moment of its two runs by SIGINT to the process
    # group (a terminal's Ctrl-C) or SIGTERM to the main process.
    rng = random.Random(15)
    signum, to = rng.choice([(signal.SIGINT, "group"), (signal.SIGTERM, "main")])
    second = Command(*argv, cwd=tmp_path)
    second.wait_until(lambda: len(second.workers()) == 2, "two run processes")
    time.sleep(rng.uniform(0, 1.5))  # the runs take longer than that (their processes start in seconds)
    second.send(signum, to=to)
    status, _, err = second.finish(timeout=30)
    assert status == 128 + signum, err
    assert_one_continue_line(err, command)
    assert not (tmp_path / "abl" / "ablation.csv").exists()

    monkeypatch.chdir(tmp_path)  # the same command once more, here (it spawns its own workers)
    assert main(argv) == 0
    abl = tmp_path / "abl"
    assert sorted(p.name for p in (abl / "runs").iterdir()) == RUNS
    assert not list((abl / "partial").iterdir())  # every run was renamed into runs/ when complete
    for run in RUNS:
        summary = json.loads((abl / "runs" / run / "summary.json").read_text())
        assert set(summary) == {"teacher", "student_kd", "test"}
        assert summary["teacher"]["cache"]["reused"]  # trained once, by the first command
    assert (abl / "ablation.csv").exists() and not (tmp_path / ".abl.lock").exists()


def test_a_second_writer_of_a_run_or_ablation_folder_is_refused_naming_the_first(
    small_recipe: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run, abl = tmp_path / "run", tmp_path / "abl"
    with LockHolder(run, abl) as holder:
        assert main(["run", str(small_recipe), "--out", str(run)]) == 2
        assert_refused_by_lock(capsys.readouterr().err, run, holder)
        assert main(["ablate", str(small_recipe), *GRID, "--out", str(abl)]) == 2
        assert_refused_by_lock(capsys.readouterr().err, abl, holder)
    assert not run.exists() and not abl.exists()  # refused before anything was written
