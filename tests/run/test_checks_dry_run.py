"""`kdkit validate` (and `run`, before any work) dry-runs a training step of every distill stage on a
batch of its real training data (issue 26): what would fail at step 1 fails before the first stage."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from conftest import tiny_recipe_dict

from kdkit.cli import main
from kdkit.registry import LOGIT_LOSSES


def class_weighted_kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    tau: float,
    *,
    class_weights: Sequence[float] = (1.0, 1.0),
) -> torch.Tensor:
    """A plugin's KL with a weight per class: its options' trial call (3 classes) passes, but
    weights for 3 classes do not broadcast over the digits' 10."""
    p_teacher = F.softmax(teacher_logits / tau, dim=-1)
    log_ratio = p_teacher.log() - F.log_softmax(student_logits / tau, dim=-1)
    return (torch.tensor(class_weights) * p_teacher * log_ratio).sum(-1).mean() * tau**2


def test_a_loss_that_fails_on_the_real_logits_fails_before_any_work(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(LOGIT_LOSSES._entries, "class_weighted_kl", class_weighted_kl)
    data = tiny_recipe_dict()
    data["distill"].update(logit_loss="class_weighted_kl", logit_options={"class_weights": [1.0, 2.0, 1.0]})
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    out = tmp_path / "run"
    assert main(["run", str(path), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "pipeline.student_kd.distill: a training step on 2 of the stage's training images fails" in err
    assert "RuntimeError" in err and "(3) must match" in err and "Traceback" not in err
    assert not out.exists()  # refused before the teacher stage trained
