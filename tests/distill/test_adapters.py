"""kdkit.distill.adapters: shapes, parameters, gradients, formulas, and agreement with torchdistill."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torchdistill.losses.mid_level import SPKDLoss

from kdkit.config.schema import DataSpec
from kdkit.data.datasets import build_dataset, build_loaders
from kdkit.distill.adapters import adapter_min_batch, build_adapter
from kdkit.distill.losses import mse
from kdkit.registry import ADAPTERS, RegistryError

GEN = torch.Generator().manual_seed(0)


def randn(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=GEN)


def test_registered_names():
    assert {"identity", "projection", "covariance", "gram", "mlp", "orthogonal", "raw"} <= set(ADAPTERS)


@pytest.mark.parametrize("name", ["projection", "covariance"])
@pytest.mark.parametrize("tokens", [(), (5,)])
def test_width_mapping_shapes(name, tokens):
    adapter = build_adapter(name, 8, 12)
    s_mapped, t_target = adapter(randn(4, *tokens, 8), randn(4, *tokens, 12))
    assert s_mapped.shape == t_target.shape == (4, *tokens, 12)


@pytest.mark.parametrize("tokens", [(), (5,)])
def test_identity_shapes(tokens):
    s, t = randn(4, *tokens, 8), randn(4, *tokens, 8)
    s_out, t_out = build_adapter("identity", 8, 8)(s, t)
    assert s_out is s and t_out is t


def test_gram_shapes_allow_different_token_counts():
    s_mapped, t_target = build_adapter("gram", 8, 12)(randn(4, 5, 8), randn(4, 7, 12))
    assert s_mapped.shape == t_target.shape == (4, 4)


def test_identity_width_error_at_build_time():
    with pytest.raises(ValueError, match="student_dim=8, teacher_dim=12"):
        build_adapter("identity", 8, 12)


@pytest.mark.parametrize(
    ("s_shape", "t_shape", "message"),
    [
        ((4, 8), (3, 12), r"batch sizes differ: student \(4, 8\), teacher \(3, 12\)"),
        ((4, 5, 8), (4, 12), r"same rank and token count"),
        ((4, 5, 8), (4, 6, 12), r"student \(4, 5, 8\) and teacher \(4, 6, 12\)"),
        ((4, 9), (4, 12), r"built for student_dim=8, teacher_dim=12; got student \(4, 9\)"),
        ((4, 8, 2, 2), (4, 12), r"must be \(B, D\) or \(B, N, D\)"),
    ],
)
def test_shape_errors_name_the_shapes(s_shape, t_shape, message):
    with pytest.raises(ValueError, match=message):
        build_adapter("covariance", 8, 12)(randn(*s_shape), randn(*t_shape))


def test_extra_parameters():
    assert build_adapter("projection", 8, 12).extra_parameters() == 8 * 12 + 12
    assert build_adapter("projection", 8, 12, bias=False).extra_parameters() == 8 * 12
    for name in ("covariance", "gram"):
        adapter = build_adapter(name, 8, 12)
        assert adapter.extra_parameters() == 0 and not list(adapter.parameters())
    assert build_adapter("identity", 8, 8).extra_parameters() == 0


def test_unknown_adapter_and_option():
    with pytest.raises(RegistryError, match="covariance"):
        build_adapter("covariance_matrix", 8, 12)
    with pytest.raises(ValueError, match=r"unknown options \['bais'\]; valid options: \['bias'\]"):
        build_adapter("projection", 8, 12, bais=False)


def test_projection_learns_a_linear_map():
    torch.manual_seed(0)
    true_map = randn(8, 12)
    s = randn(64, 8)
    t = s @ true_map
    adapter = build_adapter("projection", 8, 12)
    opt = torch.optim.Adam(adapter.parameters(), lr=0.05)
    first = None
    for _ in range(200):
        loss = mse(*adapter(s, t))
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.01 * first


def test_covariance_matches_direct_formula():
    s, t = randn(6, 8), randn(6, 12)
    s_mapped, t_target = build_adapter("covariance", 8, 12)(s, t)
    s_hat = s / s.norm(dim=1, keepdim=True)
    t_hat = t / t.norm(dim=1, keepdim=True)
    cov = s_hat.T @ t_hat
    torch.testing.assert_close(s_mapped, s_hat @ cov)
    torch.testing.assert_close(t_target, t_hat)


def test_covariance_on_tokens_uses_all_rows():
    s, t = randn(3, 5, 8), randn(3, 5, 12)
    s_mapped, t_target = build_adapter("covariance", 8, 12)(s, t)
    flat_mapped, flat_target = build_adapter("covariance", 8, 12)(s.reshape(15, 8), t.reshape(15, 12))
    torch.testing.assert_close(s_mapped, flat_mapped.reshape(3, 5, 12))
    torch.testing.assert_close(t_target, flat_target.reshape(3, 5, 12))


@pytest.mark.parametrize("name", ["covariance", "gram", "projection"])
def test_gradients_reach_the_student(name):
    s = randn(4, 8).requires_grad_()
    t = randn(4, 12)
    mse(*build_adapter(name, 8, 12)(s, t)).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0


@pytest.mark.parametrize(("s_shape", "t_shape"), [((6, 8), (6, 12)), ((6, 5, 8), (6, 3, 12))])
def test_gram_p1_with_mse_equals_torchdistill_spkd(s_shape, t_shape):
    s, t = randn(*s_shape), randn(*t_shape)
    ours = mse(*build_adapter("gram", s_shape[-1], t_shape[-1], p=1)(s, t))
    spkd = SPKDLoss("s", "t", reduction="batchmean")
    theirs = spkd({"s": {"output": s}}, {"t": {"output": t}})
    torch.testing.assert_close(ours, theirs)


def test_gram_default_is_the_papers_l2_sp_loss():
    # Tung & Mori's SP loss as RepDistiller writes it: L2 row-normalised Gram matrices.
    s, t = randn(5, 3, 8), randn(5, 12)
    g_s, g_t = build_adapter("gram", 8, 12)(s, t)
    f_s, f_t = s.reshape(5, -1), t
    expected_s = (f_s @ f_s.T) / (f_s @ f_s.T).norm(dim=1, keepdim=True)
    expected_t = (f_t @ f_t.T) / (f_t @ f_t.T).norm(dim=1, keepdim=True)
    torch.testing.assert_close(g_s, expected_s)
    torch.testing.assert_close(g_t, expected_t)
    torch.testing.assert_close(mse(g_s, g_t), ((expected_t - expected_s) ** 2).sum() / 5**2)


def test_covariance_detach_changes_only_the_gradient() -> None:
    g = torch.Generator().manual_seed(0)
    s0, t = torch.randn(6, 8, generator=g), torch.randn(6, 12, generator=g)
    grads, values = {}, {}
    for detach in (True, False):
        s = s0.clone().requires_grad_(True)
        mapped, target = build_adapter("covariance", 8, 12, detach_covariance=detach)(s, t)
        loss = F.mse_loss(mapped, target)
        loss.backward()
        grads[detach], values[detach] = s.grad, loss.item()
    assert values[True] == pytest.approx(values[False])
    assert not torch.allclose(grads[True], grads[False])
    # Detached: the gradient of ‖ŝC − t̂‖² with C held constant.
    s = s0.clone().requires_grad_(True)
    s_hat, t_hat = F.normalize(s, dim=1), F.normalize(t, dim=1)
    constant = (F.normalize(s0, dim=1).T @ t_hat).detach()
    F.mse_loss(s_hat @ constant, t_hat).backward()
    torch.testing.assert_close(grads[True], s.grad)


def _hatfas_feature_loss(tokens_s: list[torch.Tensor], tokens_t: list[torch.Tensor]) -> torch.Tensor:
    """The feature term of the HaTFAS authors' public code (Maricle-zhangjun/HaTFAS@3e96e7b,
    `losses.py`, `encoder_layer_loss`), written here from reading it: per layer pair, L2-normalise
    both class tokens, correlation map ŝᵀt̂ (gradient flowing through it), reconstruction ŝ·map,
    mean of the squared difference to t̂; the term is the sum over pairs divided by their number."""
    losses = []
    for cls_s, cls_t in zip(tokens_s, tokens_t, strict=True):
        cls_s, cls_t = F.normalize(cls_s, dim=-1), F.normalize(cls_t, dim=-1)
        reconstruction = cls_s @ (cls_s.transpose(0, 1) @ cls_t)
        losses.append(((cls_t - reconstruction) ** 2).mean())
    return sum(losses) / len(losses)


def test_covariance_without_detach_is_the_hatfas_authors_loss_and_gradient() -> None:
    g = torch.Generator().manual_seed(3)
    student = [torch.randn(8, 192, generator=g, dtype=torch.float64) for _ in range(3)]  # ViT-Ti width
    teacher = [torch.randn(8, 768, generator=g, dtype=torch.float64) for _ in range(3)]  # ViT-B width
    ours_in = [s.clone().requires_grad_(True) for s in student]
    theirs_in = [s.clone().requires_grad_(True) for s in student]
    adapter = build_adapter("covariance", 192, 768, detach_covariance=False)
    ours = torch.stack(
        [mse(*adapter(s, t)) for s, t in zip(ours_in, teacher, strict=True)]
    ).mean()  # Distiller's feat
    theirs = _hatfas_feature_loss(theirs_in, teacher)
    ours.backward()
    theirs.backward()
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=0)
    for a, b in zip(ours_in, theirs_in, strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-10, atol=1e-14)
    # kdkit's default (detached) keeps the value and changes only the gradient.
    detached = build_adapter("covariance", 192, 768)
    value = torch.stack([mse(*detached(s, t)) for s, t in zip(student, teacher, strict=True)]).mean()
    torch.testing.assert_close(value, theirs.detach(), rtol=1e-12, atol=0)


def test_logit_kd_is_the_hatfas_authors_soft_distillation() -> None:
    """HaTFAS `DistillationLoss` ('soft'): KL(log_softmax(s/T) ‖ log_softmax(t/T)), batchmean,
    log_target, times T²; the total is (1-α)·CE + α·KD + β·feature."""
    from kdkit.distill.losses import kd_loss

    g = torch.Generator().manual_seed(0)
    s, t = (
        torch.randn(16, 2, generator=g, dtype=torch.float64),
        torch.randn(16, 2, generator=g, dtype=torch.float64),
    )
    tau = 3.0
    reference = F.kl_div(
        F.log_softmax(s / tau, 1), F.log_softmax(t / tau, 1), reduction="batchmean", log_target=True
    )
    torch.testing.assert_close(kd_loss(s, t, tau), reference * tau * tau, rtol=1e-12, atol=0)


@pytest.mark.parametrize("name", ["covariance", "gram"])
def test_batch_statistics_adapters_refuse_a_batch_of_one(name: str) -> None:
    """With one sample the covariance mapping returns the teacher's features exactly and the Gram
    matrices are both [1]: the loss would be 0 for the whole run. Refused, naming the need."""
    adapter = build_adapter(name, 8, 12)
    s, t = torch.randn(1, 8), torch.randn(1, 12)
    with torch.no_grad():
        # what the refusal prevents: an exactly zero feature loss
        assert mse(*adapter.map(s, t)).item() == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="at least 2 samples"):
        adapter(s, t)
    assert adapter_min_batch(name) == 2 and adapter_min_batch("projection") == 1
    assert adapter_min_batch("none") == 1
    adapter(torch.randn(2, 8), torch.randn(2, 12))  # two samples are enough


def test_the_train_loader_drops_a_trailing_batch_too_small_for_the_adapter() -> None:
    spec = DataSpec(dataset="digits", image_size=8, mean=[0.5], std=[0.5])
    n = len(build_dataset(spec, "train"))
    spec.batch_size = n - 1  # two batches: n - 1 samples and a trailing one of 1
    assert len(build_loaders(spec, seed=0)[0]) == 2
    train = build_loaders(spec, seed=0, min_batch=2)[0]
    assert len(train) == 1 and [len(b[1]) for b in train] == [n - 1]


# ------------------------------------------------------------------ projection heads: mlp, orthogonal
def _fit(adapter: torch.nn.Module, s: torch.Tensor, t: torch.Tensor, steps: int = 300) -> float:
    opt = torch.optim.Adam(adapter.parameters(), lr=0.02)
    for _ in range(steps):
        loss = mse(*adapter(s, t))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return loss.item()


def test_mlp_is_linear_gelu_linear_with_the_teachers_width_inside() -> None:
    adapter = build_adapter("mlp", 8, 12)
    first, act, second = adapter.head
    assert (first.in_features, first.out_features, second.out_features) == (8, 12, 12)
    assert isinstance(act, torch.nn.GELU)
    s = randn(4, 3, 8)
    torch.testing.assert_close(adapter(s, randn(4, 3, 12))[0], second(F.gelu(first(s))))
    assert build_adapter("mlp", 8, 12, hidden_dim=5).extra_parameters() == 8 * 5 + 5 + 5 * 12 + 12
    assert build_adapter("mlp", 8, 12, bias=False).extra_parameters() == 8 * 12 + 12 * 12
    with pytest.raises(ValueError, match="hidden_dim: expected a positive integer"):
        build_adapter("mlp", 8, 12, hidden_dim=0)


def test_mlp_fits_a_non_linear_target_that_a_linear_head_cannot() -> None:
    torch.manual_seed(0)
    s = randn(128, 8)
    t = torch.tanh(3 * s @ randn(8, 12))
    linear, mlp = build_adapter("projection", 8, 12), build_adapter("mlp", 8, 12, hidden_dim=64)
    assert _fit(mlp, s, t) < 0.5 * _fit(linear, s, t)


@pytest.mark.parametrize(("ds", "dt"), [(8, 12), (12, 8)])
def test_orthogonal_stays_orthogonal_while_it_learns(ds: int, dt: int) -> None:
    torch.manual_seed(0)
    adapter = build_adapter("orthogonal", ds, dt, normalize="none")
    s, t = randn(64, ds), randn(64, dt)
    before = mse(*adapter(s, t)).item()
    assert _fit(adapter, s, t, steps=50) < 0.9 * before
    w = adapter.proj.weight  # (dt, ds)
    gram = w.T @ w if ds <= dt else w @ w.T
    torch.testing.assert_close(gram, torch.eye(min(ds, dt)), atol=1e-5, rtol=0)
    mapped = adapter(s, t)[0]
    if ds <= dt:  # orthonormal columns: every student vector keeps its norm (and inner products)
        torch.testing.assert_close(mapped.norm(dim=1), s.norm(dim=1), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(mapped @ mapped.T, s @ s.T, atol=1e-4, rtol=1e-4)
    else:  # orthonormal rows: a contraction that keeps the norms of vectors in its row space
        assert bool((mapped.norm(dim=1) <= s.norm(dim=1) + 1e-5).all())
        in_rows = randn(5, dt) @ w.detach()
        torch.testing.assert_close(adapter(in_rows, t[:5])[0].norm(dim=1), in_rows.norm(dim=1))
    assert adapter.extra_parameters() == ds * dt and adapter.proj.bias is None


def test_orthogonal_standardises_the_teacher_and_survives_a_checkpoint() -> None:
    torch.manual_seed(0)
    adapter = build_adapter("orthogonal", 8, 12)
    t = 5 + 3 * randn(4, 12)
    target = adapter(randn(4, 8), t)[1]
    expected = (t - t.mean(1, keepdim=True)) / (t.var(1, unbiased=False, keepdim=True) + 1e-5).sqrt()
    torch.testing.assert_close(target, expected)
    _fit(adapter, randn(16, 8), randn(16, 12), steps=5)  # move it off its initialisation
    state = adapter.state_dict()
    assert "proj.parametrizations.weight.original" in state
    torch.manual_seed(1)
    other = build_adapter("orthogonal", 8, 12)
    assert not torch.allclose(other.proj.weight, adapter.proj.weight)
    other.load_state_dict(state)
    torch.testing.assert_close(other.proj.weight, adapter.proj.weight)
    s = randn(3, 8)
    torch.testing.assert_close(other(s, t[:3])[0], adapter(s, t[:3])[0])
    with pytest.raises(ValueError, match=r"normalize: expected one of \['layer', 'batch', 'none'\], got 'ye"):
        build_adapter("orthogonal", 8, 12, normalize="yes")


def test_raw_passes_any_shapes_with_one_batch_size() -> None:
    adapter = build_adapter("raw", 4, 9)
    s, t = randn(3, 2, 4, 4), randn(3, 9)
    s_out, t_out = adapter(s, t)
    assert s_out is s and t_out is t and adapter.extra_parameters() == 0
    with pytest.raises(ValueError, match=r"the same batch size B; got student \(3, 4\), teacher \(2, 9\)"):
        adapter(randn(3, 4), randn(2, 9))


def _vkd_reference_loss(projector: torch.nn.Module, z_s: torch.Tensor, z_t: torch.Tensor) -> torch.Tensor:
    # Transcribed from roymiles/vkd (commit 4b48050), train.py (the projector:
    # orthogonal(nn.Linear(student.num_features, teacher.num_features, bias=False))) and engine.py
    # (the representation loss on pooled features: the teacher's layer-normalised, smooth L1).
    z_t_norm = F.layer_norm(z_t, (z_t.shape[1],))
    return F.smooth_l1_loss(projector(z_s), z_t_norm)


@pytest.mark.parametrize(("ds", "dt"), [(8, 12), (12, 8), (16, 16)])
def test_orthogonal_with_smooth_l1_equals_the_vkd_authors_loss_and_gradient(ds: int, dt: int) -> None:
    from torch.nn.utils.parametrizations import orthogonal

    from kdkit.distill.losses import smooth_l1

    torch.manual_seed(ds)
    adapter = build_adapter("orthogonal", ds, dt)
    reference = orthogonal(torch.nn.Linear(ds, dt, bias=False))
    reference.load_state_dict(adapter.proj.state_dict())
    s, t = randn(6, ds).requires_grad_(), randn(6, dt) * 3 + 1
    s_ref = s.detach().clone().requires_grad_()
    ours, theirs = smooth_l1(*adapter(s, t)), _vkd_reference_loss(reference, s_ref, t)
    torch.testing.assert_close(ours, theirs)
    ours.backward()
    theirs.backward()
    torch.testing.assert_close(s.grad, s_ref.grad)
    ours_w = adapter.proj.parametrizations.weight.original.grad
    torch.testing.assert_close(ours_w, reference.parametrizations.weight.original.grad)


def _vkd_detection_reference_loss(
    projector: torch.nn.Module, patch: torch.Tensor, teacher_patch: torch.Tensor
) -> torch.Tensor:
    # Transcribed from roymiles/vkd (commit 4b48050), vidt/methods/vidt/criterion.py (the distillation
    # loss on rows of tokens: both sides standardised per feature over the rows, smooth L1) with the
    # projector of vidt/main.py's OrthogonalLinear (its per-channel scale and bias are left out: the
    # standardisation that follows cancels them, up to the sign of the scale).
    patch = projector(patch)
    patch = (patch - patch.mean(0)) / patch.std(0)
    teacher_patch = (teacher_patch - teacher_patch.mean(0)) / teacher_patch.std(0)
    return F.smooth_l1_loss(patch, teacher_patch)


def test_orthogonal_batch_normalisation_equals_the_vkd_detection_loss_and_gradient() -> None:
    from torch.nn.utils.parametrizations import orthogonal

    from kdkit.distill.losses import smooth_l1

    torch.manual_seed(0)
    adapter = build_adapter("orthogonal", 8, 12, normalize="batch")
    reference = orthogonal(torch.nn.Linear(8, 12, bias=False))
    reference.load_state_dict(adapter.proj.state_dict())
    s, t = randn(3, 5, 8).requires_grad_(), randn(3, 5, 12) * 4 - 2  # (B, N, D): rows are B*N tokens
    s_ref = s.detach().reshape(15, 8).clone().requires_grad_()
    ours = smooth_l1(*adapter(s, t))
    theirs = _vkd_detection_reference_loss(reference, s_ref, t.reshape(15, 12))
    torch.testing.assert_close(ours, theirs)
    ours.backward()
    theirs.backward()
    torch.testing.assert_close(s.grad.reshape(15, 8), s_ref.grad)
    ours_w = adapter.proj.parametrizations.weight.original.grad
    torch.testing.assert_close(ours_w, reference.parametrizations.weight.original.grad)
    # a constant teacher feature is 0 after the standardisation, not NaN; one row cannot be standardised
    t_dead = t.clone()
    t_dead[..., 0] = 1.0
    assert bool(adapter(s, t_dead)[1][..., 0].eq(0).all())
    with pytest.raises(ValueError, match=r"normalize='batch' .* at least 2 rows; got features \(1, 12\)"):
        adapter(randn(1, 8), randn(1, 12))
