"""Loss functions: logit KD, cross-entropy, and feature criteria (mse, smooth_l1, cosine).

Feature criteria live in the `FEATURE_CRITERIA` registry: a plugin adds its own with
`registries.feature_criteria.add(name, fn)` and a recipe names it in `distill.criterion`.

All are plain functions on tensors. `kd_loss` always applies τ² and the `batchmean` reduction, unlike
torchdistill's `KDLoss`, which applies τ² only when its `alpha > 0`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch.nn.functional as F
from torch import Tensor

from kdkit.registry import FEATURE_CRITERIA

FeatureCriterion = Callable[[Tensor, Tensor], Tensor]


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


def cross_entropy(logits: Tensor, labels: Tensor, label_smoothing: float = 0.0) -> Tensor:
    """Mean cross-entropy of `logits` (B, C) against integer `labels` (B,)."""
    return F.cross_entropy(logits, labels, label_smoothing=label_smoothing)


@FEATURE_CRITERIA.register("mse")
def mse(a: Tensor, b: Tensor) -> Tensor:
    """Mean squared error over all elements."""
    _check_same_shape("mse", a, b)
    return F.mse_loss(a, b)


@FEATURE_CRITERIA.register("smooth_l1")
def smooth_l1(a: Tensor, b: Tensor) -> Tensor:
    """Smooth L1 (Huber with beta=1) averaged over all elements."""
    _check_same_shape("smooth_l1", a, b)
    return F.smooth_l1_loss(a, b)


@FEATURE_CRITERIA.register("cosine")
def cosine(a: Tensor, b: Tensor) -> Tensor:
    """1 - cosine similarity along the last dimension, averaged over the other dimensions."""
    _check_same_shape("cosine", a, b)
    return (1 - F.cosine_similarity(a, b, dim=-1)).mean()


def build_feature_criterion(name: str) -> FeatureCriterion:
    """The feature criterion registered as `name` (RegistryError listing valid names if unknown)."""
    return FEATURE_CRITERIA.get(name)
