"""Results on stdout, logs on stderr; pipes get whole tables; progress in logs without a terminal."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import tiny_supervised_task, tiny_train_spec, tiny_trainer
from rich.table import Table

from kdkit.cli import main
from kdkit.errors import EnvironmentSettingError
from kdkit.utils import runlog
from kdkit.utils.runlog import output, progress, progress_settings

TAPS = ["taps", "vit_tiny_patch16_224", "--img-size", "32", "--option", "depth=2", "--option", "num_heads=2"]


@pytest.mark.slow
def test_taps_can_be_grepped_from_a_pipe() -> None:
    """`kdkit taps MODEL | grep attn`: the attention paths with their shapes, nothing on stderr."""
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "FORCE_COLOR", "TTY_COMPATIBLE")}
    done = subprocess.run(
        [sys.executable, "-m", "kdkit", *TAPS],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    attn = [line for line in done.stdout.splitlines() if "attn" in line]
    assert any(re.search(r"blocks\.0\.attn\.qkv\s.*\(1, 5, 576\)", line) for line in attn), done.stdout
    assert len(attn) >= 2 * 4  # every block's attention and its parts
    assert "\x1b[" not in done.stdout  # no colour codes in a pipe
    assert "blocks.0" not in done.stderr


def test_long_rows_are_not_cut_in_a_pipe(capsys: pytest.CaptureFixture[str]) -> None:
    path = ".".join(f"stage_{i}.a_rather_long_module_name" for i in range(5))  # 150 characters
    table = Table()
    table.add_column("path")
    table.add_column("output shape")
    table.add_row(path, "(1, 196, 768)")
    output.print(table)
    captured = capsys.readouterr()
    assert any(path in line and "(1, 196, 768)" in line for line in captured.out.splitlines()), captured.out
    assert captured.err == ""


def test_plain_progress_lines_appear_mid_epoch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Without a terminal (a batch job's log) training says how far it is before the epoch ends."""
    monkeypatch.setenv("KDKIT_PROGRESS_STEPS", "1")
    tiny_trainer(tmp_path, tiny_supervised_task(), tiny_train_spec(epochs=1)).fit()
    err = capsys.readouterr().err
    lines = err.splitlines()
    end = next(i for i, line in enumerate(lines) if line.split()[:3] == ["[stage]", "epoch", "loss"])
    step = re.compile(r"^\[stage\] epoch 1/1: (\d)/3 steps \(\d+ %\), [\d.e+]+ steps/s, ETA \d+:\d\d:\d\d")
    steps = [line for line in lines[:end] if step.match(line)]
    assert [step.match(line)[1] for line in steps] == ["1", "2", "3"], err
    assert "loss=" in steps[-1] and "img/s" in steps[-1]  # with the latest logged terms
    assert re.search(r"^\[stage\] val: \d+/\d+ batches \(100 %\)", err, re.M)  # evaluation too


def test_plain_progress_every_n_steps_or_s_seconds(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for variable in ("KDKIT_PROGRESS_STEPS", "KDKIT_PROGRESS_SECONDS"):
        monkeypatch.delenv(variable, raising=False)

    def shown(total: int, completed: int = 0) -> list[str]:
        with progress(total, "job", unit="videos", completed=completed) as advance:
            for _ in range(total - completed):
                advance(info="x=1")
        return [line.split(":")[1].split("(")[0].strip() for line in capsys.readouterr().err.splitlines()]

    assert shown(8) == []  # over in less than QUIET_SECONDS: the summary line that follows says it all
    monkeypatch.setattr(runlog, "QUIET_SECONDS", 0.0)  # as if every step were slow
    assert shown(8) == ["2/8 videos", "4/8 videos", "6/8 videos", "8/8 videos"]  # each quarter
    assert shown(8, completed=5) == ["6/8 videos", "8/8 videos"]  # resumed: counted from 5
    monkeypatch.setenv("KDKIT_PROGRESS_STEPS", "3")
    assert shown(7) == ["3/7 videos", "6/7 videos", "7/7 videos"]
    monkeypatch.setenv("KDKIT_PROGRESS_SECONDS", "0")  # a line whenever 0 s have passed: each step
    assert len(shown(5)) == 5
    with progress(4, "hidden", show=False) as advance:
        advance(4)
    assert capsys.readouterr().err == ""


def test_a_terminal_gets_the_bar(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    bars: list[object] = []

    class Recorded(runlog.Progress):
        def __init__(self, *args: object, **kwargs: object) -> None:
            super().__init__(*args, **kwargs)
            bars.append(self)

    monkeypatch.setattr(runlog, "Progress", Recorded)
    monkeypatch.setenv("TTY_COMPATIBLE", "1")  # rich: the console is a terminal
    monkeypatch.setenv("KDKIT_PROGRESS_SECONDS", "0")
    with progress(4, "job") as advance:
        for _ in range(4):
            advance(info="x=1")
    assert len(bars) == 1 and bars[0].tasks[0].completed == 4
    assert "4/4 steps (100 %)" not in capsys.readouterr().err  # no plain lines on a terminal


@pytest.mark.parametrize(
    ("variable", "value"), [("KDKIT_PROGRESS_STEPS", "0"), ("KDKIT_PROGRESS_SECONDS", "soon")]
)
def test_bad_progress_settings_are_named(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], variable: str, value: str
) -> None:
    monkeypatch.setenv(variable, value)
    message = f"environment variable {variable}='{value}': expected a"
    with pytest.raises(EnvironmentSettingError, match=message):
        progress_settings()
    assert main(["plugins"]) == 2  # bad input, refused before the command runs
    err = capsys.readouterr().err
    assert f"error: {message}" in err and "Traceback" not in err


def test_results_go_to_stdout_and_errors_to_stderr(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([*TAPS]) == 0
    captured = capsys.readouterr()
    assert "blocks.1.attn" in captured.out and "blocks.1" not in captured.err
    assert main(["taps", "vit_tiny_patch16_22"]) == 2
    captured = capsys.readouterr()
    assert "unknown model" in captured.err and captured.out == ""
