"""How several teachers' logits combine (kdkit.distill.teacher_ensemble): values and gradients of
`ensemble`, `weighted` and `ca_mkd` against the papers' formulas written here with plain torch ops
(float64, 2 and 3 teachers, unequal weights, unlabelled samples), the single- and identical-teacher
identities, every logit loss on the ensemble target, and the checks of the options."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from kdkit.data.datasets import UNLABELED
from kdkit.distill.losses import LOGIT_LOSSES, OptionError, resolve_logit_loss
from kdkit.distill.teacher_ensemble import TeacherCombiner, ca_mkd_weights
from kdkit.registry import TEACHER_COMBINERS, Registries, RegistryError

B, C, TAU = 6, 5, 2.0
WEIGHTS = {2: [1.0, 3.0], 3: [0.2, 0.3, 0.5]}  # unequal on purpose, the last teacher's the largest
UNLABELLED_ROWS = [1, 4]


def _logits(n_teachers: int, seed: int = 0) -> tuple[Tensor, list[Tensor], Tensor]:
    """Student logits (requiring grad), teachers' logits and labels with two unlabelled samples, for
    which teacher k predicts class k (so that the ensemble's class, the last teacher's with
    `WEIGHTS`, is not the first teacher's)."""
    gen = torch.Generator().manual_seed(seed)
    student = torch.randn(B, C, generator=gen, dtype=torch.float64).requires_grad_()
    teachers = [2 * torch.randn(B, C, generator=gen, dtype=torch.float64) for _ in range(n_teachers)]
    for k, z in enumerate(teachers):
        z[UNLABELLED_ROWS, k] += 8.0
    labels = torch.randint(0, C, (B,), generator=gen)
    labels[UNLABELLED_ROWS] = UNLABELED
    return student, teachers, labels


def _run(rule: str, loss: str, student: Tensor, teachers: list[Tensor], labels: Tensor, **kw) -> tuple:
    """(value, gradient w.r.t. the student, per-sample weights) of a combiner."""
    out = TeacherCombiner(rule, loss, **kw)(student, teachers, labels, TAU)
    (grad,) = torch.autograd.grad(out.loss, student)
    return out.loss, grad, out.weights


def _reference_grad(value: Tensor, student: Tensor) -> Tensor:
    (grad,) = torch.autograd.grad(value, student)
    return grad


# -- the papers' formulas, from plain torch ops ------------------------------------------------------


def _softmax(z: Tensor, tau: float = 1.0) -> Tensor:
    e = (z / tau - (z / tau).max(dim=-1, keepdim=True).values).exp()
    return e / e.sum(dim=-1, keepdim=True)


def _kl_rows(p: Tensor, q: Tensor) -> Tensor:
    return (p * (p.log() - q.log())).sum(dim=-1)


def _average(teachers: list[Tensor], weights: list[float]) -> Tensor:
    """p̄ = Σ_k w_k softmax(z_k / τ) / Σ_k w_k (Hinton et al., 2015)."""
    return sum(w * _softmax(z, TAU) for w, z in zip(weights, teachers, strict=True)) / sum(weights)


def _filled(labels: Tensor, p: Tensor) -> Tensor:
    """The label, or for an unlabelled sample the class `p` predicts."""
    return torch.where(labels == UNLABELED, p.argmax(dim=-1), labels)


def _drop_target(p: Tensor, labels: Tensor) -> Tensor:
    keep = torch.ones_like(p, dtype=torch.bool)
    keep[torch.arange(len(labels)), labels] = False
    return p[keep].view(len(labels), -1)


def _dkd_reference(p_s: Tensor, p_t: Tensor, labels: Tensor, alpha=1.0, beta=8.0) -> Tensor:
    """Zhao et al. 2022: τ² · mean(alpha · KL(b_t ‖ b_s) + beta · KL(p̂_t ‖ p̂_s))."""
    rows = torch.arange(len(labels))
    b_s = torch.stack([p_s[rows, labels], 1 - p_s[rows, labels]], dim=-1)
    b_t = torch.stack([p_t[rows, labels], 1 - p_t[rows, labels]], dim=-1)
    hat_s, hat_t = _drop_target(p_s, labels), _drop_target(p_t, labels)
    hat_s, hat_t = hat_s / hat_s.sum(-1, keepdim=True), hat_t / hat_t.sum(-1, keepdim=True)
    return TAU**2 * (alpha * _kl_rows(b_t, b_s) + beta * _kl_rows(hat_t, hat_s)).mean()


def _pearson(a: Tensor, b: Tensor) -> Tensor:
    a, b = a - a.mean(-1, keepdim=True), b - b.mean(-1, keepdim=True)
    return (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))


# -- ensemble ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("n_teachers", [2, 3])
def test_ensemble_kl_is_kl_from_the_averaged_probabilities(n_teachers):
    student, teachers, labels = _logits(n_teachers)
    value, grad, weights = _run("ensemble", "kl", student, teachers, labels, weights=WEIGHTS[n_teachers])
    p_bar, p_s = _average(teachers, WEIGHTS[n_teachers]), _softmax(student, TAU)
    torch.testing.assert_close(value, TAU**2 * _kl_rows(p_bar, p_s).mean())
    # d/ds of τ² · KL(p̄ ‖ softmax(s/τ)) / B is τ · (p_s − p̄) / B
    torch.testing.assert_close(grad, TAU * (p_s - p_bar).detach() / B)
    w = torch.tensor(WEIGHTS[n_teachers], dtype=torch.float64)
    torch.testing.assert_close(weights, (w / w.sum()).expand(B, -1))


def test_ensemble_standardized_kl_standardises_the_pseudo_logits():
    """`standardize` z-scores z̄ = τ · log p̄: not the average of the standardised teachers."""
    student, teachers, labels = _logits(3)
    value, grad, _ = _run(
        "ensemble", "kl", student, teachers, labels, weights=WEIGHTS[3], logit_options={"standardize": True}
    )

    def z_score(z):
        return (z - z.mean(-1, keepdim=True)) / (z.std(-1, keepdim=True) + 1e-7)

    pseudo = TAU * _average(teachers, WEIGHTS[3]).log()
    reference = TAU**2 * _kl_rows(_softmax(z_score(pseudo), TAU), _softmax(z_score(student), TAU)).mean()
    torch.testing.assert_close(value, reference)
    torch.testing.assert_close(grad, _reference_grad(reference, student))
    averaged_standardised = sum(
        w * _softmax(z_score(z), TAU) for w, z in zip(WEIGHTS[3], teachers, strict=True)
    ) / sum(WEIGHTS[3])
    assert not torch.allclose(_softmax(z_score(pseudo), TAU), averaged_standardised)


@pytest.mark.parametrize("n_teachers", [2, 3])
def test_ensemble_dkd_decouples_the_averaged_probabilities(n_teachers):
    """TCKD and NCKD of p̄; an unlabelled sample takes the ensemble's predicted class."""
    student, teachers, labels = _logits(n_teachers)
    options = {"alpha": 0.5, "beta": 2.0}
    value, grad, _ = _run(
        "ensemble", "dkd", student, teachers, labels, weights=WEIGHTS[n_teachers], logit_options=options
    )
    p_bar = _average(teachers, WEIGHTS[n_teachers])
    reference = _dkd_reference(_softmax(student, TAU), p_bar, _filled(labels, p_bar), **options)
    torch.testing.assert_close(value, reference)
    torch.testing.assert_close(grad, _reference_grad(reference, student))


def test_ensemble_dist_correlates_with_the_averaged_probabilities():
    student, teachers, labels = _logits(3)
    value, grad, _ = _run(
        "ensemble", "dist", student, teachers, labels, weights=WEIGHTS[3], logit_options={"gamma": 2.0}
    )
    p_bar, p_s = _average(teachers, WEIGHTS[3]), _softmax(student, TAU)
    inter, intra = 1 - _pearson(p_s, p_bar).mean(), 1 - _pearson(p_s.T, p_bar.T).mean()
    reference = TAU**2 * (inter + 2.0 * intra)
    torch.testing.assert_close(value, reference)
    torch.testing.assert_close(grad, _reference_grad(reference, student))


@pytest.mark.parametrize("tau", [1.0, TAU])
def test_ensemble_nkd_target_term_sees_the_average_sharpened_back_to_temperature_1(tau):
    """nkd's target term takes softmax(z̄) = p̄^τ / Σ p̄^τ (p̄ averaged at τ): the average of the
    teachers' temperature-1 probabilities when τ = 1 only. Its non-target term sees p̄'s."""
    student, teachers, labels = _logits(2)
    out = TeacherCombiner("ensemble", "nkd", weights=WEIGHTS[2])(student, teachers, labels, tau)
    weights = torch.tensor(WEIGHTS[2], dtype=torch.float64) / sum(WEIGHTS[2])
    p_bar = sum(w * _softmax(z, tau) for w, z in zip(weights, teachers, strict=True))
    sharpened = p_bar**tau / (p_bar**tau).sum(-1, keepdim=True)
    y = _filled(labels, p_bar)
    rows = torch.arange(B)
    target = -(sharpened[rows, y] * _softmax(student)[rows, y].log()).mean()
    hat_t, hat_s = _drop_target(p_bar, y), _drop_target(_softmax(student, tau), y)
    hat_t, hat_s = hat_t / hat_t.sum(-1, keepdim=True), hat_s / hat_s.sum(-1, keepdim=True)
    reference = target + 1.5 * tau**2 * -(hat_t * hat_s.log()).sum(-1).mean()
    torch.testing.assert_close(out.loss, reference)
    torch.testing.assert_close(_reference_grad(out.loss, student), _reference_grad(reference, student))
    if tau == 1.0:
        torch.testing.assert_close(
            sharpened, sum(w * _softmax(z) for w, z in zip(weights, teachers, strict=True))
        )


def test_ensemble_ignores_a_teacher_of_weight_0():
    student, teachers, labels = _logits(3)
    with_zero = TeacherCombiner("ensemble", "dkd", weights=[0.2, 0.0, 0.5])(student, teachers, labels, TAU)
    without = TeacherCombiner("ensemble", "dkd", weights=[0.2, 0.5])(student, teachers[::2], labels, TAU)
    torch.testing.assert_close(with_zero.loss, without.loss)


# -- weighted ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("n_teachers", [2, 3])
def test_weighted_averages_the_per_teacher_kl(n_teachers):
    student, teachers, labels = _logits(n_teachers)
    weights = WEIGHTS[n_teachers]
    value, grad, logged = _run("weighted", "kl", student, teachers, labels, weights=weights)
    p_s = _softmax(student, TAU)
    terms = [TAU**2 * _kl_rows(_softmax(z, TAU), p_s).mean() for z in teachers]
    torch.testing.assert_close(value, sum(w * t for w, t in zip(weights, terms, strict=True)) / sum(weights))
    # the gradient of Σ_k w_k KL_k / Σ w equals the ensemble's: τ · (p_s − p̄) / B
    torch.testing.assert_close(grad, TAU * (p_s - _average(teachers, weights)).detach() / B)
    assert logged.shape == (B, n_teachers)


def test_weighted_gives_each_teacher_its_own_class_for_unlabelled_samples():
    student, teachers, labels = _logits(2)
    value, grad, _ = _run("weighted", "dkd", student, teachers, labels, weights=WEIGHTS[2])
    p_s = _softmax(student, TAU)
    terms = [_dkd_reference(p_s, _softmax(z, TAU), _filled(labels, z)) for z in teachers]
    reference = sum(w * t for w, t in zip(WEIGHTS[2], terms, strict=True)) / sum(WEIGHTS[2])
    torch.testing.assert_close(value, reference)
    torch.testing.assert_close(grad, _reference_grad(reference, student))


# -- CA-MKD -----------------------------------------------------------------------------------------


def _ca_mkd_reference_weights(teachers: list[Tensor], labels: Tensor) -> Tensor:
    """Zhang et al. 2022: w_k = (1 − exp(CE_k) / Σ_j exp(CE_j)) / (K − 1), CE_k = −log softmax(z_k)[y];
    1/K each for an unlabelled sample (kdkit's choice: no label, no CE)."""
    rows, y = torch.arange(len(labels)), labels.clamp(min=0)
    ce = torch.stack([-_softmax(z)[rows, y].log() for z in teachers], dim=-1)
    w = (1 - ce.exp() / ce.exp().sum(-1, keepdim=True)) / (len(teachers) - 1)
    w[labels == UNLABELED] = 1 / len(teachers)
    return w


@pytest.mark.parametrize("n_teachers", [2, 3])
def test_ca_mkd_matches_the_paper_formula(n_teachers):
    student, teachers, labels = _logits(n_teachers)
    value, grad, weights = _run("ca_mkd", "kl", student, teachers, labels)
    w = _ca_mkd_reference_weights(teachers, labels)
    p_s, p_k = _softmax(student, TAU), [_softmax(z, TAU) for z in teachers]
    kl = torch.stack([TAU**2 * _kl_rows(p, p_s) for p in p_k], dim=-1)  # (B, K)
    torch.testing.assert_close(weights, w)
    torch.testing.assert_close(weights.sum(-1), torch.ones(B, dtype=torch.float64))
    torch.testing.assert_close(value, (w * kl).sum(-1).mean())
    # weights are constants: d/ds_i = τ · (p_s,i − Σ_k w_ik p_k,i) / B
    mixed = sum(w[:, k : k + 1] * p for k, p in enumerate(p_k))
    torch.testing.assert_close(grad, TAU * (p_s - mixed).detach() / B)


def test_ca_mkd_is_k_times_the_authors_reduction():
    """The authors' code (Rorozhl/CA-MKD, helper/loops.py) divides Σ_i Σ_k w_ik KL_ik by B · K."""
    student, teachers, labels = _logits(3, seed=1)
    labels = labels.clamp(min=0)  # their code has no unlabelled samples
    value = TeacherCombiner("ca_mkd", "kl")(student, teachers, labels, TAU).loss
    p_s = _softmax(student, TAU)
    kl = torch.stack([TAU**2 * _kl_rows(_softmax(z, TAU), p_s) for z in teachers])  # (K, B)
    authors = (_ca_mkd_reference_weights(teachers, labels).T * kl).sum() / (B * 3)
    torch.testing.assert_close(value, 3 * authors)


def test_ca_mkd_weights_favour_the_teacher_right_on_the_label_and_carry_no_gradient():
    labels = torch.tensor([0, 1])
    right = torch.tensor([[5.0, 0.0, 0.0], [0.0, 5.0, 0.0]], requires_grad=True)
    wrong = torch.tensor([[0.0, 5.0, 0.0], [5.0, 0.0, 0.0]], requires_grad=True)
    weights = ca_mkd_weights([right, wrong], labels)
    assert (weights[:, 0] > 0.99).all() and not weights.requires_grad


def test_ca_mkd_takes_standardised_kl():
    student, teachers, labels = _logits(2)
    value = TeacherCombiner("ca_mkd", "kl", {"standardize": True})(student, teachers, labels, TAU).loss
    w = _ca_mkd_reference_weights(teachers, labels)
    kl = resolve_logit_loss("kl")
    per_sample = torch.stack(
        [
            torch.stack(
                [kl(student[i : i + 1], z[i : i + 1], labels, TAU, standardize=True) for z in teachers]
            )
            for i in range(B)
        ]
    )
    torch.testing.assert_close(value, (w * per_sample).sum(-1).mean())


# -- identities and every logit loss ----------------------------------------------------------------


def _pairs() -> list[tuple[str, str]]:
    """Every (rule, logit loss) that a combiner accepts."""
    return [
        (rule, loss)
        for rule in TEACHER_COMBINERS
        for loss in LOGIT_LOSSES
        if loss in getattr(TEACHER_COMBINERS.get(rule), "logit_losses", (loss,))
    ]


@pytest.mark.parametrize(("rule", "loss"), _pairs())
def test_one_teacher_is_the_single_teacher_loss_bit_for_bit(rule, loss):
    student, (teacher,), labels = _logits(1)
    out = TeacherCombiner(rule, loss, weights=[0.3])(student, [teacher], labels, TAU)
    single = resolve_logit_loss(loss)(student, teacher, _filled(labels, teacher), TAU)
    assert torch.equal(out.loss, single)
    assert torch.equal(out.weights, torch.ones(B, 1, dtype=torch.float64))


@pytest.mark.parametrize(("rule", "loss"), _pairs())
def test_identical_teachers_are_one_teacher(rule, loss):
    student, (teacher,), labels = _logits(1)
    combined = TeacherCombiner(rule, loss)(student, [teacher] * 3, labels, TAU).loss
    single = resolve_logit_loss(loss)(student, teacher, _filled(labels, teacher), TAU)
    torch.testing.assert_close(combined, single)
    torch.testing.assert_close(_reference_grad(combined, student), _reference_grad(single, student))


@pytest.mark.parametrize("loss", LOGIT_LOSSES.names())
def test_every_logit_loss_takes_the_ensemble_target(loss):
    student, teachers, labels = _logits(3)
    # far-apart logits: a softened probability underflows in float32, the pseudo-logits stay finite
    teachers = [(50 * z).float() for z in teachers]
    student32 = student.detach().float().requires_grad_()
    value = TeacherCombiner("ensemble", loss, weights=WEIGHTS[3])(student32, teachers, labels, TAU).loss
    (grad,) = torch.autograd.grad(value, student32)
    assert value.isfinite() and grad.isfinite().all() and grad.abs().sum() > 0


# -- checks -----------------------------------------------------------------------------------------


def test_registry_lists_the_rules_and_suggests_the_closest():
    assert Registries().teacher_combiners is TEACHER_COMBINERS
    assert {"ensemble", "weighted", "ca_mkd"} <= set(TEACHER_COMBINERS.names())
    with pytest.raises(
        RegistryError, match=r"unknown teacher combiner 'ensembel'\. Did you mean 'ensemble'\?"
    ):
        TeacherCombiner("ensembel")


@pytest.mark.parametrize(
    ("weights", "message"),
    [
        ([1.0, -0.5], r"weights: teacher 1: expected a number >= 0, got -0.5"),
        ([0, 0.0], r"weights: all are 0 \(\[0, 0.0\]\): at least one teacher needs a weight > 0"),
        ([1.0, True], r"weights: teacher 1: expected a number >= 0, got True"),
        ([1.0, float("nan")], r"weights: teacher 1: expected a number >= 0, got nan"),
        ("1,2", r"weights: expected a list of numbers >= 0, one per teacher, got '1,2'"),
        ([], r"weights: expected a list of numbers >= 0, one per teacher, got \[\]"),
    ],
)
def test_bad_weights_are_refused(weights, message):
    with pytest.raises(OptionError, match=message):
        TeacherCombiner("ensemble", weights=weights)


def test_teachers_of_another_class_count_are_named():
    student, teachers, labels = _logits(3)
    teachers[2] = teachers[2][:, :3]
    with pytest.raises(ValueError, match=r"teacher 2's logits have shape \(6, 3\), the student's \(6, 5\)"):
        TeacherCombiner("weighted")(student, teachers, labels, TAU)


def test_as_many_teachers_as_weights():
    student, teachers, labels = _logits(3)
    with pytest.raises(ValueError, match=r"3 teachers' logits for 2 weights"):
        TeacherCombiner("ensemble", weights=[1.0, 2.0])(student, teachers, labels, TAU)


def test_ca_mkd_refuses_what_it_cannot_use():
    with pytest.raises(
        ValueError, match=r"teacher combiner 'ca_mkd' works with logit loss 'kl' only, got 'dkd'"
    ):
        TeacherCombiner("ca_mkd", "dkd")
    with pytest.raises(OptionError, match=r"weights: teacher combiner 'ca_mkd' computes each sample's"):
        TeacherCombiner("ca_mkd", weights=[1.0, 2.0])
    TeacherCombiner("ca_mkd", weights=[2.0, 2.0])  # equal weights change nothing: accepted


def test_logit_options_are_checked_by_the_logit_loss():
    with pytest.raises(
        OptionError, match=r"alfa: unknown option of logit loss 'dkd'\. Did you mean 'alpha'\?"
    ):
        TeacherCombiner("ensemble", "dkd", {"alfa": 1.0})
