"""Tests for kdkit.distill.distiller: loss terms, a frozen teacher, checkpointed state, adapter choices."""

from __future__ import annotations

import math

import pytest
import timm
import torch
import torch.nn.functional as F
from conftest import tiny_vit

from kdkit.distill.distiller import Distiller
from kdkit.distill.pairs import layer_pairs, uniform_pairs
from kdkit.training.task import SupervisedTask

LABELS = torch.tensor([0, 3, 7, 9])


def make_distiller(adapter: str = "covariance", pairs=([1, 1], [2, 3]), **kwargs) -> Distiller:
    teacher = tiny_vit(embed_dim=64, depth=3, seed=1)
    student = tiny_vit(embed_dim=32, depth=2, seed=2)
    example = torch.randn(2, 1, 16, 16)
    pairs = layer_pairs(teacher, student, list(pairs))
    return Distiller(teacher, student, pairs, adapter=adapter, example_input=example, **kwargs)


def test_returns_every_term_and_the_student_logits(images: torch.Tensor) -> None:
    distiller = make_distiller()
    out = distiller(images, LABELS)
    assert {"loss", "ce", "kd", "feat", "feat.0", "feat.1", "logits"} <= out.keys()
    assert out["logits"].shape == (4, 10)
    assert all(out[k].ndim == 0 and math.isfinite(out[k].item()) for k in out if k != "logits")
    assert distiller.shapes == [((2, 32), (2, 64)), ((2, 32), (2, 64))]  # class tokens, both widths
    assert [p.student.path for p in distiller.pairs] == ["blocks.0", "blocks.1"]
    assert [p.teacher.path for p in distiller.pairs] == ["blocks.0", "blocks.2"]


def test_loss_composition(images: torch.Tensor) -> None:
    alpha, tau, beta = 0.6, 2.5, 0.8
    distiller = make_distiller(alpha=alpha, tau=tau, beta=beta)
    out = distiller(images, LABELS)
    with torch.no_grad():
        t_logits = distiller.teacher(images)
    s_logits = out["logits"].detach()
    ce = F.cross_entropy(s_logits, LABELS)
    kd = (
        F.kl_div(F.log_softmax(s_logits / tau, 1), F.softmax(t_logits / tau, 1), reduction="batchmean")
        * tau**2
    )
    torch.testing.assert_close(out["ce"].detach(), ce)
    torch.testing.assert_close(out["kd"].detach(), kd)
    torch.testing.assert_close(out["feat"], (out["feat.0"] + out["feat.1"]) / 2)
    expected = (1 - alpha) * out["ce"] + alpha * out["kd"] + beta * out["feat"]
    torch.testing.assert_close(out["loss"], expected)


def test_teacher_is_frozen_and_only_the_student_learns(images: torch.Tensor) -> None:
    distiller = make_distiller()
    distiller.train()
    assert distiller.student.training
    assert not any(m.training for m in distiller.teacher.modules())
    out = distiller(images, LABELS)
    out["loss"].backward()
    assert all(p.grad is None and not p.requires_grad for p in distiller.teacher.parameters())
    student_grads = [p.grad for p in distiller.student.parameters()]
    assert all(g is not None for g in student_grads)
    assert any(g.abs().sum() > 0 for g in student_grads)
    # The feature term alone reaches the student's early blocks (through the taps).
    distiller.zero_grad()
    distiller(images, LABELS)["feat.0"].backward()
    assert distiller.student.blocks[0].mlp.fc2.weight.grad.abs().sum() > 0
    assert distiller.student.blocks[1].mlp.fc2.weight.grad is None  # not on the path to block 1's tap
    distiller.eval()
    assert not distiller.student.training and not distiller.teacher.training


def test_trainable_state_dict_has_no_teacher(images: torch.Tensor) -> None:
    distiller = make_distiller(adapter="projection")
    state = distiller.trainable_state_dict()
    assert state and not any(k.startswith("teacher.") for k in state)
    assert {k.split(".")[0] for k in state} == {"student", "adapters"}
    assert any(k.startswith("adapters.1.") for k in state)
    assert distiller.extra_parameters() == 2 * (32 * 64 + 64)
    other = make_distiller(adapter="projection")
    other.load_trainable_state_dict(state)
    assert all(torch.equal(v, other.trainable_state_dict()[k]) for k, v in state.items())


def test_class_count_mismatch_is_an_error() -> None:
    teacher = tiny_vit(embed_dim=64, num_classes=5)
    student = tiny_vit(embed_dim=32)
    with pytest.raises(ValueError, match="teacher outputs 5, student 10"):
        Distiller(
            teacher, student, layer_pairs(teacher, student, [[1, 1]]), example_input=torch.zeros(2, 1, 16, 16)
        )


def test_identity_adapter_with_different_widths_names_both() -> None:
    with pytest.raises(ValueError) as info:
        make_distiller(adapter="identity")
    message = str(info.value)
    assert "pairs[0]: student blocks.0" in message and "32" in message and "64" in message
    assert "student_dim=32" in message and "teacher_dim=64" in message


def test_identity_adapter_with_equal_widths(images: torch.Tensor) -> None:
    teacher, student = tiny_vit(embed_dim=32, depth=3, seed=1), tiny_vit(embed_dim=32, seed=2)
    distiller = Distiller(
        teacher,
        student,
        layer_pairs(teacher, student, [[2, 3]]),
        adapter="identity",
        example_input=images[:2],
    )
    assert distiller.extra_parameters() == 0
    out = distiller(images, LABELS)
    assert out["feat"].item() > 0 and distiller.shapes == [((2, 32), (2, 32))]


def test_adapter_none_gives_no_feature_term(images: torch.Tensor) -> None:
    distiller = make_distiller(adapter="none")
    out = distiller(images, LABELS)
    assert "feat" not in out and not any(k.startswith("feat.") for k in out)
    assert len(distiller.adapters) == 0 and distiller.pairs == []
    torch.testing.assert_close(out["loss"], 0.3 * out["ce"] + 0.7 * out["kd"])


def test_alpha_zero_is_plain_cross_entropy_plus_features(images: torch.Tensor) -> None:
    out = make_distiller(alpha=0.0, beta=0.0)(images, LABELS)
    assert "kd" not in out
    torch.testing.assert_close(out["loss"], out["ce"])


def test_invalid_weights_are_rejected() -> None:
    with pytest.raises(ValueError, match="alpha=1.5"):
        make_distiller(alpha=1.5)
    with pytest.raises(ValueError, match="tau=0"):
        make_distiller(tau=0)


def test_supervised_task(images: torch.Tensor) -> None:
    task = SupervisedTask(tiny_vit(), label_smoothing=0.1)
    out = task(images, LABELS)
    torch.testing.assert_close(out["loss"], F.cross_entropy(out["logits"], LABELS, label_smoothing=0.1))
    assert task.trainable_state_dict().keys() == {f"model.{k}" for k in task.model.state_dict()}


def test_paper_widths_vit_large_to_vit_base() -> None:
    """KDFAS's real widths (1024 → 768) with a tiny depth: the covariance adapter bridges them."""
    torch.manual_seed(0)
    options = {"img_size": 32, "patch_size": 16, "depth": 2, "num_classes": 2}
    teacher = timm.create_model("vit_large_patch16_224", **options)
    student = timm.create_model("vit_base_patch16_224", **options)
    images = torch.randn(2, 3, 32, 32)
    pairs = layer_pairs(teacher, student, [[1, 1], [2, 2]])
    distiller = Distiller(teacher, student, pairs, adapter="covariance", example_input=images)
    assert distiller.shapes == [((2, 768), (2, 1024))] * 2
    assert distiller.extra_parameters() == 0  # parameter-free
    out = distiller(images, torch.tensor([0, 1]))
    out["loss"].backward()
    assert math.isfinite(out["loss"].item()) and out["feat"].item() > 0
    assert student.blocks[0].attn.qkv.weight.grad is not None
    distiller.close()


def test_uniform_pairs_spread_over_both_depths() -> None:
    assert uniform_pairs(12, 24, 4) == [[3, 6], [6, 12], [9, 18], [12, 24]]
    assert uniform_pairs(12, 12, 3) == [[4, 4], [8, 8], [12, 12]]
    with pytest.raises(ValueError, match="uniform:5"):
        uniform_pairs(4, 8, 5)
    pairs = layer_pairs(tiny_vit(embed_dim=48, depth=4), tiny_vit(embed_dim=32, depth=2), "uniform:2")
    assert [(p.student.path, p.teacher.path) for p in pairs] == [
        ("blocks.0", "blocks.1"),
        ("blocks.1", "blocks.3"),
    ]
