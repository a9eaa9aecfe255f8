"""Tests for kdkit.losses, checked against torchdistill and direct formulas."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torchdistill.losses.mid_level import KDLoss

from kdkit.losses import FEATURE_CRITERIA, build_feature_criterion, cross_entropy, kd_loss
from kdkit.registry import RegistryError

GEN = torch.Generator().manual_seed(0)


def randn(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=GEN)


@pytest.mark.parametrize("temperature", [1.0, 3.0, 4.0])
def test_kd_loss_matches_torchdistill_kdloss_with_alpha(temperature):
    s, t = randn(8, 5), randn(8, 5)
    labels = torch.randint(0, 5, (8,), generator=GEN)
    # With alpha > 0, KDLoss returns alpha*CE + beta*T^2*KL; remove the CE part to isolate T^2*KL.
    kd = KDLoss("s", "output", "t", "output", temperature=temperature, alpha=0.5, beta=1.0)
    theirs = kd({"s": {"output": s}}, {"t": {"output": t}}, labels) - 0.5 * F.cross_entropy(s, labels)
    torch.testing.assert_close(kd_loss(s, t, temperature), theirs)


def test_kd_loss_formula_and_scale():
    s, t = randn(4, 3), randn(4, 3)
    tau = 2.0
    p_t = F.softmax(t / tau, dim=1)
    expected = (p_t * (p_t.log() - F.log_softmax(s / tau, dim=1))).sum(1).mean() * tau**2
    torch.testing.assert_close(kd_loss(s, t, tau), expected)
    assert kd_loss(t, t, tau).abs() < 1e-6


def test_kd_loss_shape_error():
    with pytest.raises(ValueError, match=r"\(4, 3\) vs \(4, 5\)"):
        kd_loss(randn(4, 3), randn(4, 5), 1.0)


def test_cross_entropy_label_smoothing():
    logits, labels = randn(4, 3), torch.tensor([0, 1, 2, 0])
    torch.testing.assert_close(cross_entropy(logits, labels), F.cross_entropy(logits, labels))
    smoothed = cross_entropy(logits, labels, label_smoothing=0.1)
    expected = 0.9 * F.cross_entropy(logits, labels) + 0.1 * (-F.log_softmax(logits, 1).mean(1)).mean()
    torch.testing.assert_close(smoothed, expected)


def test_feature_criteria_values():
    a, b = randn(3, 4, 6), randn(3, 4, 6)
    torch.testing.assert_close(build_feature_criterion("mse")(a, b), ((a - b) ** 2).mean())
    diff = (a - b).abs()
    huber = torch.where(diff < 1, 0.5 * diff**2, diff - 0.5).mean()
    torch.testing.assert_close(build_feature_criterion("smooth_l1")(a, b), huber)
    cos = (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))
    torch.testing.assert_close(build_feature_criterion("cosine")(a, b), (1 - cos).mean())
    assert build_feature_criterion("cosine")(a, 2 * a).abs() < 1e-6


def test_feature_criteria_registry_and_errors():
    assert FEATURE_CRITERIA.names() == ["cosine", "mse", "smooth_l1"]
    with pytest.raises(RegistryError, match="Registered feature criterions: cosine, mse, smooth_l1"):
        build_feature_criterion("l2")
    with pytest.raises(ValueError, match="shapes differ"):
        build_feature_criterion("mse")(randn(3, 4), randn(1, 4))


def test_a_plugin_criterion_is_usable_by_name_in_a_recipe(tmp_path, capsys) -> None:
    """The criterion registry is open: what a plugin adds, a recipe can name (the schema used to
    accept only the three built-in names)."""
    import yaml
    from conftest import tiny_recipe_dict

    from kdkit.cli import main
    from kdkit.registry import Registries

    name = "tests_l1"
    if name not in FEATURE_CRITERIA:
        Registries().feature_criteria.add(name, lambda a, b: (a - b).abs().mean())
    data = tiny_recipe_dict()
    data["distill"]["criterion"] = name
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(data))
    assert main(["validate", str(path)]) == 0
    assert name in capsys.readouterr().out  # the tap table shows the criterion
    data["distill"]["criterion"] = "tests_l2"
    path.write_text(yaml.safe_dump(data))
    assert main(["validate", str(path)]) == 2
    assert "distill.criterion: unknown feature criterion 'tests_l2'" in capsys.readouterr().err
