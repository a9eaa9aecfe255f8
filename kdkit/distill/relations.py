"""Feature criteria that compare relations or attention maps: relational KD (`rkd`) and attention
transfer (`at`).

Both are registered in `FEATURE_CRITERIA` with `same_shape = False`: the student's and the teacher's
features may differ in width (and, for `rkd`, in rank and token count), so they are used with the
`raw` adapter, which passes both features unchanged. Only the batch sizes must agree.

- `rkd` (Park et al., "Relational Knowledge Distillation", CVPR 2019) matches the distances between
  the samples of a batch and the angles they form; each sample is flattened first. It equals
  torchdistill 1.1.5's `RKDLoss`.
- `at` (Zagoruyko & Komodakis, "Paying More Attention to Attention", ICLR 2017) matches L2-normalised
  spatial attention maps, `mean over channels of |x|^p`; on ViT tokens (B, N, D) the map is over the
  N tokens. With `p = 2` it equals torchdistill 1.1.5's `ATLoss` in both its modes.

docs/methods.md gives the formulas, the conventions and the reference tests.
"""

from __future__ import annotations

import numbers

import torch
import torch.nn.functional as F
from torch import Tensor

from kdkit.distill.losses import OptionError, _check_weights
from kdkit.registry import FEATURE_CRITERIA

RKD_EPS = 1e-12  # lower bound of the squared distances, as torchdistill's RKDLoss.pdist
AT_MODES = ("code", "paper")


def _check_batches(name: str, a: Tensor, b: Tensor) -> None:
    # Relations are between the samples of one batch: the two batches must be the same samples.
    if a.dim() < 2 or b.dim() < 2 or a.shape[0] != b.shape[0]:
        raise ValueError(
            f"{name}: expected two batches of the same size, (B, ...) each; "
            f"got {tuple(a.shape)} and {tuple(b.shape)}"
        )


def pairwise_distances(z: Tensor, *, squared: bool = False, eps: float = RKD_EPS) -> Tensor:
    """Euclidean distances (B, B) between the rows of `z` (B, D), 0 on the diagonal.

    The squared distances come from the Gram matrix and are bounded below by `eps` before the square
    root (whose gradient is infinite at 0), as torchdistill's `RKDLoss.pdist`; `squared=True` returns
    them without the root."""
    sq_norms = z.pow(2).sum(dim=1)
    dist = (sq_norms.unsqueeze(1) + sq_norms.unsqueeze(0) - 2 * z @ z.T).clamp(min=eps)
    if not squared:
        dist = dist.sqrt()
    # a sample's distance to itself is 0, not sqrt(eps); multiplying keeps the graph out-of-place
    return dist * (1 - torch.eye(len(z), dtype=z.dtype, device=z.device))


def _normalised_distances(z: Tensor, squared: bool, eps: float) -> Tensor:
    """Pairwise distances divided by their mean over the off-diagonal (positive) entries."""
    dist = pairwise_distances(z, squared=squared, eps=eps)
    return dist / dist[dist > 0].mean()


def triplet_angles(z: Tensor) -> Tensor:
    """Cosines (B, B, B) of the angles the rows of `z` (B, D) form: entry [j, i, k] is the cosine
    between z_i - z_j and z_k - z_j (0 where either difference is 0).

    Memory grows as B² · D (the B² differences are formed explicitly, as in torchdistill), so give it
    pooled features or embeddings rather than large token maps."""
    diffs = F.normalize(z.unsqueeze(0) - z.unsqueeze(1), p=2, dim=2)
    return diffs @ diffs.transpose(1, 2)


@FEATURE_CRITERIA.register("rkd")
def rkd(
    a: Tensor,
    b: Tensor,
    *,
    distance_weight: float = 1.0,
    angle_weight: float = 2.0,
    squared: bool = False,
    eps: float = RKD_EPS,
) -> Tensor:
    """Relational KD (Park et al., CVPR 2019): distance_weight · RKD-D + angle_weight · RKD-A.

    Each sample of `a` (student) and `b` (teacher) is flattened, so the two may differ in rank,
    width and token count; only the batch size must agree. RKD-D is the smooth-L1 loss (beta 1,
    mean over the B² entries) between the two matrices of pairwise distances, each divided by its
    mean off-diagonal distance; RKD-A the same between the (B, B, B) cosines of the angles every
    three samples form. `squared` uses squared distances in RKD-D, `eps` bounds the squared
    distances below. The teacher's relations carry no gradient, and a term whose weight is 0 is
    not computed, as in torchdistill's `RKDLoss`.

    A batch of 2 gives 0 (its relations are the same for any features); 1 sample has no distance
    to normalise by and is refused."""
    _check_weights(
        "rkd", kind="feature criterion", distance_weight=distance_weight, angle_weight=angle_weight
    )
    if not isinstance(squared, bool):
        raise OptionError("squared", f"expected true or false for feature criterion 'rkd', got {squared!r}")
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or eps <= 0:
        raise OptionError("eps", f"expected a number > 0 for feature criterion 'rkd', got {eps!r}")
    _check_batches("rkd", a, b)
    if len(a) < 2:
        raise ValueError(
            f"rkd: needs batches of at least 2 samples (relations between samples); got {len(a)}"
        )
    s, t = a.flatten(1), b.flatten(1)
    loss = a.new_zeros(())
    if distance_weight != 0:
        with torch.no_grad():
            t_dist = _normalised_distances(t, squared, eps)
        s_dist = _normalised_distances(s, squared, eps)
        loss = loss + distance_weight * F.smooth_l1_loss(s_dist, t_dist)
    if angle_weight != 0:
        with torch.no_grad():
            t_angles = triplet_angles(t)
        loss = loss + angle_weight * F.smooth_l1_loss(triplet_angles(s), t_angles)
    return loss


rkd.same_shape = False  # type: ignore[attr-defined]
rkd.min_batch = 3  # type: ignore[attr-defined]  # the smallest batch whose loss is not always 0


def attention_map(x: Tensor, *, p: float = 2.0) -> Tensor:
    """The L2-normalised attention map (B, positions) of CNN maps (B, C, H, W) or ViT tokens (B, N, D).

    For maps: the mean over the C channels of |x|^p at each of the H · W positions (flattened row by
    row); for tokens: the mean over the D features of |x|^p of each of the N tokens (class tokens
    included). Each sample's map is then divided by its L2 norm (`F.normalize`, eps 1e-12). The mean
    and the paper's sum differ by a constant factor, which the normalisation removes."""
    if x.dim() == 4:
        energy = x.abs().pow(p).mean(dim=1).flatten(1)
    elif x.dim() == 3:
        energy = x.abs().pow(p).mean(dim=2)
    else:
        raise ValueError(
            f"at: expected CNN maps (B, C, H, W) or ViT tokens (B, N, D), got shape {tuple(x.shape)}"
        )
    return F.normalize(energy, p=2, dim=1)


@FEATURE_CRITERIA.register("at")
def at(a: Tensor, b: Tensor, *, p: float = 2.0, mode: str = "code") -> Tensor:
    """Attention transfer (Zagoruyko & Komodakis, ICLR 2017) between the attention maps of `a`
    (student) and `b` (teacher); see `attention_map`.

    `mode='code'` (the authors' code, torchdistill's default): the mean over samples and positions of
    the squared difference of the two maps. `mode='paper'` (the paper's Eq. 2 without its β/2): the
    mean over samples of the L2 norm of the difference. Both features must be maps, or both tokens,
    with the same spatial size (H, W) or token count N; the channel counts and widths may differ.
    As in torchdistill's `ATLoss`, the gradient also flows into `b`."""
    _check_at_options(p, mode)
    _check_batches("at", a, b)
    _check_at_shapes(a, b)
    diff = attention_map(a, p=p) - attention_map(b, p=p)
    if mode == "paper":
        return diff.norm(p=2, dim=1).mean()
    return diff.pow(2).mean()


at.same_shape = False  # type: ignore[attr-defined]


def _check_at_options(p: float, mode: str) -> None:
    # Below 1, |x|^p has an infinite slope at 0, and ReLU features are often exactly 0: NaN gradients.
    if isinstance(p, bool) or not isinstance(p, numbers.Real) or p < 1:
        raise OptionError(
            "p",
            f"expected a number >= 1 for feature criterion 'at', got {p!r} "
            "(below 1 the gradient of |x|^p is infinite at 0)",
        )
    if mode not in AT_MODES:
        raise OptionError("mode", f"expected 'code' or 'paper' for feature criterion 'at', got {mode!r}")


def _check_at_shapes(a: Tensor, b: Tensor) -> None:
    """Both maps (B, C, H, W) with the same H, W, or both tokens (B, N, D) with the same N."""
    sa, sb = tuple(a.shape), tuple(b.shape)
    if a.dim() not in (3, 4) or a.dim() != b.dim():
        # (B, D) features (a class token or a pooled feature, or a relation adapter's (B, B) matrices)
        # have no positions to attend over: say what to tap instead
        hint = (
            "; (B, D) features have no positions or tokens (select cls or mean, or a relation adapter): "
            "tap tokens (select: tokens, patch or all) with adapter raw"
            if 2 in (a.dim(), b.dim())
            else ""
        )
        raise ValueError(
            f"at: expected both CNN maps (B, C, H, W) or both ViT tokens (B, N, D); got {sa} and {sb}{hint}"
        )
    # torchdistill's ATLoss resizes neither map (its subtraction fails): refuse with both shapes, so
    # that the recipe taps layers of the same resolution (or pools one) instead
    if a.dim() == 4 and sa[2:] != sb[2:]:
        raise ValueError(
            f"at: the spatial sizes (H, W) differ: {sa} and {sb}; tap layers of the same resolution"
        )
    if a.dim() == 3 and sa[1] != sb[1]:
        raise ValueError(f"at: the token counts N differ: {sa} and {sb}; tap layers with as many tokens")
