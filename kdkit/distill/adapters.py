"""Feature-matching adapters: bridge student and teacher features of different widths.

`adapter(s, t)` takes student features `s` (B, Ds) or (B, N, Ds) and teacher features `t` (B, Dt) or
(B, N, Dt) and returns `(s_mapped, t_target)` of equal shape, so `criterion(s_mapped, t_target)` is the
feature loss. Adapters see both tensors, which is what lets `procrustes`, `covariance`, `cka` and
`gram` map widths without parameters. They are plain `nn.Module`s: usable in any PyTorch loop with
nothing else from kdkit.
See docs/adapters.md for formulas and when to choose which.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.parametrizations import orthogonal

from kdkit.registry import ADAPTERS


def _flag(option: str, value: object) -> bool:
    """A true/false option: a recipe's `'false'` or `0` must not pass as a truthy value."""
    if not isinstance(value, bool):
        raise ValueError(f"{option}: expected true or false, got {value!r}")
    return value


def _positive(option: str, value: object) -> float:
    """A number > 0 (an eps or a norm order): a string fails here, not in the first step's arithmetic."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise ValueError(f"{option}: expected a number > 0, got {value!r}")
    return float(value)


class Adapter(nn.Module):
    """Base class: checks shapes, then `map(s, t)` does the adapter's work."""

    same_tokens = True  # gram compares samples, so only it accepts different token counts
    # Samples per batch below which the adapter's loss is identically 0 (it is built from batch
    # statistics); recipes and loaders respect it, and `forward` refuses smaller batches.
    min_batch = 1

    def __init__(self, student_dim: int, teacher_dim: int) -> None:
        super().__init__()
        self.student_dim = student_dim
        self.teacher_dim = teacher_dim

    def extra_parameters(self) -> int:
        """Number of trainable parameters the adapter adds to the student."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def forward(self, s: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """Return `(s_mapped, t_target)` of equal shape."""
        self._check(s, t)
        return self.map(s, t)

    def map(self, s: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """The adapter's mapping of shape-checked features; subclasses implement it."""
        raise NotImplementedError

    def _check(self, s: Tensor, t: Tensor) -> None:
        name, ss, ts = type(self).__name__, tuple(s.shape), tuple(t.shape)
        if s.ndim not in (2, 3) or t.ndim not in (2, 3):
            raise ValueError(f"{name}: features must be (B, D) or (B, N, D); got student {ss}, teacher {ts}")
        if s.shape[0] != t.shape[0]:
            raise ValueError(f"{name}: batch sizes differ: student {ss}, teacher {ts}")
        if s.shape[0] < self.min_batch:
            raise ValueError(
                f"{name}: needs batches of at least {self.min_batch} samples (its loss is 0 for fewer); "
                f"got {ss[0]}"
            )
        if self.same_tokens and (s.ndim != t.ndim or s.shape[1:-1] != t.shape[1:-1]):
            raise ValueError(
                f"{name}: student {ss} and teacher {ts} need the same rank and token count; to compare "
                "positions of different grids (a CNN map and ViT patch tokens), select 'grid:S' to "
                "resample both to S x S, or compare vectors ('mean', 'cls') or relations ('gram', 'cka')"
            )
        if s.shape[-1] != self.student_dim or t.shape[-1] != self.teacher_dim:
            raise ValueError(
                f"{name}: built for student_dim={self.student_dim}, teacher_dim={self.teacher_dim}; "
                f"got student {ss}, teacher {ts}"
            )


@ADAPTERS.register("identity")
class IdentityAdapter(Adapter):
    """Compare features as they are; needs equal widths."""

    def __init__(self, student_dim: int, teacher_dim: int) -> None:
        if student_dim != teacher_dim:
            raise ValueError(
                f"identity adapter needs equal widths; got student_dim={student_dim}, "
                f"teacher_dim={teacher_dim}. Use 'procrustes' (no parameters), 'projection' or 'cka'."
            )
        super().__init__(student_dim, teacher_dim)

    def map(self, s: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        return s, t


@ADAPTERS.register("projection")
class ProjectionAdapter(Adapter):
    """FitNets-style learnable linear map Ds -> Dt on the student; train it with the student."""

    def __init__(self, student_dim: int, teacher_dim: int, bias: bool = True) -> None:
        super().__init__(student_dim, teacher_dim)
        self.proj = nn.Linear(student_dim, teacher_dim, bias=_flag("bias", bias))

    def map(self, s: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        return self.proj(s), t


@ADAPTERS.register("mlp")
class MLPAdapter(Adapter):
    """A learnable two-layer projection head Ds -> hidden -> Dt (Linear, GELU, Linear) on the student,
    the non-linear head of many KD papers; trained with the student."""

    def __init__(
        self, student_dim: int, teacher_dim: int, hidden_dim: int | None = None, bias: bool = True
    ) -> None:
        super().__init__(student_dim, teacher_dim)
        # default: the teacher's width, so the head is never a bottleneck narrower than its target
        hidden = teacher_dim if hidden_dim is None else hidden_dim
        if isinstance(hidden, bool) or not isinstance(hidden, int) or hidden < 1:
            raise ValueError(f"hidden_dim: expected a positive integer (or null), got {hidden_dim!r}")
        bias = _flag("bias", bias)
        self.head = nn.Sequential(
            nn.Linear(student_dim, hidden, bias=bias), nn.GELU(), nn.Linear(hidden, teacher_dim, bias=bias)
        )

    def map(self, s: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        return self.head(s), t


@ADAPTERS.register("orthogonal")
class OrthogonalAdapter(Adapter):
    """VkD's orthogonal projection (Miles, Elezi & Deng, CVPR 2024): a bias-free linear map Ds -> Dt
    kept orthogonal during training (`torch.nn.utils.parametrizations.orthogonal`): orthonormal
    columns when Ds <= Dt (the map preserves the student's norms and inner products), orthonormal
    rows when Ds > Dt.

    `normalize` is VkD's task-specific normalisation, as the authors' code applies it:
    'layer' (default; their classification code): the teacher's features are standardised per
    feature vector (a LayerNorm without parameters), so the student matches their shape, not their
    scale, which an orthogonal map cannot change; 'batch' (their detection code): the projected
    student and the teacher are both standardised per feature over the batch (and tokens), with
    the unbiased std; 'none': both as they are.
    """

    normalizations = ("layer", "batch", "none")
    # floor of the per-feature std in 'batch' (the authors divide by it directly): a constant
    # feature, a dead teacher channel say, then gives 0 rather than inf/NaN
    std_floor = 1e-6

    def __init__(self, student_dim: int, teacher_dim: int, normalize: str = "layer") -> None:
        super().__init__(student_dim, teacher_dim)
        if normalize not in self.normalizations:
            raise ValueError(f"normalize: expected one of {list(self.normalizations)}, got {normalize!r}")
        self.normalize = normalize
        self.proj = orthogonal(nn.Linear(student_dim, teacher_dim, bias=False))

    def map(self, s: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        mapped = self.proj(s)
        if self.normalize == "layer":
            return mapped, F.layer_norm(t, t.shape[-1:])
        if self.normalize == "batch":
            return self._standardize(mapped), self._standardize(t)
        return mapped, t

    def _standardize(self, x: Tensor) -> Tensor:
        rows = x.reshape(-1, x.shape[-1])
        if rows.shape[0] < 2:  # the unbiased std of one row is NaN
            raise ValueError(
                f"orthogonal adapter: normalize='batch' standardises each feature over the batch and "
                f"tokens, so it needs at least 2 rows; got features {tuple(x.shape)}"
            )
        std = rows.std(0).clamp_min(self.std_floor)
        return ((rows - rows.mean(0)) / std).reshape(x.shape)


@ADAPTERS.register("raw")
class RawAdapter(Adapter):
    """Both features unchanged, whatever their widths, token counts or ranks ((B, D), (B, N, D) or
    CNN maps (B, C, H, W)); only the batch sizes must agree. For criteria that compare relations or
    attention maps and so accept features of different shapes (`rkd`, `at`); the Distiller refuses
    a criterion that compares equal shapes with it when the shapes differ."""

    same_tokens = False

    def _check(self, s: Tensor, t: Tensor) -> None:
        if s.ndim < 2 or t.ndim < 2 or s.shape[0] != t.shape[0]:
            raise ValueError(
                f"RawAdapter: expected features (B, ...) with the same batch size B; got student "
                f"{tuple(s.shape)}, teacher {tuple(t.shape)}"
            )

    def map(self, s: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        return s, t


SCALES = ("element", "row")


def _unit_rows(x: Tensor, eps: float) -> Tensor:
    """`x` as rows (samples, or samples x tokens), each scaled to unit L2 norm."""
    return F.normalize(x.reshape(-1, x.shape[-1]), dim=1, eps=eps)


def _promoted(x: Tensor) -> Tensor:
    """`x` in float32, or float64 when it is float64: SVD has no bf16/fp16 kernels, and the batch
    statistics of these adapters lose too much in half precision."""
    return x if x.dtype == torch.float64 else x.float()


def _check_scale(scale: str) -> str:
    if scale not in SCALES:
        raise ValueError(f"scale: expected one of {list(SCALES)}, got {scale!r}")
    return scale


def _scaled(pair: tuple[Tensor, Tensor], scale: str) -> tuple[Tensor, Tensor]:
    """`scale='row'` multiplies both outputs by sqrt(width), so a mean-reduced MSE on them is the mean
    over rows of the squared distance ‖a - b‖² (a number in [0, 4] for unit rows) instead of that
    divided by the width: the same β then weighs the term alike whatever the models' widths."""
    if scale == "element":
        return pair
    factor = pair[0].shape[-1] ** 0.5
    return pair[0] * factor, pair[1] * factor


@ADAPTERS.register("covariance")
class CovarianceAdapter(Adapter):
    """KDFAS parameter-free mapping through the batch cross-covariance — kept faithful to the paper,
    and degenerate by construction (docs/adapters.md; use `procrustes` for a sound bridge).

    ŝ, t̂ = rows of s, t L2-normalised (rows = samples, or samples x tokens for (B, N, D));
    C = ŝᵀ t̂ (Ds x Dt); returns (ŝ C, t̂). Since ŝ C = (ŝŝᵀ) t̂, the loss ‖(I - ŝŝᵀ) t̂‖² is zero
    whenever the student's rows are orthonormal, whatever the teacher: its zero set ignores the
    teacher. C depends on the batch: under DDP each rank sees only its own batch.

    `detach_covariance=True` (the default) stops the gradient through C; it flows only through the
    left ŝ (Oja's subspace rule, also zero for orthonormal student rows). `False` is the formula
    exactly as the KDFAS/HaTFAS code trains it. `scale` is 'element' (the authors' mean over
    elements) or 'row' (see `_scaled`).

    One sample gives ŝ C = ŝŝᵀt̂ = t̂ exactly (a zero loss), hence `min_batch = 2`.
    """

    min_batch = 2

    def __init__(
        self,
        student_dim: int,
        teacher_dim: int,
        eps: float = 1e-12,
        detach_covariance: bool = True,
        scale: str = "element",
    ) -> None:
        super().__init__(student_dim, teacher_dim)
        self.eps = _positive("eps", eps)
        self.detach_covariance = _flag("detach_covariance", detach_covariance)
        self.scale = _check_scale(scale)

    def map(self, s: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        s_hat, t_hat = _unit_rows(s, self.eps), _unit_rows(t, self.eps)
        cov = (s_hat.detach() if self.detach_covariance else s_hat).T @ t_hat
        mapped = s_hat @ cov
        return _scaled((mapped.reshape(t.shape), t_hat.reshape(t.shape)), self.scale)


def polar_factor(c: Tensor) -> Tensor:
    """The orthogonal polar factor U Vᵀ of `c` = U Σ Vᵀ: the (partial) isometry nearest to `c`.

    Computed in float32 (float64 inputs stay float64; SVD has no bf16/fp16 kernels). Should the
    SVD fail to converge, as GPU solvers can on ill-conditioned matrices, it is retried in float64
    on the CPU; non-finite input is refused, since it means the features themselves are broken.
    """
    work = _promoted(c)
    try:
        u, _, vh = torch.linalg.svd(work, full_matrices=False)
    except RuntimeError as error:  # torch.linalg.LinAlgError is a RuntimeError
        if not torch.isfinite(work).all():
            raise ValueError(
                "procrustes: the cross-covariance of the features has non-finite values (NaN/inf); "
                "the student or teacher features are broken (check the learning rate and the amp dtype)"
            ) from error
        u, _, vh = torch.linalg.svd(work.double().cpu(), full_matrices=False)
        u, vh = u.to(device=work.device, dtype=work.dtype), vh.to(device=work.device, dtype=work.dtype)
    return u @ vh


@ADAPTERS.register("procrustes")
class ProcrustesAdapter(Adapter):
    """The sound parameter-free width bridge: orthogonal Procrustes on the batch.

    ŝ, t̂ as for `covariance` (rows L2-normalised; `normalize='none'` keeps them as they are);
    C = ŝᵀ t̂ = U Σ Vᵀ (the same Ds x Dt matrix); Q = U Vᵀ, the isometry that best aligns the
    student's rows with the teacher's. The narrower side is mapped into the wider one: (ŝ Q, t̂) when
    Ds <= Dt, (ŝ, t̂ Qᵀ) when Ds > Dt, both of width max(Ds, Dt). Either way the summed squared
    distance is 2R - 2‖C‖_* (R rows, unit rows), zero only when ŝŝᵀ = t̂t̂ᵀ: the student must
    reproduce the teacher's similarity structure, where `covariance` is satisfied by any student
    with orthonormal rows.

    `detach=True` (the default) computes Q without gradient; since Q minimises the distance over
    isometries, that is the exact gradient of the Procrustes distance (Danskin's theorem), cheap and
    stable. `detach=False` differentiates through the SVD too (for study; unstable where singular
    values nearly coincide). `scale` defaults to 'row' (see `_scaled`): a mean-reduced MSE is then
    2 - 2‖C‖_*/R, in [0, 4]. C is built from the batch: under DDP, from each rank's own rows.
    """

    min_batch = 2  # one row: ‖C‖_* = 1, a zero loss whatever the features
    normalizations = ("row", "none")

    def __init__(
        self,
        student_dim: int,
        teacher_dim: int,
        normalize: str = "row",
        detach: bool = True,
        scale: str = "row",
        eps: float = 1e-12,
    ) -> None:
        super().__init__(student_dim, teacher_dim)
        if normalize not in self.normalizations:
            raise ValueError(f"normalize: expected one of {list(self.normalizations)}, got {normalize!r}")
        self.normalize = normalize
        self.detach = _flag("detach", detach)
        self.scale = _check_scale(scale)
        self.eps = _positive("eps", eps)

    def map(self, s: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        s_rows, t_rows = (self._rows(x) for x in (s, t))
        cov = s_rows.T @ t_rows
        if self.detach:
            with torch.no_grad():
                q = polar_factor(cov.detach())
        else:
            q = polar_factor(cov)
        if self.student_dim <= self.teacher_dim:
            mapped, target = s_rows @ q, t_rows
        else:
            mapped, target = s_rows, t_rows @ q.T
        shape = (*s.shape[:-1], mapped.shape[-1])
        return _scaled((mapped.reshape(shape), target.reshape(shape)), self.scale)

    def _rows(self, x: Tensor) -> Tensor:
        x = _promoted(x)
        return _unit_rows(x, self.eps) if self.normalize == "row" else x.reshape(-1, x.shape[-1])


@ADAPTERS.register("gram")
class GramAdapter(Adapter):
    """Similarity-preserving KD (Tung & Mori, ICCV 2019): compare B x B sample-similarity matrices.

    Each sample is flattened to z (B, D) or (B, N*D); G = z zᵀ; each row of G is normalised to unit
    L`p` norm. Returns (G_s, G_t), both (B, B), so widths and token counts may differ. Mean-reduced MSE
    on them is the SP loss ||G_t - G_s||_F^2 / B^2 (MSE's mean over the B^2 entries is that division).

    `p=2` (default) is the paper's and RepDistiller's L2 row normalisation. torchdistill's `SPKDLoss`
    calls `normalize(G, 1)`, whose second argument is `p`, so it normalises rows to unit L1 norm; with
    `p=1`, gram + mse equals `SPKDLoss(reduction='batchmean')` exactly (scale 1).
    """

    same_tokens = False
    min_batch = 2  # one sample gives G = [1] for both: a zero loss

    def __init__(self, student_dim: int, teacher_dim: int, p: float = 2.0) -> None:
        super().__init__(student_dim, teacher_dim)
        self.p = _positive("p", p)

    def map(self, s: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        return self._gram(s), self._gram(t)

    def _gram(self, x: Tensor) -> Tensor:
        z = x.flatten(1)
        return F.normalize(z @ z.T, p=self.p, dim=1)


@ADAPTERS.register("cka")
class CKAAdapter(Adapter):
    """Linear centred kernel alignment (Kornblith et al., ICML 2019) as a parameter-free relation match.

    Each sample is flattened to z ((B, D) or (B, N*D), as for `gram`); K = z zᵀ is centred on both
    sides (K̃ = H K H, H = I - 11ᵀ/B) and scaled to unit Frobenius norm. Returns both matrices (B, B),
    times B/√2, so that a mean-reduced MSE on them is exactly 1 - CKA(s, t) (and the cosine of the
    flattened pair is CKA). CKA ignores rotations and the overall scale of either feature, so the
    student must match how the teacher arranges the batch, not its coordinates. Widths and token
    counts may differ.
    """

    same_tokens = False
    min_batch = 3  # two samples give the same centred matrix for any features: CKA = 1, a zero loss

    def __init__(self, student_dim: int, teacher_dim: int, eps: float = 1e-12) -> None:
        super().__init__(student_dim, teacher_dim)
        self.eps = _positive("eps", eps)

    def map(self, s: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        factor = s.shape[0] / 2**0.5
        return self._centred_gram(s) * factor, self._centred_gram(t) * factor

    def _centred_gram(self, x: Tensor) -> Tensor:
        z = _promoted(x.flatten(1))
        z = z - z.mean(0, keepdim=True)  # H z: centring the features centres K on both sides
        k = z @ z.T
        return k / k.norm().clamp_min(self.eps)


def adapter_min_batch(name: str) -> int:
    """The smallest batch the adapter registered as `name` gives a non-zero loss for (1 for 'none')."""
    return 1 if name == "none" else getattr(ADAPTERS.get(name), "min_batch", 1)


def adapter_options(name: str) -> list[str] | None:
    """The options (keyword arguments besides the two widths) the adapter registered as `name`
    takes; None when it takes any (**kwargs). An unknown name raises RegistryError."""
    params = inspect.signature(ADAPTERS.get(name)).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return None
    return [p for p in params if p not in ("student_dim", "teacher_dim")]


def unknown_adapter_options(name: str, options: Mapping[str, object]) -> str:
    """Why `options` do not suit the adapter registered as `name` ('' when they do): the names it
    does not take, and the ones it does."""
    valid = adapter_options(name)
    unknown = [] if valid is None else sorted(set(options) - set(valid))
    if not unknown:
        return ""
    return f"adapter {name!r} got unknown options {unknown}; valid options: {valid or 'none'}"


def build_adapter(name: str, student_dim: int, teacher_dim: int, **options: object) -> nn.Module:
    """Build the adapter registered as `name` for student width `student_dim` and teacher width `teacher_dim`.

    `options` are the adapter's own keyword arguments (e.g. `bias=False` for `projection`).
    """
    problem = unknown_adapter_options(name, options)
    if problem:
        raise ValueError(problem)
    return ADAPTERS.get(name)(student_dim, teacher_dim, **options)
