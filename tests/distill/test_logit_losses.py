"""Logit losses (kl with standardisation, dkd, dist, nkd): values and gradients against torchdistill's
classes, a naive per-sample DKD and the NKD authors' code; the recipe keys, their checks and a
one-step run of each."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
import yaml
from conftest import tiny_recipe_dict, tiny_vit
from torchdistill.losses.mid_level import DISTLoss, LogitStdKDLoss

from kdkit.cli import main
from kdkit.config.schema import RecipeError
from kdkit.config.validation import parse_recipe
from kdkit.distill.distiller import Distiller
from kdkit.distill.losses import (
    LOGIT_LOSSES,
    LogitOptionError,
    OptionError,
    dist,
    dkd,
    kd_loss,
    kl,
    nkd,
    resolve_logit_loss,
)
from kdkit.registry import Registries, RegistryError
from kdkit.run.build import build_distiller
from kdkit.run.checks import check_recipe

B, C = 8, 10
SEEDS = [0, 1, 2]
TAUS = [1.0, 2.0, 4.0]


def tensors(seed: int, scale: float = 3.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Student logits (B, C) that require grad, teacher logits, integer labels; float64."""
    gen = torch.Generator().manual_seed(seed)
    s = (scale * torch.randn(B, C, generator=gen, dtype=torch.float64)).requires_grad_()
    t = scale * torch.randn(B, C, generator=gen, dtype=torch.float64)
    return s, t, torch.randint(0, C, (B,), generator=gen)


def assert_same_value_and_grad(ours: torch.Tensor, theirs: torch.Tensor, s: torch.Tensor) -> None:
    (g_ours,) = torch.autograd.grad(ours, s, retain_graph=True)
    (g_theirs,) = torch.autograd.grad(theirs, s)
    torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(g_ours, g_theirs, rtol=1e-8, atol=1e-12)
    assert g_ours.abs().sum() > 0  # a loss that ignores the student would match trivially


def io(logits: torch.Tensor) -> dict[str, dict[str, torch.Tensor]]:
    """torchdistill's io-dict for a model whose output ('.') is `logits`."""
    return {".": {"output": logits}}


# ---------------------------------------------------------------------------------------------
# kl with logit standardisation ↔ torchdistill LogitStdKDLoss
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("tau", TAUS)
def test_standardized_kl_is_tau_squared_times_logitstdkdloss_without_ce(seed: int, tau: float) -> None:
    """LogitStdKDLoss returns the bare batchmean KL (no τ²) when alpha is 0 or there are no
    targets; kdkit always applies τ²: ours == τ² · theirs."""
    s, t, labels = tensors(seed)
    theirs = LogitStdKDLoss(".", "output", ".", "output", temperature=tau, alpha=0.0)(io(s), io(t))
    ours = kl(s, t, labels, tau, standardize=True)
    assert_same_value_and_grad(ours, tau**2 * theirs, s)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("tau", TAUS)
def test_standardized_kl_is_logitstdkdloss_soft_term_with_ce(seed: int, tau: float) -> None:
    """With alpha > 0 and targets, LogitStdKDLoss is alpha·CE + beta·τ²·KL: minus the CE, ours."""
    s, t, labels = tensors(seed)
    loss = LogitStdKDLoss(".", "output", ".", "output", temperature=tau, alpha=0.5, beta=1.0)
    theirs = loss(io(s), io(t), labels) - 0.5 * F.cross_entropy(s, labels)
    assert_same_value_and_grad(kl(s, t, labels, tau, standardize=True), theirs, s)


def test_standardized_kl_ignores_each_samples_shift_and_scale() -> None:
    s, t, labels = tensors(0)
    gen = torch.Generator().manual_seed(5)
    shift, scale = torch.randn(B, 1, generator=gen), torch.rand(B, 1, generator=gen) + 0.5
    moved = s.detach() * scale.double() + shift.double()
    ours = kl(moved, t, labels, 2.0, standardize=True)
    torch.testing.assert_close(ours, kl(s.detach(), t, labels, 2.0, standardize=True))
    assert not torch.allclose(kl(moved, t, labels, 2.0), kl(s.detach(), t, labels, 2.0))


def test_plain_kl_is_kd_loss() -> None:
    s, t, labels = tensors(1)
    torch.testing.assert_close(kl(s, t, labels, 3.0), kd_loss(s, t, 3.0), rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# dist ↔ torchdistill DISTLoss
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("tau", TAUS)
@pytest.mark.parametrize(("beta", "gamma"), [(1.0, 1.0), (2.0, 0.5)])
def test_dist_equals_torchdistill_distloss(seed: int, tau: float, beta: float, gamma: float) -> None:
    """Same convention (τ² on both terms, means over samples and over classes): equal."""
    s, t, labels = tensors(seed)
    theirs = DISTLoss(".", "output", ".", "output", beta=beta, gamma=gamma, tau=tau)(io(s), io(t))
    assert_same_value_and_grad(dist(s, t, labels, tau, beta=beta, gamma=gamma), theirs, s)


def test_dist_terms_are_weighted_separately() -> None:
    s, t, labels = tensors(3)
    inter, intra = dist(s, t, labels, 2.0, gamma=0.0), dist(s, t, labels, 2.0, beta=0.0)
    assert inter > 0 and intra > 0
    torch.testing.assert_close(dist(s, t, labels, 2.0, beta=3.0, gamma=0.5), 3 * inter + 0.5 * intra)


# ---------------------------------------------------------------------------------------------
# dkd ↔ the paper's formula, computed naively per sample
# ---------------------------------------------------------------------------------------------


def naive_dkd(
    s: torch.Tensor, t: torch.Tensor, labels: torch.Tensor, tau: float, alpha: float, beta: float
) -> torch.Tensor:
    """Zhao et al. (CVPR 2022), Eq. (4)-(7), one sample at a time: TCKD on [p_t, 1 - p_t], NCKD on
    the non-target classes renormalised, times τ², averaged over the batch (as mdistiller)."""

    def kl_div(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        return (p * (p / q).log()).sum()

    total = s.new_zeros(())
    for i in range(s.shape[0]):
        p_s, p_t = F.softmax(s[i] / tau, dim=0), F.softmax(t[i] / tau, dim=0)
        k = int(labels[i])
        others = [j for j in range(s.shape[1]) if j != k]
        tckd = kl_div(torch.stack([p_t[k], 1 - p_t[k]]), torch.stack([p_s[k], 1 - p_s[k]]))
        nckd = kl_div(p_t[others] / p_t[others].sum(), p_s[others] / p_s[others].sum())
        total = total + alpha * tckd + beta * nckd
    return tau**2 * total / s.shape[0]


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("tau", TAUS)
@pytest.mark.parametrize(("alpha", "beta"), [(1.0, 8.0), (0.5, 2.0)])
def test_dkd_equals_the_naive_per_sample_formula(seed: int, tau: float, alpha: float, beta: float) -> None:
    s, t, labels = tensors(seed)
    ours = dkd(s, t, labels, tau, alpha=alpha, beta=beta)
    assert_same_value_and_grad(ours, naive_dkd(s, t, labels, tau, alpha, beta), s)


def test_dkd_defaults_are_the_papers() -> None:
    s, t, labels = tensors(4)
    torch.testing.assert_close(dkd(s, t, labels, 4.0), dkd(s, t, labels, 4.0, alpha=1.0, beta=8.0))


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("tau", TAUS)
def test_dkd_decomposes_kd_per_sample(seed: int, tau: float) -> None:
    """Eq. (decomposition): KD = TCKD + (1 - p_t^T) NCKD, sample by sample (all times τ²)."""
    s, t, labels = tensors(seed)
    s = s.detach()
    for i in range(B):
        one = (s[i : i + 1], t[i : i + 1], labels[i : i + 1])
        p_target = F.softmax(t[i] / tau, dim=0)[labels[i]]
        tckd, nckd = dkd(*one, tau, alpha=1.0, beta=0.0), dkd(*one, tau, alpha=0.0, beta=1.0)
        torch.testing.assert_close(kl(*one, tau), tckd + (1 - p_target) * nckd, rtol=1e-10, atol=1e-12)
        # alpha = beta = 1 is KD plus p_t^T · NCKD: larger unless NCKD is 0
        torch.testing.assert_close(dkd(*one, tau, alpha=1.0, beta=1.0) - kl(*one, tau), p_target * nckd)
        assert nckd > 0


def test_dkd_is_finite_when_the_target_probability_rounds_to_one() -> None:
    s = torch.tensor([[200.0, 0.0, 0.0]], requires_grad=True)
    t = torch.tensor([[100.0, 1.0, 0.0]])
    loss = dkd(s, t, torch.tensor([0]), 1.0)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(s.grad).all()


def test_dkd_refuses_soft_labels() -> None:
    s, t, _ = tensors(0)
    with pytest.raises(ValueError, match=r"dkd: expected integer class labels of shape \(8,\)"):
        dkd(s, t, F.softmax(t, dim=1), 2.0)


# ---------------------------------------------------------------------------------------------
# nkd ↔ the authors' NKDLoss
# ---------------------------------------------------------------------------------------------


def authors_nkd(
    logit_s: torch.Tensor, logit_t: torch.Tensor, gt_label: torch.Tensor, temp: float, gamma: float
) -> torch.Tensor:
    """NKDLoss.forward transcribed from yzd-v/cls_KD, mmcls/models/dis_losses/nkd.py, commit
    1e5d48f36957ee460d39d7ebc592c6cc7f8f3d66 (integer labels only; the module's state inlined)."""
    label = gt_label.view(len(gt_label), 1)
    N, c = logit_s.shape
    s_i = F.log_softmax(logit_s, dim=1)
    t_i = F.softmax(logit_t, dim=1)
    s_t = torch.gather(s_i, 1, label)
    t_t = torch.gather(t_i, 1, label).detach()
    loss_t = -(t_t * s_t).mean()
    mask = torch.ones_like(logit_s).scatter_(1, label, 0).bool()
    logit_s = logit_s[mask].reshape(N, -1)
    logit_t = logit_t[mask].reshape(N, -1)
    S_i = F.log_softmax(logit_s / temp, dim=1)
    T_i = F.softmax(logit_t / temp, dim=1)
    loss_non = (T_i * S_i).sum(dim=1).mean()
    loss_non = -gamma * (temp**2) * loss_non
    return loss_t + loss_non


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("tau", TAUS)
@pytest.mark.parametrize("gamma", [1.5, 3.5, 0.0])
def test_nkd_equals_the_authors_formula(seed: int, tau: float, gamma: float) -> None:
    """Same value and gradient as the authors' NKDLoss with temp = tau (gamma 0: the target term
    alone, which is at temperature 1 whatever tau)."""
    s, t, labels = tensors(seed)
    assert_same_value_and_grad(nkd(s, t, labels, tau, gamma=gamma), authors_nkd(s, t, labels, tau, gamma), s)


def test_nkd_defaults_are_the_authors() -> None:
    s, t, labels = tensors(2)
    torch.testing.assert_close(nkd(s, t, labels, 1.0), authors_nkd(s, t, labels, 1.0, 1.5), rtol=0, atol=0)


def test_nkd_target_term_ignores_tau_and_non_target_term_scales_with_gamma() -> None:
    s, t, labels = tensors(5)
    target = nkd(s, t, labels, 1.0, gamma=0.0)
    torch.testing.assert_close(nkd(s, t, labels, 4.0, gamma=0.0), target)
    torch.testing.assert_close(
        nkd(s, t, labels, 4.0, gamma=3.0) - target, 2 * (nkd(s, t, labels, 4.0) - target)
    )


def test_nkd_is_finite_when_the_target_probability_rounds_to_one() -> None:
    s = torch.tensor([[200.0, 0.0, -3.0], [0.0, 300.0, 1.0]], requires_grad=True)
    t = torch.tensor([[100.0, 1.0, 0.0], [-2.0, 400.0, 0.0]])
    labels = torch.tensor([0, 1])
    loss = nkd(s, t, labels, 2.0)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(s.grad).all()
    assert s.grad[:, 2].abs().min() > 0  # the non-target term still teaches the other classes
    torch.testing.assert_close(loss, authors_nkd(s.detach(), t, labels, 2.0, 1.5))


def test_nkd_refuses_soft_labels_and_bad_gamma() -> None:
    s, t, _ = tensors(0)
    with pytest.raises(ValueError, match=r"nkd: expected integer class labels of shape \(8,\)"):
        nkd(s, t, F.softmax(t, dim=1), 2.0)
    with pytest.raises(OptionError, match=r"gamma: expected a number >= 0 for logit loss 'nkd'"):
        resolve_logit_loss("nkd", {"gamma": "1.5"})


# ---------------------------------------------------------------------------------------------
# the registry and option checks
# ---------------------------------------------------------------------------------------------


def test_the_registry_holds_the_builtins_and_is_handed_to_plugins() -> None:
    assert {"kl", "dkd", "dist", "nkd"} <= set(LOGIT_LOSSES.names())
    assert LogitOptionError is OptionError  # the old name, which kdkit.run.checks and plugins catch
    assert Registries().logit_losses is LOGIT_LOSSES
    assert LOGIT_LOSSES.get("dkd") is dkd


@pytest.mark.parametrize(
    ("name", "options", "error", "words"),
    [
        ("dkdd", {}, RegistryError, ["unknown logit loss 'dkdd'", "Did you mean 'dkd'"]),
        (
            "dkd",
            {"alfa": 1.0},
            LogitOptionError,
            ["alfa: unknown option", "Did you mean 'alpha'", "alpha, beta"],
        ),
        ("kl", {"tau": 2.0}, LogitOptionError, ["tau: unknown option of logit loss 'kl'", "standardize"]),
        ("dist", {"gamma": -1.0}, LogitOptionError, ["gamma: expected a number >= 0", "-1.0"]),
        ("dkd", {"beta": True}, LogitOptionError, ["beta: expected a number >= 0", "True"]),
        ("kl", {"standardize": "yes"}, LogitOptionError, ["standardize: expected true/false", "'yes'"]),
    ],
)
def test_resolve_refuses_unknown_names_options_and_bad_values(
    name: str, options: dict[str, Any], error: type[Exception], words: list[str]
) -> None:
    with pytest.raises(error) as info:
        resolve_logit_loss(name, options)
    assert all(w in str(info.value) for w in words), str(info.value)


# ---------------------------------------------------------------------------------------------
# Distiller, recipe, checks, a one-step run
# ---------------------------------------------------------------------------------------------


def test_the_distiller_logs_the_chosen_logit_loss_as_kd(images: torch.Tensor) -> None:
    d = Distiller(
        tiny_vit(48, seed=1), tiny_vit(32), adapter="none", logit_loss="dkd", logit_options={"beta": 2.0}
    )
    labels = torch.tensor([0, 3, 7, 9])
    out = d(images, labels)
    with torch.no_grad():
        t_logits = d.teacher(images)
    torch.testing.assert_close(out["kd"], dkd(out["logits"], t_logits, labels, d.tau, beta=2.0))
    torch.testing.assert_close(out["loss"], 0.3 * out["ce"] + 0.7 * out["kd"])
    with pytest.raises(LogitOptionError, match="gama: unknown option of logit loss 'dist'"):
        Distiller(tiny_vit(48), tiny_vit(32), adapter="none", logit_loss="dist", logit_options={"gama": 1})


def _recipe(**distill: Any) -> dict[str, Any]:
    data = tiny_recipe_dict()
    data["distill"].update(distill)
    return data


def test_recipe_defaults_and_build_distiller_pass_the_logit_loss_through() -> None:
    assert (
        parse_recipe(tiny_recipe_dict()).distill.logit_loss,
        parse_recipe(tiny_recipe_dict()).distill.logit_options,
    ) == ("kl", {})
    recipe = parse_recipe(_recipe(logit_loss="dist", logit_options={"gamma": 2.0}))
    distiller = build_distiller(recipe, recipe.pipeline[1], example=torch.zeros(2, 1, 16, 16))
    assert (distiller.logit_loss, distiller.logit_options) == ("dist", {"gamma": 2.0})
    distiller.close()


def test_logit_options_must_be_a_mapping() -> None:
    with pytest.raises(RecipeError, match=r"distill.logit_options: expected a mapping, got 3"):
        parse_recipe(_recipe(logit_options=3))


def _problems(data: dict[str, Any]) -> list[str]:
    with pytest.raises(RecipeError) as info:
        check_recipe(parse_recipe(data))
    return info.value.problems


def _staged(**distill: Any) -> dict[str, Any]:
    """The tiny recipe whose student_kd stage overrides these distill keys."""
    data = tiny_recipe_dict()
    (stage,) = [s for s in data["pipeline"] if s["do"] == "distill"]
    stage["distill"] = distill
    return data


@pytest.mark.parametrize(
    ("data", "start", "words"),
    [
        (
            _recipe(logit_loss="dkdd"),
            "distill.logit_loss: unknown logit loss 'dkdd'.",
            ["Did you mean 'dkd'"],
        ),
        (
            _recipe(logit_loss="dkd", logit_options={"alfa": 1}),
            "distill.logit_options.alfa: unknown option",
            ["'alpha'"],
        ),
        (
            _recipe(logit_options={"standardize": 1}),
            "distill.logit_options.standardize: expected true/false",
            [],
        ),
        (
            _staged(logit_loss="distt"),
            "pipeline.student_kd.distill.logit_loss: unknown logit loss",
            ["'dist'"],
        ),
        (
            _staged(logit_loss="dist", logit_options={"gama": 1}),
            "pipeline.student_kd.distill.logit_options.gama:",
            ["'gamma'"],
        ),
    ],
)
def test_checks_refuse_unknown_logit_losses_and_options_with_the_key_path(
    data: dict[str, Any], start: str, words: list[str]
) -> None:
    (problem,) = _problems(data)
    assert problem.startswith(start) and all(w in problem for w in words), problem


def test_a_bad_logit_option_stops_a_run_before_any_work(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(_recipe(logit_loss="dkd", logit_options={"beta": -8}), sort_keys=False))
    assert main(["run", str(path), "--out", str(tmp_path / "run")]) == 2
    assert "distill.logit_options.beta: expected a number >= 0" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("name", "options"),
    [("dkd", {"alpha": 1.0, "beta": 8.0}), ("dist", {"beta": 2.0}), ("nkd", {"gamma": 1.5})],
)
def test_a_distill_run_with_each_logit_loss_trains_a_step(
    tmp_path: Path, name: str, options: dict[str, Any]
) -> None:
    data = _recipe(logit_loss=name, logit_options=options, adapter="none")
    data["pipeline"] = [{"name": "kd", "do": "distill"}]
    data["train"].update(epochs=1, max_steps_per_epoch=1)
    path = tmp_path / "kd.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    assert main(["run", str(path), "--out", str(tmp_path / "run")]) == 0
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    kd = [r["train/kd"] for r in logged if "train/kd" in r]
    assert kd and all(math.isfinite(v) and v > 0 for v in kd), logged


def test_the_methods_page_example_is_a_valid_recipe() -> None:
    page = (Path(__file__).resolve().parents[2] / "docs" / "methods.md").read_text()
    blocks = [yaml.safe_load(b) for b in re.findall(r"```yaml\n(.*?)```", page, flags=re.S)]
    # the logit-loss example; the page's other examples (data sections) have no `distill` key
    (example,) = [b for b in blocks if "logit_loss" in b.get("distill", {})]
    recipe = parse_recipe(_recipe(**example["distill"]))
    assert recipe.distill.logit_loss == "dkd"
    assert resolve_logit_loss(recipe.distill.logit_loss, recipe.distill.logit_options) is dkd


def _scaled_l1(
    s: torch.Tensor, t: torch.Tensor, labels: torch.Tensor, tau: float, *, scale: float = 1.0
) -> torch.Tensor:
    return scale * (s - t).abs().mean()


def test_a_plugin_logit_loss_is_checked_and_used_by_name(images: torch.Tensor) -> None:
    if "test_scaled_l1" not in LOGIT_LOSSES:
        Registries().logit_losses.add("test_scaled_l1", _scaled_l1)
    with pytest.raises(LogitOptionError, match="scal: unknown option .* Did you mean 'scale'"):
        resolve_logit_loss("test_scaled_l1", {"scal": 2.0})
    d = Distiller(
        tiny_vit(48, seed=1),
        tiny_vit(32),
        adapter="none",
        logit_loss="test_scaled_l1",
        logit_options={"scale": 2.0},
    )
    out = d(images, torch.zeros(4, dtype=torch.long))
    with torch.no_grad():
        torch.testing.assert_close(out["kd"], 2.0 * (out["logits"] - d.teacher(images)).abs().mean())
