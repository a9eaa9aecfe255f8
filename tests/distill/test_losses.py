"""Tests for kdkit.distill.losses, checked against torchdistill and direct formulas."""

from __future__ import annotations

import functools
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torchdistill.losses.mid_level import KDLoss

from kdkit.distill.losses import (
    FEATURE_CRITERIA,
    OptionError,
    build_feature_criterion,
    criterion_same_shape,
    cross_entropy,
    kd_loss,
    resolve_feature_criterion,
)
from kdkit.registry import Registries, RegistryError

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
    assert FEATURE_CRITERIA.names() == ["at", "cosine", "mse", "rkd", "smooth_l1"]
    with pytest.raises(RegistryError, match="Registered feature criteria: at, cosine, mse, rkd, smooth_l1"):
        build_feature_criterion("l2")
    with pytest.raises(ValueError, match="shapes differ"):
        build_feature_criterion("mse")(randn(3, 4), randn(1, 4))


def test_resolve_feature_criterion_binds_options() -> None:
    """Options reach the function: smooth_l1's beta moves the quadratic/linear switch, cosine's eps
    bounds a norm; without options the registered function itself comes back."""
    a, b = randn(3, 4, 6), 2 * randn(3, 4, 6)
    diff = (a - b).abs()
    huber = torch.where(diff < 0.5, 0.5 * diff**2 / 0.5, diff - 0.25).mean()
    torch.testing.assert_close(resolve_feature_criterion("smooth_l1", {"beta": 0.5})(a, b), huber)
    torch.testing.assert_close(resolve_feature_criterion("smooth_l1", {"beta": 0.0})(a, b), diff.mean())
    assert not torch.allclose(resolve_feature_criterion("smooth_l1")(a, b), huber)
    small = torch.full((2, 4), 1e-3)
    # norms 2e-3 below eps = 1: cos = a·b / eps² = 4e-6, so the loss is ~1, not 0
    torch.testing.assert_close(
        resolve_feature_criterion("cosine", {"eps": 1.0})(small, small), torch.tensor(1 - 4e-6)
    )
    assert resolve_feature_criterion("cosine")(small, small).abs() < 1e-6
    assert resolve_feature_criterion("mse") is FEATURE_CRITERIA.get("mse") is build_feature_criterion("mse")


@pytest.mark.parametrize(
    ("name", "options", "error", "words"),
    [
        ("l2", {}, RegistryError, ["unknown feature criterion 'l2'", "at, cosine, mse, rkd, smooth_l1"]),
        (
            "smooth_l1",
            {"bta": 2.0},
            OptionError,
            [
                "bta: unknown option of feature criterion 'smooth_l1'",
                "Did you mean 'beta'",
                "Its options: beta",
            ],
        ),
        ("mse", {"beta": 1.0}, OptionError, ["beta: unknown option of feature criterion 'mse'", "(none)"]),
        ("smooth_l1", {"beta": -1.0}, OptionError, ["beta: expected a number >= 0", "'smooth_l1'", "-1.0"]),
        ("smooth_l1", {"beta": True}, OptionError, ["beta: expected a number >= 0", "True"]),
        ("cosine", {"eps": 0}, OptionError, ["eps: expected a number > 0 for feature criterion 'cosine'"]),
    ],
)
def test_resolve_feature_criterion_names_the_unknown_option_or_bad_value(
    name: str, options: dict[str, Any], error: type[Exception], words: list[str]
) -> None:
    with pytest.raises(error) as info:
        resolve_feature_criterion(name, options)
    assert all(w in str(info.value) for w in words), str(info.value)
    if error is OptionError:
        assert info.value.option == next(iter(options))


def _pairwise_distances(a: torch.Tensor, b: torch.Tensor, *, squared: bool = False) -> torch.Tensor:
    """A relation criterion: compares the samples' pairwise distances, so widths may differ."""
    d_a, d_b = (torch.cdist(x.flatten(1), x.flatten(1)) for x in (a, b))
    return F.mse_loss(d_a**2, d_b**2) if squared else F.mse_loss(d_a, d_b)


def _typed(a: torch.Tensor, b: torch.Tensor, *, scale: float = 1.0) -> torch.Tensor:
    return (a - b).abs().mean() * float(scale)  # float("x") raises ValueError, float([]) TypeError


def test_same_shape_is_read_and_kept_through_bound_options() -> None:
    """criterion_same_shape reads a plugin's `same_shape = False` (default True), also through the
    partial that resolve_feature_criterion returns; a plugin's own errors on a value are named."""
    _pairwise_distances.same_shape = False  # type: ignore[attr-defined]
    for name, fn in (("tests_pairwise", _pairwise_distances), ("tests_typed", _typed)):
        if name not in FEATURE_CRITERIA:
            Registries().feature_criteria.add(name, fn)
    assert [criterion_same_shape(build_feature_criterion(n)) for n in ("mse", "cosine")] == [True, True]
    plain = resolve_feature_criterion("tests_pairwise")
    bound = resolve_feature_criterion("tests_pairwise", {"squared": True})
    assert isinstance(bound, functools.partial) and bound.keywords == {"squared": True}
    assert (criterion_same_shape(plain), criterion_same_shape(bound)) == (False, False)
    assert criterion_same_shape(functools.partial(_pairwise_distances)) is False  # a bare partial
    assert criterion_same_shape(resolve_feature_criterion("smooth_l1", {"beta": 0.5})) is True
    a, b = randn(4, 3), randn(4, 7)  # different widths: what same_shape=False allows
    torch.testing.assert_close(bound(a, b), _pairwise_distances(a, b, squared=True))
    assert not torch.allclose(bound(a, b), plain(a, b))
    with pytest.raises(ValueError, match="could not convert"):
        resolve_feature_criterion("tests_typed", {"scale": "x"})
    with pytest.raises(ValueError, match=r"^feature criterion 'tests_typed': .*list"):
        resolve_feature_criterion("tests_typed", {"scale": []})


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
