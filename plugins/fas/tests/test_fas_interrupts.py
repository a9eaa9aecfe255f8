"""`kdkit fas prepare` and `kdkit fas synth` with two worker processes, in real subprocesses, stopped
by a signal after a random number of videos: exit status 128 + signal, one line with the command
that continues, no traceback; that command then finishes with exactly what an uninterrupted run
writes. A second writer of their output folder is refused naming the first, and a synth size that
cannot fit is refused before any work."""

from __future__ import annotations

import random
import signal
import sys
from pathlib import Path

import pytest
from fixtures import make_replay
from kdkit_fas.prepare import prepare
from kdkit_fas.synth import generate

from kdkit.cli import main

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "tests"))
from interrupting import (  # noqa: E402  (the core tests' helpers)
    Command,
    LockHolder,
    assert_one_continue_line,
    assert_refused_by_lock,
)

SIGNALS = [(signal.SIGINT, "group"), (signal.SIGTERM, "main"), (signal.SIGTERM, "group")]


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_prepare_interrupted_at_a_random_video_continues_to_the_same_frames(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = make_replay(tmp_path / "raw")  # 72 videos
    options = ["--frames-per-video", "2", "--size", "16", "--workers", "2", "--no-progress"]
    argv = ["fas", "prepare", "replay", "--root", "raw", "--out", "out", *options]
    rng = random.Random(15)
    signum, to = rng.choice(SIGNALS)
    videos = rng.randint(1, 30)
    command = Command(*argv, cwd=tmp_path)
    frames = tmp_path / "out" / "frames"
    command.wait_until(lambda: len(list(frames.glob("*/*/.done.json"))) >= videos, f"{videos} videos")
    command.send(signum, to=to)
    status, _, err = command.finish(timeout=30)
    assert status == 128 + signum, err
    assert_one_continue_line(err, " ".join(["kdkit", *argv]))
    assert "videos are prepared in" in err and not (tmp_path / "out" / "manifest.csv").exists()

    monkeypatch.chdir(tmp_path)
    assert main(argv) == 0
    prepare("replay", root, tmp_path / "ref", frames_per_video=2, size=16, workers=1, progress=False)
    assert _files(tmp_path / "out") == _files(tmp_path / "ref")
    assert not (tmp_path / ".out.lock").exists()


@pytest.mark.slow
def test_synth_interrupted_at_a_random_video_continues_to_the_same_set(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    argv = [
        "fas",
        "synth",
        "--out",
        "set",
        "--n-subjects",
        "8",
        "--frames",
        "2",
        "--size",
        "16",
        "--workers",
        "2",
    ]
    rng = random.Random(16)
    signum, to = rng.choice(SIGNALS)
    videos = rng.randint(1, 12)  # of 32
    command = Command(*argv, cwd=tmp_path)
    written = tmp_path / ".set.synth-partial" / "progress.jsonl"
    command.wait_until(
        lambda: written.exists() and written.read_text().count("\n") >= videos, f"{videos} videos"
    )
    command.send(signum, to=to)
    status, _, err = command.finish(timeout=30)
    assert status == 128 + signum, err
    assert_one_continue_line(err, " ".join(["kdkit", *argv]))
    assert not (tmp_path / "set").exists()  # the set appears complete or not at all

    monkeypatch.chdir(tmp_path)
    assert main(argv) == 0
    generate(tmp_path / "ref", n_subjects=8, frames=2, size=16, progress=False)
    assert _files(tmp_path / "set") == _files(tmp_path / "ref")
    assert not (tmp_path / ".set.synth-partial").exists() and not (tmp_path / ".set.lock").exists()


def test_a_second_writer_of_a_prepare_or_synth_folder_is_refused_naming_the_first(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = make_replay(tmp_path / "raw")
    out, synth_out = tmp_path / "out", tmp_path / "set"
    with LockHolder(out, synth_out) as holder:
        assert (
            main(["fas", "prepare", "replay", "--root", str(root), "--out", str(out), "--no-progress"]) == 2
        )
        assert_refused_by_lock(capsys.readouterr().err, out, holder)
        assert main(["fas", "synth", "--out", str(synth_out), "--n-subjects", "3", "--size", "16"]) == 2
        assert_refused_by_lock(capsys.readouterr().err, synth_out, holder)
    assert not out.exists() and not synth_out.exists()


def test_synth_refuses_a_size_that_cannot_fit_before_any_work(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["fas", "synth", "--out", str(tmp_path / "set"), "--size", "100000"]) == 2
    err = capsys.readouterr().err
    assert "synth: size 100000 needs about" in err and "the largest size that fits is" in err, err
    assert "Traceback" not in err and list(tmp_path.iterdir()) == []
