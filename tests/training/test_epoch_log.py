"""The epoch log: one line per epoch under a header, columns aligned; every term in metrics.jsonl."""

from __future__ import annotations

import importlib
import json
import re
from pathlib import Path

import pytest
import torch
from conftest import tiny_distill_task, tiny_train_spec, tiny_trainer

from kdkit.training import display
from kdkit.training.display import EPOCH_LINE_WIDTH, EpochPrinter, epoch_lines, step_info
from kdkit.utils.runlog import AlignedLines, Column


def right_edges(line: str) -> list[int]:
    """Where each space-separated cell of a line ends."""
    return [m.end() for m in re.finditer(r"\S+", line)]


def test_one_aligned_line_per_epoch_and_every_term_in_metrics_jsonl(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tiny_trainer(tmp_path, tiny_distill_task(), tiny_train_spec(epochs=3, eval_every=2)).fit()
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("[stage] ")]
    headers = [line for line in lines if line.split()[1] == "epoch" and "loss" in line]
    epochs = [line for line in lines if re.match(r"\[stage\] +\d/3 ", line)]
    assert len(headers) == 1 and lines.index(headers[0]) < lines.index(epochs[0])
    assert headers[0].split() == ["[stage]", "epoch", "loss", "ce", "kd", "feat", "val/accuracy", "lr", "sec"]
    assert [line.split()[1] for line in epochs] == ["1/3", "2/3", "3/3"]
    assert all(right_edges(line) == right_edges(headers[0]) for line in epochs), "\n".join(lines)
    assert epochs[0].split()[6] == "-"  # epoch 1 was not evaluated (eval_every 2)

    records = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    ends = [r for r in records if "lr" not in r]  # the epoch records
    assert [r["epoch"] for r in ends] == [1, 2, 3]
    terms = {"train/loss", "train/ce", "train/kd", "train/feat", "train/feat.0", "train/feat.1"}
    assert all(terms <= r.keys() for r in ends) and "val/loss" in ends[-1]
    shown = dict(zip(headers[0].split()[1:], epochs[-1].split()[1:], strict=True))
    assert float(shown["loss"]) == pytest.approx(ends[-1]["train/loss"], rel=1e-3)
    assert float(shown["val/accuracy"]) == pytest.approx(ends[-1]["val/accuracy"], rel=1e-3)


@pytest.mark.parametrize(("epochs", "monitor"), [(40, "val/accuracy"), (30, "val/eer")])
def test_the_digits_and_fas_demo_lines_fit_in_100_columns(epochs: int, monitor: str) -> None:
    """The worst case of recipes/digits-kd.yaml and recipes/kdfas-demo.yaml (their longest stage
    name, a distiller's terms, their monitor), with extreme values: every column, within the width."""
    stage = "student_alone"
    out = tiny_distill_task()(torch.zeros(2, 1, 16, 16), torch.zeros(2, dtype=torch.long))
    lines = epoch_lines(stage, epochs, [k for k in out if k != "logits"], [monitor])
    header = lines.header()
    assert header.split() == [f"[{stage}]", "epoch", "loss", "ce", "kd", "feat", monitor, "lr", "sec"]
    big = {"epoch": f"{epochs}/{epochs}", "loss": 12345.678, "kd": 1.5e-7, monitor: 0.12345, "lr": 1e-3}
    line = lines.line({**big, "ce": 2.3, "feat": 0.25, "sec": 98765.4})
    assert len(header) <= EPOCH_LINE_WIDTH and right_edges(line) == right_edges(header), f"{header}\n{line}"


def test_columns_that_do_not_fit_are_dropped_least_important_first() -> None:
    columns = [
        Column("epoch", spec="", width=3, rank=0),
        Column("loss", rank=1),
        Column("ce", rank=3),
        Column("kd", rank=3),
        Column("val/eer", rank=2),
        Column("lr", spec=".2e", width=8, rank=5),
        Column("sec", spec=".1f", width=7, rank=4),
    ]
    values = {"epoch": "1/9", "loss": 1.0, "ce": 0.5, "kd": 0.25, "val/eer": 0.1, "lr": 1e-3, "sec": 3.0}
    full = AlignedLines("[s]", columns, 200)
    assert len(full.line(values)) == len(full.header()) < 200
    kept = {w: AlignedLines("[s]", columns, w).header().split()[1:] for w in (200, 60, 45, 30, 10)}
    assert kept == {
        200: ["epoch", "loss", "ce", "kd", "val/eer", "lr", "sec"],
        60: ["epoch", "loss", "ce", "kd", "val/eer", "sec"],
        45: ["epoch", "loss", "ce", "val/eer"],
        30: ["epoch", "loss", "val/eer"],
        10: ["epoch"],  # the epoch always stays
    }
    narrow = AlignedLines("[s]", columns, 45)
    assert len(narrow.header()) <= 45 and right_edges(narrow.line(values)) == right_edges(narrow.header())


def test_the_epoch_printer_prints_a_header_then_a_line_per_epoch(capsys: pytest.CaptureFixture[str]) -> None:
    printer = EpochPrinter("s", 12, "val/accuracy")
    record = {"stage": "s", "epoch": 3, "step": 30, "train/loss": 0.5, "train/feat.0": 9.0}
    printer.print(record, lr=1e-3, seconds=2.5)
    printer.print({**record, "epoch": 4, "val/accuracy": 0.75}, lr=5e-4, seconds=2.0)
    header, first, second = capsys.readouterr().err.splitlines()
    assert header.split() == ["[s]", "epoch", "loss", "val/accuracy", "lr", "sec"]
    assert first.split() == ["[s]", "3/12", "0.5000", "-", "1.00e-03", "2.5"]
    assert second.split() == ["[s]", "4/12", "0.5000", "0.7500", "5.00e-04", "2.0"]


def test_the_progress_bar_shows_the_main_terms_and_a_readable_rate() -> None:
    means = {"ce": 0.5, "loss": 0.69314, "feat.0": 1.0, "feat": 2.0}
    assert step_info(means, 0.4213) == "loss=0.693 ce=0.500 feat=2.000 0.42 img/s"


def test_the_display_lives_apart_from_the_loop_and_keeps_its_0_2_names() -> None:
    """kdkit.training.trainer is the loop; the epoch line's names still import from kdkit.trainer."""
    from kdkit.training import trainer

    path_0_2 = importlib.import_module("kdkit.trainer")
    for name in ("EPOCH_LINE_WIDTH", "epoch_lines", "main_terms", "rate_text"):
        assert getattr(path_0_2, name) is getattr(display, name)
        assert name not in vars(trainer)
