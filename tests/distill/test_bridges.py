"""The parameter-free width bridges: `procrustes` (sound), `covariance` (KDFAS, degenerate) and `cka`.

Each is checked against its formula, and the documented degeneracy of the KDFAS covariance mapping
is kept as a test: its loss is zero for any student with orthonormal rows, whatever the teacher.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kdkit.distill.adapters import adapter_min_batch, build_adapter
from kdkit.distill.losses import mse


def generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def orthonormal_rows(rows: int, width: int, seed: int = 0) -> torch.Tensor:
    """`rows` mutually orthogonal unit vectors of `width` (rows <= width)."""
    q, _ = torch.linalg.qr(torch.randn(width, rows, generator=generator(seed), dtype=torch.float64))
    return q.T.contiguous()


def procrustes_distance(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Mean over rows of min_Q ‖ŝQ - t̂‖² over isometries Q: (2R - 2‖ŝᵀt̂‖_*) / R."""
    s_hat, t_hat = F.normalize(s, dim=1), F.normalize(t, dim=1)
    rows = s.shape[0]
    return (2 * rows - 2 * torch.linalg.svdvals(s_hat.T @ t_hat).sum()) / rows


def test_both_bridges_are_registered_without_parameters() -> None:
    for name in ("procrustes", "cka"):
        assert build_adapter(name, 8, 12).extra_parameters() == 0
    assert adapter_min_batch("procrustes") == 2 and adapter_min_batch("cka") == 3


@pytest.mark.parametrize(("ds", "dt"), [(8, 12), (12, 8), (8, 8)])
@pytest.mark.parametrize("tokens", [(), (5,)])
def test_procrustes_maps_the_narrower_side_into_the_wider_width(ds: int, dt: int, tokens: tuple) -> None:
    g = generator()
    s, t = torch.randn(4, *tokens, ds, generator=g), torch.randn(4, *tokens, dt, generator=g)
    mapped, target = build_adapter("procrustes", ds, dt)(s, t)
    assert mapped.shape == target.shape == (4, *tokens, max(ds, dt))


def test_covariance_is_zero_for_orthonormal_student_rows_whatever_the_teacher() -> None:
    """The documented degeneracy: ŝC = ŝŝᵀt̂ = t̂ when ŝŝᵀ = I, so the teacher plays no part; Procrustes
    keeps the teacher: for a teacher whose rows cluster in two classes its loss there is far from 0."""
    student = orthonormal_rows(6, 16).float()
    for seed in range(3):
        g = generator(seed)
        centres = torch.randn(2, 24, generator=g)
        teacher = centres[torch.tensor([0, 0, 0, 1, 1, 1])] + 0.3 * torch.randn(6, 24, generator=g)
        for detach in (True, False):
            cov = build_adapter("covariance", 16, 24, detach_covariance=detach)
            assert mse(*cov(student, teacher)).item() == pytest.approx(0.0, abs=1e-7)
        # orthonormal student rows: ‖ŝᵀt̂‖_* is the teacher's nuclear norm, so 2 - 2‖t̂‖_*/R remains
        remaining = 2 - 2 * torch.linalg.svdvals(F.normalize(teacher, dim=1)).sum() / 6
        procrustes = mse(*build_adapter("procrustes", 16, 24)(student, teacher))
        torch.testing.assert_close(procrustes, remaining)
        assert procrustes.item() > 0.3


def test_covariance_prefers_an_unrelated_student_to_one_that_copies_the_teacher() -> None:
    """A student whose similarities equal the teacher's has Procrustes loss 0 but a positive covariance
    loss, higher than that of the orthonormal student that ignores the teacher (covariance loss 0)."""
    ds, dt, rows = 16, 24, 6
    isometry = orthonormal_rows(ds, dt, seed=1).float()  # (ds, dt), orthonormal rows
    copying = torch.randn(rows, ds, generator=generator(2))
    teacher = copying @ isometry  # the teacher's rows live in a ds-wide subspace
    unrelated = orthonormal_rows(rows, ds, seed=3).float()
    cov, pro = build_adapter("covariance", ds, dt), build_adapter("procrustes", ds, dt)
    assert mse(*pro(copying, teacher)).item() == pytest.approx(0.0, abs=1e-5)
    assert mse(*cov(copying, teacher)).item() > 10 * mse(*cov(unrelated, teacher)).item() + 1e-4


@pytest.mark.parametrize(("ds", "dt"), [(8, 8), (6, 10), (10, 6)])
def test_procrustes_is_zero_when_the_student_is_an_isometric_copy_of_the_teacher(ds: int, dt: int) -> None:
    narrow, wide = min(ds, dt), max(ds, dt)
    isometry = orthonormal_rows(narrow, wide, seed=4)  # (narrow, wide), orthonormal rows
    base = torch.randn(7, narrow, generator=generator(5), dtype=torch.float64) * 3.0
    s, t = (base, base @ isometry) if ds <= dt else (base @ isometry, base)
    s_mapped, t_target = build_adapter("procrustes", ds, dt)(s, t)
    torch.testing.assert_close(s_mapped, t_target, atol=1e-10, rtol=0)


@pytest.mark.parametrize(("ds", "dt"), [(6, 9), (9, 6)])
def test_procrustes_gradient_is_the_finite_difference_gradient_of_the_distance(ds: int, dt: int) -> None:
    """Q is computed without gradient, yet the gradient is that of the Procrustes distance (Danskin)."""
    g = generator(6)
    s = torch.randn(5, ds, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randn(5, dt, generator=g, dtype=torch.float64)
    loss = mse(*build_adapter("procrustes", ds, dt)(s, t))
    torch.testing.assert_close(loss, procrustes_distance(s, t), atol=1e-12, rtol=0)
    (grad,) = torch.autograd.grad(loss, s)
    step, numeric = 1e-6, torch.zeros_like(s)
    with torch.no_grad():
        for index in np.ndindex(*s.shape):
            bump = torch.zeros_like(s)
            bump[index] = step
            numeric[index] = (procrustes_distance(s + bump, t) - procrustes_distance(s - bump, t)) / (
                2 * step
            )
    torch.testing.assert_close(grad, numeric, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize(("ds", "dt"), [(6, 9), (9, 6)])
def test_procrustes_equals_a_numpy_reference_written_from_the_formula(ds: int, dt: int) -> None:
    g = generator(7)
    s, t = torch.randn(2, 4, ds, generator=g), torch.randn(2, 4, dt, generator=g)
    s_hat = s.reshape(8, ds).numpy().astype(np.float64)
    t_hat = t.reshape(8, dt).numpy().astype(np.float64)
    s_hat /= np.linalg.norm(s_hat, axis=1, keepdims=True)
    t_hat /= np.linalg.norm(t_hat, axis=1, keepdims=True)
    u, _, vt = np.linalg.svd(s_hat.T @ t_hat, full_matrices=False)
    q = u @ vt
    expected = (s_hat @ q, t_hat) if ds <= dt else (s_hat, t_hat @ q.T)
    width = max(ds, dt)
    for scale, factor in (("element", 1.0), ("row", width**0.5)):
        got = build_adapter("procrustes", ds, dt, scale=scale)(s, t)
        for out, ref in zip(got, expected, strict=True):
            np.testing.assert_allclose(out.reshape(8, width).numpy(), ref * factor, atol=1e-5)


def test_procrustes_without_normalisation_uses_the_raw_rows() -> None:
    g = generator(8)
    s, t = (
        torch.randn(5, 4, generator=g, dtype=torch.float64),
        torch.randn(5, 6, generator=g, dtype=torch.float64),
    )
    mapped, target = build_adapter("procrustes", 4, 6, normalize="none", scale="element")(s, t)
    u, _, vh = torch.linalg.svd(s.T @ t, full_matrices=False)
    torch.testing.assert_close(mapped, s @ (u @ vh))
    torch.testing.assert_close(target, t)


def test_procrustes_on_bf16_features_computes_in_float32() -> None:
    g = generator(9)
    s, t = torch.randn(16, 8, generator=g), torch.randn(16, 12, generator=g)
    adapter = build_adapter("procrustes", 8, 12)
    low = adapter(s.bfloat16(), t.bfloat16())
    full = adapter(s, t)
    assert all(x.dtype == torch.float32 and torch.isfinite(x).all() for x in low)
    torch.testing.assert_close(mse(*low), mse(*full), atol=0.05, rtol=0.05)


def test_procrustes_handles_a_rank_deficient_covariance_and_a_failed_svd(monkeypatch) -> None:
    """Fewer rows than the student's width make C rank-deficient; a solver failure is retried in
    float64 on the CPU and gives the same result."""
    g = generator(10)
    s, t = torch.randn(3, 16, generator=g, requires_grad=True), torch.randn(3, 24, generator=g)
    adapter = build_adapter("procrustes", 16, 24)
    loss = mse(*adapter(s, t))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(s.grad).all()
    torch.testing.assert_close(loss.double(), procrustes_distance(s.double(), t.double()), atol=1e-5, rtol=0)

    real_svd, calls = torch.linalg.svd, []

    def flaky_svd(matrix, *args, **kwargs):
        calls.append(matrix.dtype)
        if matrix.dtype == torch.float32:
            raise torch.linalg.LinAlgError("linalg.svd: the algorithm failed to converge")
        return real_svd(matrix, *args, **kwargs)

    monkeypatch.setattr(torch.linalg, "svd", flaky_svd)
    retried = mse(*adapter(s.detach(), t))
    assert calls == [torch.float32, torch.float64]
    torch.testing.assert_close(retried, loss.detach(), atol=1e-6, rtol=0)


def test_procrustes_refuses_non_finite_features_with_a_clear_error() -> None:
    s = torch.randn(4, 8)
    s[1, 2] = float("nan")
    with pytest.raises(ValueError, match="procrustes: the cross-covariance of the features has non-finite"):
        build_adapter("procrustes", 8, 12, normalize="none")(s, torch.randn(4, 12))


def test_procrustes_through_the_svd_has_the_same_value_and_a_finite_gradient() -> None:
    g = generator(11)
    s, t = torch.randn(12, 6, generator=g, requires_grad=True), torch.randn(12, 9, generator=g)
    detached = mse(*build_adapter("procrustes", 6, 9)(s, t))
    through = mse(*build_adapter("procrustes", 6, 9, detach=False)(s, t))
    torch.testing.assert_close(through, detached)
    through.backward()
    assert torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0


@pytest.mark.parametrize(
    ("name", "options", "message"),
    [
        ("procrustes", {"normalize": "layer"}, r"normalize: expected one of \['row', 'none'\], got 'layer'"),
        ("procrustes", {"scale": "sum"}, r"scale: expected one of \['element', 'row'\], got 'sum'"),
        ("covariance", {"scale": "rows"}, r"scale: expected one of \['element', 'row'\], got 'rows'"),
    ],
)
def test_bad_options_name_the_option_and_the_choices(name: str, options: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build_adapter(name, 8, 12, **options)


@pytest.mark.parametrize("name", ["covariance", "procrustes"])
def test_row_scale_is_the_element_scale_times_the_width(name: str) -> None:
    g = generator(12)
    s, t = torch.randn(5, 3, 8, generator=g), torch.randn(5, 3, 12, generator=g)
    element = mse(*build_adapter(name, 8, 12, scale="element")(s, t))
    row = mse(*build_adapter(name, 8, 12, scale="row")(s, t))
    torch.testing.assert_close(row, element * 12)


def linear_cka_hsic(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """CKA = HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L)) with linear kernels (Kornblith et al., eq. 1-4)."""
    n = x.shape[0]
    h = torch.eye(n, dtype=x.dtype) - 1.0 / n

    def hsic(k: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        return torch.trace(k @ h @ m @ h)

    k, m = x @ x.T, y @ y.T
    return hsic(k, m) / torch.sqrt(hsic(k, k) * hsic(m, m))


def test_cka_with_mse_is_one_minus_linear_cka_and_its_cosine_is_cka() -> None:
    g = generator(13)
    s, t = (
        torch.randn(10, 4, 8, generator=g, dtype=torch.float64),
        torch.randn(10, 3, 12, generator=g, dtype=torch.float64),
    )
    expected = linear_cka_hsic(s.flatten(1), t.flatten(1))
    a, b = build_adapter("cka", 8, 12)(s, t)
    assert a.shape == b.shape == (10, 10)
    torch.testing.assert_close(mse(a, b), 1 - expected)
    torch.testing.assert_close(F.cosine_similarity(a.flatten(), b.flatten(), dim=0), expected)
    # the feature-space form of the same number: ‖YᵀX‖²_F / (‖XᵀX‖_F ‖YᵀY‖_F) on centred X, Y
    x, y = s.flatten(1) - s.flatten(1).mean(0), t.flatten(1) - t.flatten(1).mean(0)
    feature_form = (y.T @ x).norm() ** 2 / ((x.T @ x).norm() * (y.T @ y).norm())
    torch.testing.assert_close(feature_form, expected)


def test_cka_ignores_rotation_scale_and_offset_of_the_student() -> None:
    g = generator(14)
    t = torch.randn(9, 6, generator=g, dtype=torch.float64)
    rotation = torch.linalg.qr(torch.randn(6, 6, generator=g, dtype=torch.float64))[0]
    s = 4.0 * t @ rotation + 2.5
    assert mse(*build_adapter("cka", 6, 6)(s, t)).item() == pytest.approx(0.0, abs=1e-12)
    assert (
        mse(*build_adapter("cka", 6, 6)(torch.randn(9, 6, generator=g, dtype=torch.float64), t)).item() > 0.1
    )


def test_cka_refuses_two_samples_whose_loss_is_always_zero() -> None:
    adapter = build_adapter("cka", 8, 12)
    two_s, two_t = torch.randn(2, 8), torch.randn(2, 12)
    assert mse(*adapter.map(two_s, two_t)).item() == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="at least 3 samples"):
        adapter(two_s, two_t)


@pytest.mark.parametrize("name", ["procrustes", "cka"])
def test_the_gradient_reaches_the_student(name: str) -> None:
    g = generator(15)
    s, t = torch.randn(6, 8, generator=g, requires_grad=True), torch.randn(6, 12, generator=g)
    mse(*build_adapter(name, 8, 12)(s, t)).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
