"""How several teachers' logits combine into one KD term (issue 28): named rules in
`kdkit.registry.TEACHER_COMBINERS`, each working with a logit loss of `LOGIT_LOSSES`.

`TeacherCombiner(rule, logit_loss, logit_options, weights)` checks everything once; calling it with
the student's logits, a list of the teachers' logits (each (B, C)), the labels and τ returns a
`CombinedKD`: the KD term (a scalar) and the weight each teacher had for each sample (B, K), for
logging; `each` gives the logit loss against each teacher alone, also for logging. Built-in rules:

- `ensemble`: the logit loss against the weighted average of the teachers' softened probabilities
  (Hinton et al., 2015), given to the loss as the pseudo-logits `τ · log p̄` (`ensemble_logits`);
- `weighted`: the weighted average of the logit loss against each teacher;
- `ca_mkd`: CA-MKD (Zhang et al., ICASSP 2022), per-sample weights from each teacher's
  cross-entropy on the label, on per-sample KL terms (logit loss `kl` only).

With one teacher every rule is the single-teacher logit loss, bit for bit. A sample labelled
`UNLABELED` gets the predicted class of the teacher(s) its rule compares it with, as with one
teacher; `ca_mkd` gives its teachers equal weights. docs/methods.md gives the formulas and tests.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from kdkit.data.datasets import UNLABELED
from kdkit.distill.losses import LogitLoss, OptionError, resolve_logit_loss, standardize_logits
from kdkit.registry import TEACHER_COMBINERS

__all__ = [
    "TEACHER_COMBINERS",
    "CombinedKD",
    "LogitTerm",
    "TeacherCombiner",
    "ca_mkd_weights",
    "ensemble_logits",
]


@dataclass(frozen=True)
class CombinedKD:
    """What a combination rule returns: `loss`, the KD term (a scalar tensor), and `weights`, the
    weight of each teacher for each sample (B, K), each row summing to 1, detached (for logging)."""

    loss: Tensor
    weights: Tensor


@dataclass(frozen=True)
class LogitTerm:
    """A logit loss of `LOGIT_LOSSES` with its options bound: `term(s, t, labels, tau)`."""

    name: str
    fn: LogitLoss
    options: dict[str, Any] = field(default_factory=dict)

    def __call__(self, student_logits: Tensor, teacher_logits: Tensor, labels: Tensor, tau: float) -> Tensor:
        return self.fn(student_logits, teacher_logits, labels, tau, **self.options)


def _labels_or_prediction(labels: Tensor, logits: Tensor) -> Tensor:
    """`labels`, with each `UNLABELED` sample's replaced by the class `logits` predict (the logit
    losses that split off the target class need one)."""
    return torch.where(labels == UNLABELED, logits.argmax(dim=-1), labels)


def _check_weights(weights: Sequence[float]) -> list[float]:
    """Per-teacher weights: finite real numbers >= 0, not all 0."""
    if isinstance(weights, str | bytes) or not isinstance(weights, Sequence) or not weights:
        raise OptionError("weights", f"expected a list of numbers >= 0, one per teacher, got {weights!r}")
    for k, w in enumerate(weights):
        if isinstance(w, bool) or not isinstance(w, numbers.Real) or not math.isfinite(w) or w < 0:
            raise OptionError("weights", f"teacher {k}: expected a number >= 0, got {w!r}")
    if not any(weights):
        raise OptionError("weights", f"all are 0 ({list(weights)}): at least one teacher needs a weight > 0")
    return [float(w) for w in weights]


def _check_teacher_logits(
    student_logits: Tensor, teacher_logits: Sequence[Tensor], n_weights: int | None
) -> None:
    """One (B, C) logit tensor per teacher, each of the student's shape, and one per weight."""
    if not teacher_logits:
        raise ValueError("teacher combiner: no teacher logits given")
    if n_weights is not None and len(teacher_logits) != n_weights:
        raise ValueError(f"teacher combiner: {len(teacher_logits)} teachers' logits for {n_weights} weights")
    for k, logits in enumerate(teacher_logits):
        if logits.shape != student_logits.shape:
            raise ValueError(
                f"teacher {k}'s logits have shape {tuple(logits.shape)}, the student's "
                f"{tuple(student_logits.shape)}: every teacher needs the student's (batch, classes)"
            )


def ensemble_logits(teacher_logits: Sequence[Tensor], weights: Tensor, tau: float) -> Tensor:
    """Pseudo-logits `z̄ = τ · log Σ_k w_k softmax(z_k / τ)` of the weighted average `p̄` of the
    teachers' softened probabilities (`weights` (K,) summing to 1): `softmax(z̄ / τ) = p̄` exactly.

    Computed in log space (logsumexp of log-probabilities): finite where a probability underflows."""
    log_p = torch.stack([F.log_softmax(z / tau, dim=-1) for z in teacher_logits])  # (K, B, C)
    return tau * torch.logsumexp(log_p + weights.log().view(-1, 1, 1), dim=0)


def _same_weights(weights: Tensor, batch: int) -> Tensor:
    """The per-teacher weights (K,) as every sample's (B, K)."""
    return weights.detach().expand(batch, -1)


@TEACHER_COMBINERS.register("ensemble")
def ensemble(
    student_logits: Tensor,
    teacher_logits: list[Tensor],
    labels: Tensor,
    tau: float,
    weights: Tensor,
    term: LogitTerm,
) -> CombinedKD:
    """The logit loss against the ensemble's pseudo-logits `ensemble_logits` (unlabelled samples
    take the ensemble's predicted class)."""
    target = ensemble_logits(teacher_logits, weights, tau)
    loss = term(student_logits, target, _labels_or_prediction(labels, target), tau)
    return CombinedKD(loss, _same_weights(weights, len(labels)))


@TEACHER_COMBINERS.register("weighted")
def weighted(
    student_logits: Tensor,
    teacher_logits: list[Tensor],
    labels: Tensor,
    tau: float,
    weights: Tensor,
    term: LogitTerm,
) -> CombinedKD:
    """`Σ_k w_k · loss(s, z_k)` (`weights` summing to 1); an unlabelled sample takes each teacher's
    own predicted class in that teacher's term."""
    losses = _each_teacher(term, student_logits, teacher_logits, labels, tau)
    return CombinedKD((weights * torch.stack(losses)).sum(), _same_weights(weights, len(labels)))


def _each_teacher(
    term: LogitTerm, student_logits: Tensor, teacher_logits: Sequence[Tensor], labels: Tensor, tau: float
) -> list[Tensor]:
    """The logit loss against each teacher alone (an unlabelled sample takes that teacher's class)."""
    return [term(student_logits, z, _labels_or_prediction(labels, z), tau) for z in teacher_logits]


def _kl_per_sample(student_logits: Tensor, teacher_logits: Tensor, tau: float, standardize: bool) -> Tensor:
    """`τ² · KL(p_t ‖ p_s)` of each sample (B,): the terms logit loss `kl` averages."""
    if standardize:
        student_logits, teacher_logits = (
            standardize_logits(student_logits),
            standardize_logits(teacher_logits),
        )
    log_p_s = F.log_softmax(student_logits / tau, dim=-1)
    log_p_t = F.log_softmax(teacher_logits / tau, dim=-1)
    return (log_p_t.exp() * (log_p_t - log_p_s)).sum(dim=-1) * tau**2


def ca_mkd_weights(teacher_logits: Sequence[Tensor], labels: Tensor) -> Tensor:
    """CA-MKD's weights (B, K): `(1 − softmax_k(CE_k)) / (K − 1)`, `CE_k` teacher k's cross-entropy
    on the label (temperature 1); equal weights `1/K` for an unlabelled sample. Detached. Needs
    K >= 2 (with one teacher the formula is 0/0; `TeacherCombiner` then uses the teacher's loss)."""
    n_teachers = len(teacher_logits)
    labeled = labels != UNLABELED
    safe_labels = torch.where(labeled, labels, 0)  # any class: the row is replaced below
    ce = torch.stack(
        [F.cross_entropy(z.detach(), safe_labels, reduction="none") for z in teacher_logits], dim=-1
    )
    weights = (1 - F.softmax(ce, dim=-1)) / (n_teachers - 1)
    return torch.where(labeled.unsqueeze(-1), weights, 1.0 / n_teachers)


@TEACHER_COMBINERS.register("ca_mkd")
def ca_mkd(
    student_logits: Tensor,
    teacher_logits: list[Tensor],
    labels: Tensor,
    tau: float,
    weights: Tensor,
    term: LogitTerm,
) -> CombinedKD:
    """CA-MKD: `mean_i Σ_k w_k(x_i) · τ² · KL(p_k ‖ p_s)(x_i)` with `ca_mkd_weights` (the paper's
    formula; the authors' code divides by K once more). `weights` are equal (checked)."""
    sample_weights = ca_mkd_weights(teacher_logits, labels)
    standardize = term.options.get("standardize", False)
    kl = torch.stack([_kl_per_sample(student_logits, z, tau, standardize) for z in teacher_logits], dim=-1)
    return CombinedKD((sample_weights * kl).sum(dim=-1).mean(), sample_weights)


ca_mkd.logit_losses = ("kl",)  # type: ignore[attr-defined]  # it needs per-sample KL terms
ca_mkd.own_weights = True  # type: ignore[attr-defined]  # per-teacher weights do not apply


class TeacherCombiner:
    """Combines several teachers' logits into one KD term by the rule named `rule` of
    `TEACHER_COMBINERS`, with the logit loss `logit_loss` of `LOGIT_LOSSES` and its `logit_options`.

    `weights`: one number >= 0 per teacher (normalised to sum 1), default equal. Everything is
    checked here, before any work: an unknown rule or loss raises `RegistryError` (did-you-mean),
    a bad option or weight `OptionError` (`weights: ...`), a rule that cannot use the loss or the
    weights `ValueError`. A rule's attributes say what it takes: `logit_losses` (the names it
    works with; all when absent) and `own_weights` (True: it computes its own, so only equal
    per-teacher weights are accepted).
    """

    def __init__(
        self,
        rule: str = "ensemble",
        logit_loss: str = "kl",
        logit_options: dict[str, Any] | None = None,
        weights: Sequence[float] | None = None,
    ) -> None:
        self.rule_name = rule
        self.rule: Callable[..., CombinedKD] = TEACHER_COMBINERS.get(rule)
        self.term = LogitTerm(
            logit_loss, resolve_logit_loss(logit_loss, logit_options), dict(logit_options or {})
        )
        self.weights = None if weights is None else _check_weights(weights)
        self._check_rule_fits()

    def _check_rule_fits(self) -> None:
        """The rule works with this logit loss and these weights (its attributes say)."""
        losses = getattr(self.rule, "logit_losses", None)
        if losses is not None and self.term.name not in losses:
            raise ValueError(
                f"teacher combiner {self.rule_name!r} works with logit loss {', '.join(map(repr, losses))} "
                f"only, got {self.term.name!r}"
            )
        if getattr(self.rule, "own_weights", False) and self.weights and len(set(self.weights)) > 1:
            raise OptionError(
                "weights",
                f"teacher combiner {self.rule_name!r} computes each sample's teacher weights itself; "
                f"it takes no per-teacher weights, got {self.weights}",
            )

    def __call__(
        self, student_logits: Tensor, teacher_logits: Sequence[Tensor], labels: Tensor, tau: float
    ) -> CombinedKD:
        """The combined KD term of the teachers' logits (each (B, C), the student's shape);
        `labels` (B,) may hold `UNLABELED`."""
        _check_teacher_logits(
            student_logits, teacher_logits, None if self.weights is None else len(self.weights)
        )
        teacher_logits = list(teacher_logits)
        if len(teacher_logits) == 1:  # the single-teacher loss itself: a one-teacher list reproduces it
            only = teacher_logits[0]
            loss = self.term(student_logits, only, _labels_or_prediction(labels, only), tau)
            return CombinedKD(loss, student_logits.new_ones(len(labels), 1))
        raw = self.weights or [1.0] * len(teacher_logits)
        weights = student_logits.new_tensor(raw) / sum(raw)
        return self.rule(student_logits, teacher_logits, labels, tau, weights, self.term)

    def each(
        self, student_logits: Tensor, teacher_logits: Sequence[Tensor], labels: Tensor, tau: float
    ) -> list[Tensor]:
        """The logit loss against each teacher alone, one scalar per teacher: for logging how close
        the student is to each (the combined term is not their sum under every rule)."""
        return _each_teacher(self.term, student_logits, teacher_logits, labels, tau)
