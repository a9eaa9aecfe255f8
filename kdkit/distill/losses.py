"""Loss functions: logit KD (kl, dkd, dist, nkd), cross-entropy, and feature criteria (mse, smooth_l1,
cosine).

Logit losses live in the `LOGIT_LOSSES` registry, `fn(student_logits, teacher_logits, labels, tau,
**options) -> scalar`, with their options as keyword-only parameters (what `kdkit validate` checks a
recipe's `distill.logit_options` against); a recipe names one in `distill.logit_loss`. Feature
criteria live in `FEATURE_CRITERIA`, `fn(a, b, **options) -> scalar`, their options keyword-only
parameters too: a plugin adds its own with `registries.feature_criteria.add(name, fn)` and a recipe
names it in `distill.criterion`. A criterion whose `a` and `b` may differ in shape (a relation
criterion) sets `fn.same_shape = False`. `resolve_logit_loss` and `resolve_feature_criterion` check
a name and its options the same way (one helper, `_check_options`).

All are plain functions on tensors. Every logit loss applies τ² and averages over the batch; unlike
torchdistill's `KDLoss` and `LogitStdKDLoss`, which apply τ² only when their `alpha > 0` (`nkd`
follows its authors: τ² on its non-target term only). docs/methods.md gives each method's paper,
formula and reference test.
"""

from __future__ import annotations

import functools
import inspect
import numbers
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from kdkit.data.datasets import UNLABELED
from kdkit.registry import FEATURE_CRITERIA, LOGIT_LOSSES, did_you_mean

FeatureCriterion = Callable[[Tensor, Tensor], Tensor]
LogitLoss = Callable[..., Tensor]  # (student_logits, teacher_logits, labels, tau, **options) -> scalar

STANDARDIZE_EPS = 1e-7  # added to the std, as in the authors' code and torchdistill's LogitStdKDLoss
PEARSON_EPS = 1e-8  # cosine-similarity eps of DIST, as in the authors' code and torchdistill's DISTLoss


def _check_same_shape(name: str, a: Tensor, b: Tensor) -> None:
    # Broadcasting two different shapes would give a wrong loss silently.
    if a.shape != b.shape:
        raise ValueError(f"{name}: shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")


def kd_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """τ² · KL(softmax(t/τ) || softmax(s/τ)), averaged over the batch (Hinton et al., 2015)."""
    _check_same_shape("kd_loss", student_logits, teacher_logits)
    log_p_student = F.log_softmax(student_logits / temperature, dim=-1)
    p_teacher = F.softmax(teacher_logits / temperature, dim=-1)
    return F.kl_div(log_p_student, p_teacher, reduction="batchmean") * temperature**2


class OptionError(ValueError):
    """An unknown or bad option of a logit loss or a feature criterion; the message starts with
    `<option>: ` (so a caller can prefix the recipe key that holds the options)."""

    def __init__(self, option: str, message: str) -> None:
        super().__init__(f"{option}: {message}")
        self.option = option


# The name from before feature criteria had options; kdkit.run.checks and plugins catch it.
LogitOptionError = OptionError


def _check_weights(name: str, *, kind: str = "logit loss", **weights: Any) -> None:
    """Each weight option is a real number >= 0 (a recipe's `true` or `'8'` must not pass)."""
    for key, value in weights.items():
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or value < 0:
            raise OptionError(key, f"expected a number >= 0 for {kind} {name!r}, got {value!r}")


def _check_labels(name: str, logits: Tensor, labels: Tensor) -> None:
    """`labels` are class indices (B,) of `logits` (B, C): the methods that split off the target
    class cannot use soft labels."""
    if labels.dtype.is_floating_point or labels.shape != logits.shape[:1]:
        raise ValueError(
            f"{name}: expected integer class labels of shape {tuple(logits.shape[:1])}, "
            f"got {labels.dtype} {tuple(labels.shape)}"
        )


def standardize_logits(logits: Tensor) -> Tensor:
    """Z-score each row: (z - mean) / (std + eps), the unbiased std (Sun et al., CVPR 2024)."""
    return (logits - logits.mean(dim=-1, keepdim=True)) / (logits.std(dim=-1, keepdim=True) + STANDARDIZE_EPS)


@LOGIT_LOSSES.register("kl")
def kl(
    student_logits: Tensor, teacher_logits: Tensor, labels: Tensor, tau: float, *, standardize: bool = False
) -> Tensor:
    """`kd_loss`; with `standardize`, of both logits z-scored per sample first (logit
    standardisation, Sun et al., CVPR 2024). `labels` are unused."""
    if not isinstance(standardize, bool):
        raise OptionError("standardize", f"expected true/false for logit loss 'kl', got {standardize!r}")
    if standardize:
        student_logits, teacher_logits = (
            standardize_logits(student_logits),
            standardize_logits(teacher_logits),
        )
    return kd_loss(student_logits, teacher_logits, tau)


def _target_split(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """The target class's logit (B, 1) and the other classes' logits (B, C-1), in class order."""
    is_target = F.one_hot(labels, logits.shape[-1]).bool()
    return logits[is_target].view(-1, 1), logits[~is_target].view(logits.shape[0], -1)


def _kl_rows(log_p: Tensor, log_q: Tensor) -> Tensor:
    """KL(p || q) per row, from log-probabilities."""
    return (log_p.exp() * (log_p - log_q)).sum(dim=-1)


def _dkd_terms(
    student_logits: Tensor, teacher_logits: Tensor, labels: Tensor, tau: float
) -> tuple[Tensor, Tensor]:
    """Per-sample TCKD and NCKD of Zhao et al. (CVPR 2022), without τ².

    TCKD is the KL of the binary (target, not target) distributions at temperature τ; NCKD the KL
    of the distributions over the non-target classes, renormalised among themselves."""
    _check_same_shape("dkd", student_logits, teacher_logits)
    _check_labels("dkd", student_logits, labels)
    log_binary, log_others = [], []
    for logits in (teacher_logits, student_logits):
        target, others = _target_split(logits / tau, labels)
        total = torch.logsumexp(logits / tau, dim=-1, keepdim=True)
        rest = torch.logsumexp(others, dim=-1, keepdim=True)
        # log-space: log(1 - p_t) as logsumexp of the others, exact where p_t rounds to 1
        log_binary.append(torch.cat([target - total, rest - total], dim=-1))
        log_others.append(F.log_softmax(others, dim=-1))
    return _kl_rows(*log_binary), _kl_rows(*log_others)


@LOGIT_LOSSES.register("dkd")
def dkd(
    student_logits: Tensor,
    teacher_logits: Tensor,
    labels: Tensor,
    tau: float,
    *,
    alpha: float = 1.0,
    beta: float = 8.0,
) -> Tensor:
    """Decoupled KD (Zhao et al., CVPR 2022): τ² · mean(alpha · TCKD + beta · NCKD).

    mdistiller's warm-up factor (min(epoch / warmup, 1)) is not part of the loss."""
    _check_weights("dkd", alpha=alpha, beta=beta)
    tckd, nckd = _dkd_terms(student_logits, teacher_logits, labels, tau)
    return (alpha * tckd + beta * nckd).mean() * tau**2


def _pearson_rows(a: Tensor, b: Tensor) -> Tensor:
    """Pearson correlation of each row of `a` with the same row of `b`."""
    return F.cosine_similarity(
        a - a.mean(dim=-1, keepdim=True), b - b.mean(dim=-1, keepdim=True), dim=-1, eps=PEARSON_EPS
    )


@LOGIT_LOSSES.register("dist")
def dist(
    student_logits: Tensor,
    teacher_logits: Tensor,
    labels: Tensor,
    tau: float,
    *,
    beta: float = 1.0,
    gamma: float = 1.0,
) -> Tensor:
    """DIST (Huang et al., NeurIPS 2022): τ² · (beta · inter + gamma · intra), where inter is
    1 - the mean Pearson correlation of each sample's class probabilities (at temperature τ) and
    intra the same of each class's probabilities over the batch. `labels` are unused."""
    _check_weights("dist", beta=beta, gamma=gamma)
    _check_same_shape("dist", student_logits, teacher_logits)
    p_s, p_t = F.softmax(student_logits / tau, dim=-1), F.softmax(teacher_logits / tau, dim=-1)
    inter = 1 - _pearson_rows(p_s, p_t).mean()
    intra = 1 - _pearson_rows(p_s.T, p_t.T).mean()
    return (beta * inter + gamma * intra) * tau**2


@LOGIT_LOSSES.register("nkd")
def nkd(
    student_logits: Tensor,
    teacher_logits: Tensor,
    labels: Tensor,
    tau: float,
    *,
    gamma: float = 1.5,
) -> Tensor:
    """Normalized KD (Yang et al., ICCV 2023): target term + gamma · τ² · normalised non-target term.

    Per sample, with `y` the label: the target term is `-p_t[y] · log p_s[y]`, the probabilities at
    temperature 1 (whatever `tau`) and without τ²; the non-target term is the cross-entropy
    `-Σ_{i≠y} p̂_t[i] · log p̂_s[i]` of the non-target classes' distributions renormalised among
    themselves at temperature `tau`. Both are averaged over the batch.

    As the authors' code (yzd-v/cls_KD, `NKDLoss`): their `temp` is kdkit's `tau` and applies to
    the non-target term only, τ² multiplies that term only, and both terms are cross-entropies, not
    KL divergences (they differ by the teacher's entropy, a constant for the student: the gradient
    is the same, but the loss is not 0 when the student equals the teacher). `gamma` defaults to
    their 1.5 (their ImageNet ResNet-34 → ResNet-18 recipe, with `temp` 1: `distill.tau: 1`).
    `labels` must be class indices; the authors' argmax of soft labels is refused instead."""
    _check_weights("nkd", gamma=gamma)
    _check_same_shape("nkd", student_logits, teacher_logits)
    _check_labels("nkd", student_logits, labels)
    target = labels.view(-1, 1)
    # log_softmax, not log(softmax): finite where a probability rounds to 0 or 1
    log_p_s_target = F.log_softmax(student_logits, dim=-1).gather(1, target)
    p_t_target = F.softmax(teacher_logits, dim=-1).gather(1, target)
    target_term = -(p_t_target * log_p_s_target).mean()
    _, s_others = _target_split(student_logits / tau, labels)
    _, t_others = _target_split(teacher_logits / tau, labels)
    non_target = -(F.softmax(t_others, dim=-1) * F.log_softmax(s_others, dim=-1)).sum(dim=-1).mean()
    return target_term + gamma * tau**2 * non_target


def _keyword_options(fn: Callable[..., Any]) -> list[str] | None:
    """The keyword-only parameters of `fn` (its options); None when it takes any (**kwargs)."""
    params = inspect.signature(fn).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return None
    return [p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY]


def logit_loss_options(fn: LogitLoss) -> list[str] | None:
    """The options (keyword-only parameters) a logit loss takes; None when it takes any (**kwargs)."""
    return _keyword_options(fn)


def _check_options(
    kind: str, name: str, fn: Callable[..., Any], options: dict[str, Any], trial: Callable[..., Any]
) -> None:
    """Refuse an option `fn` (the `kind` registered as `name`) does not take, then call
    `trial(**options)` so that a bad value raises before any work starts.

    An unknown option raises `OptionError` with a did-you-mean and the valid options; the trial's
    own `OptionError`/`ValueError` pass through, a `TypeError` (a plugin refusing a value's type)
    becomes a ValueError naming the `kind` and `name`."""
    valid = _keyword_options(fn)
    for key in options:
        if valid is not None and key not in valid:
            raise OptionError(
                key,
                f"unknown option of {kind} {name!r}.{did_you_mean(key, valid)} "
                f"Its options: {', '.join(valid) or '(none)'}",
            )
    try:
        trial(**options)
    except TypeError as exc:
        raise ValueError(f"{kind} {name!r}: {exc}") from None


def resolve_logit_loss(name: str, options: dict[str, Any] | None = None) -> LogitLoss:
    """The logit loss registered as `name`, once `options` are known to suit it.

    An unknown name raises RegistryError listing the registered ones; an unknown option or a bad
    value (found by a trial call on two samples) an `OptionError` naming the option."""
    fn = LOGIT_LOSSES.get(name)
    logits, labels = torch.zeros(2, 3), torch.zeros(2, dtype=torch.long)
    _check_options(
        "logit loss", name, fn, options or {}, lambda **opts: fn(logits, logits, labels, 1.0, **opts)
    )
    return fn


def cross_entropy(logits: Tensor, labels: Tensor, label_smoothing: float = 0.0) -> Tensor:
    """Mean cross-entropy of `logits` (B, C) against integer `labels` (B,)."""
    return F.cross_entropy(logits, labels, label_smoothing=label_smoothing)


@FEATURE_CRITERIA.register("mse")
def mse(a: Tensor, b: Tensor) -> Tensor:
    """Mean squared error over all elements."""
    _check_same_shape("mse", a, b)
    return F.mse_loss(a, b)


@FEATURE_CRITERIA.register("smooth_l1")
def smooth_l1(a: Tensor, b: Tensor, *, beta: float = 1.0) -> Tensor:
    """Smooth L1 (Huber) averaged over all elements: quadratic below `beta`, linear above (0: L1)."""
    _check_weights("smooth_l1", kind="feature criterion", beta=beta)
    _check_same_shape("smooth_l1", a, b)
    return F.smooth_l1_loss(a, b, beta=beta)


@FEATURE_CRITERIA.register("cosine")
def cosine(a: Tensor, b: Tensor, *, eps: float = 1e-8) -> Tensor:
    """1 - cosine similarity along the last dimension, averaged over the other dimensions; `eps`
    bounds each norm from below (`F.cosine_similarity`'s default)."""
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or eps <= 0:
        raise OptionError("eps", f"expected a number > 0 for feature criterion 'cosine', got {eps!r}")
    _check_same_shape("cosine", a, b)
    return (1 - F.cosine_similarity(a, b, dim=-1, eps=eps)).mean()


def criterion_same_shape(fn: Callable[..., Any]) -> bool:
    """Whether the criterion `fn` needs `a` and `b` of the same shape: its attribute `same_shape`,
    True unless set (a relation criterion sets False), read through `functools.partial` too."""
    while not hasattr(fn, "same_shape") and isinstance(fn, functools.partial):
        fn = fn.func
    return bool(getattr(fn, "same_shape", True))


def resolve_feature_criterion(name: str, options: dict[str, Any] | None = None) -> FeatureCriterion:
    """The feature criterion registered as `name`, with `options` bound (`functools.partial`; the
    function itself when there are none). The result keeps the function's `same_shape`.

    An unknown name raises RegistryError listing the registered ones; an unknown option or a bad
    value (found by a trial call on two (2, 2, 4) tensors, made only when options are given) an
    `OptionError` naming the option."""
    fn = FEATURE_CRITERIA.get(name)
    if not options:  # nothing to check: no trial call, which a plugin's criterion may not expect
        return fn
    gen = torch.Generator().manual_seed(0)  # random, not zeros: a criterion may divide by a norm
    a, b = torch.randn(2, 2, 4, generator=gen), torch.randn(2, 2, 4, generator=gen)
    _check_options("feature criterion", name, fn, options, lambda **opts: fn(a, b, **opts))
    bound = functools.update_wrapper(functools.partial(fn, **options), fn)
    bound.same_shape = criterion_same_shape(fn)  # type: ignore[attr-defined]
    return bound


def criterion_min_batch(name: str) -> int:
    """The smallest batch the criterion registered as `name` gives a non-zero loss for (its
    `min_batch` attribute, default 1; relational KD compares samples, so it needs several)."""
    return getattr(FEATURE_CRITERIA.get(name), "min_batch", 1)


def build_feature_criterion(name: str) -> FeatureCriterion:
    """The feature criterion registered as `name`, without options (RegistryError listing valid
    names if unknown); `resolve_feature_criterion(name)`."""
    return resolve_feature_criterion(name)


def labeled_cross_entropy(
    logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0
) -> torch.Tensor:
    """Cross-entropy averaged over the samples that have a label (not `UNLABELED`); 0, with the
    graph kept, for a batch that has none."""
    labeled = labels != UNLABELED
    if labeled.all():
        return cross_entropy(logits, labels, label_smoothing)
    if not labeled.any():
        return logits.sum() * 0.0
    return cross_entropy(logits[labeled], labels[labeled], label_smoothing)
