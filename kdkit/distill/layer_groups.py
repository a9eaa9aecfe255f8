"""Layer-group methods: distillation losses that look at several layers of each model at once.

A layer pair (`kdkit.distill.adapters` + a feature criterion) compares one student layer with one teacher
layer. Some methods treat layers differently by depth, so they need the whole group: such a method
is an `nn.Module` class in `GROUP_METHODS`, built as `cls(student_shapes, teacher_shapes, **options)`
from the tapped feature shapes of its layers in order (`[(B, N, Ds), ...]`, `[(B, N, Dt), ...]`),
and called as `module(student_feats, teacher_feats) -> scalar loss`. Class attributes tell the
caller how to tap: `select` (the token selector, e.g. `'patch'`) and `min_layers`. A recipe names
one in `distill.groups`; docs/methods.md gives each method's paper, formula and reference test.

Built-in: `vitkd` (Yang et al., "ViTKD: Practical Guidelines for ViT feature knowledge
distillation", arXiv 2209.02432, 2022).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import torch
from torch import Tensor, nn

# The registry lives in kdkit.registry (it imports this module for its built-ins); the name is
# re-exported here so that `kdkit.distill.layer_groups.GROUP_METHODS` is the same object.
from kdkit.registry import GROUP_METHODS

Shape = Sequence[int]

__all__ = ["GROUP_METHODS", "ViTKD"]


def _check_weight(option: str, value: object) -> float:
    """A loss weight: a real number >= 0 (a recipe's `true` or `'3e-5'` must not pass)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not value >= 0:
        raise ValueError(f"{option}: expected a number >= 0, got {value!r}")
    return float(value)


def _check_shapes(
    student_shapes: Sequence[Shape], teacher_shapes: Sequence[Shape], min_layers: int
) -> tuple[list[tuple[int, ...]], list[tuple[int, ...]]]:
    """Both sides give the same number (>= `min_layers`) of (B, N, D) token shapes, each layer with
    the same token count on both sides. Returns the shapes as tuples."""
    s_shapes, t_shapes = [tuple(s) for s in student_shapes], [tuple(t) for t in teacher_shapes]
    if len(s_shapes) != len(t_shapes):
        raise ValueError(
            f"expected as many student as teacher layers; got {len(s_shapes)} student layers "
            f"{s_shapes} and {len(t_shapes)} teacher layers {t_shapes}"
        )
    if len(s_shapes) < min_layers:
        raise ValueError(
            f"needs at least {min_layers} layers per model; got {len(s_shapes)}: student {s_shapes}, "
            f"teacher {t_shapes}"
        )
    for k, (s, t) in enumerate(zip(s_shapes, t_shapes, strict=True)):
        if len(s) != 3 or len(t) != 3:
            raise ValueError(
                f"layer {k}: expected token features (B, N, D); got student {s}, teacher {t} "
                "(tap transformer blocks with the 'patch' selector)"
            )
        if s[1] != t[1]:
            raise ValueError(
                f"layer {k}: student {s} and teacher {t} have different token counts ({s[1]} vs {t[1]}); "
                "both models need the same patch grid"
            )
    return s_shapes, t_shapes


def _align(student_dim: int, teacher_dim: int) -> nn.Module:
    # As in the authors' code: a learned linear map only when the widths differ.
    return nn.Identity() if student_dim == teacher_dim else nn.Linear(student_dim, teacher_dim, bias=True)


@GROUP_METHODS.register("vitkd")
class ViTKD(nn.Module):
    """ViTKD (Yang et al., arXiv 2209.02432): mimic the shallow layers, generate the deepest.

    Layers 0 .. L-2 of the group are *mimicked*: each student layer's patch tokens go through its own
    linear map to the teacher's width (none when the widths are equal) and are compared with the
    teacher's tokens. The last layer is *generated*: its student tokens are mapped to the teacher's
    width, a random `mask_ratio` of the tokens of each sample is replaced by a learned mask token,
    and a small generator (conv 3x3, ReLU, conv 3x3 on the √N x √N patch grid) must reconstruct the
    teacher's tokens at the masked positions:

        mimic      = alpha / B · Σ_{k < L-1} ‖align_k(s_k) − t_k‖²
        generation = beta / (B · mask_ratio) · ‖M ⊙ (G(mask(align(s_L))) − t_L)‖²

    (squared norms summed over tokens and channels, M = 1 on masked tokens). This is the authors'
    `ViTKDLoss` (yzd-v/cls_KD, `mmcls/models/dis_losses/vitkd.py`) with their defaults, generalised
    from exactly two mimicked layers to any number. The mask comes from `torch.rand` on the
    features' device, so the global seed controls it (the authors' code draws it the same way).
    """

    select = "patch"  # the authors feed patch tokens, without the class token
    min_layers = 2  # at least one mimicked layer and the generated one

    def __init__(
        self,
        student_shapes: Sequence[Shape],
        teacher_shapes: Sequence[Shape],
        *,
        alpha: float = 3e-5,
        beta: float = 3e-6,
        mask_ratio: float = 0.5,
    ) -> None:
        super().__init__()
        self.alpha = _check_weight("alpha", alpha)
        self.beta = _check_weight("beta", beta)
        if (
            isinstance(mask_ratio, bool)
            or not isinstance(mask_ratio, numbers.Real)
            or not 0.0 < mask_ratio < 1.0
        ):
            raise ValueError(f"mask_ratio: expected a number in (0, 1), got {mask_ratio!r}")
        self.mask_ratio = float(mask_ratio)
        checked = _check_shapes(student_shapes, teacher_shapes, self.min_layers)
        self.student_shapes, self.teacher_shapes = checked
        tokens, teacher_dim = self.teacher_shapes[-1][1:]
        self.grid = math.isqrt(tokens)
        if self.grid * self.grid != tokens:
            raise ValueError(
                f"layer {len(self.teacher_shapes) - 1}: the generated layer's {tokens} tokens are not a "
                f"square patch grid (student {self.student_shapes[-1]}, teacher {self.teacher_shapes[-1]}); "
                "select the patch tokens only (selector 'patch', without class or register tokens)"
            )
        if self._masked_tokens(tokens) < 1:
            raise ValueError(
                f"mask_ratio: {mask_ratio} masks none of the {tokens} tokens; use a larger ratio"
            )
        mimicked = zip(self.student_shapes[:-1], self.teacher_shapes[:-1], strict=True)
        self.mimic_align = nn.ModuleList(_align(s[-1], t[-1]) for s, t in mimicked)
        self.gen_align = _align(self.student_shapes[-1][-1], teacher_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, teacher_dim))  # zeros, as the authors'
        self.generator = nn.Sequential(
            nn.Conv2d(teacher_dim, teacher_dim, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.Conv2d(teacher_dim, teacher_dim, kernel_size=3, padding=1),
        )

    def extra_parameters(self) -> int:
        """Number of trainable parameters the method adds to the student (maps, mask token, generator)."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def forward(self, student_feats: Sequence[Tensor], teacher_feats: Sequence[Tensor]) -> Tensor:
        """The ViTKD loss `mimic + generation` (a scalar) of the group's features, in layer order."""
        self._check(student_feats, teacher_feats)
        batch = student_feats[0].shape[0]
        mimic = student_feats[0].new_zeros(())
        for align, s, t in zip(self.mimic_align, student_feats[:-1], teacher_feats[:-1], strict=True):
            # (a - b)² written out rather than F.mse_loss: it saves only the difference for backward,
            # so teacher features made under torch.inference_mode are accepted
            mimic = mimic + (align(s) - t).pow(2).sum()
        mimic = mimic * (self.alpha / batch)

        x = self.gen_align(student_feats[-1])
        masked = self.random_mask(batch, x.shape[1], x.device)  # (B, N) bool, True = masked
        x = torch.where(masked.unsqueeze(-1), self.mask_token.to(x.dtype), x)
        generated = self.generate(x)
        error = (generated - teacher_feats[-1]).pow(2) * masked.unsqueeze(-1).to(generated.dtype)
        # divided by the mask ratio, as the authors do, so the term's size does not follow the ratio
        generation = error.sum() * (self.beta / (batch * self.mask_ratio))
        return mimic + generation

    def generate(self, tokens: Tensor) -> Tensor:
        """The generator on the patch grid: (B, N, D) tokens in row-major order -> (B, N, D)."""
        b, n, d = tokens.shape
        grid = tokens.reshape(b, self.grid, self.grid, d).permute(0, 3, 1, 2)
        return self.generator(grid).flatten(2).transpose(1, 2)

    def random_mask(self, batch: int, tokens: int, device: torch.device) -> Tensor:
        """Which tokens of each sample to mask, (B, N) bool: the `N - int(N · (1 − mask_ratio))`
        tokens with the largest `torch.rand` noise, drawn as the authors' `random_masking` draws it."""
        noise = torch.rand(batch, tokens, device=device)
        masked_ids = torch.argsort(noise, dim=1)[:, tokens - self._masked_tokens(tokens) :]
        mask = torch.zeros(batch, tokens, dtype=torch.bool, device=device)
        return mask.scatter_(1, masked_ids, True)

    def _masked_tokens(self, tokens: int) -> int:
        # the authors keep int(N · (1 − ratio)) tokens and mask the rest
        return tokens - int(tokens * (1 - self.mask_ratio))

    def _check(self, student_feats: Sequence[Tensor], teacher_feats: Sequence[Tensor]) -> None:
        """The features have the layer count, ranks, token counts and widths the method was built
        for (any batch size, the same for all)."""
        layers = len(self.student_shapes)
        if len(student_feats) != layers or len(teacher_feats) != layers:
            raise ValueError(
                f"built for {layers} layers per model; got {len(student_feats)} student and "
                f"{len(teacher_feats)} teacher features"
            )
        batch = student_feats[0].shape[0]
        for k, (s, t) in enumerate(zip(student_feats, teacher_feats, strict=True)):
            ss, ts = tuple(s.shape), tuple(t.shape)
            built_s, built_t = self.student_shapes[k], self.teacher_shapes[k]
            if s.ndim != 3 or t.ndim != 3 or ss[1:] != built_s[1:] or ts[1:] != built_t[1:]:
                raise ValueError(
                    f"layer {k}: built for student (B, {built_s[1]}, {built_s[2]}), teacher "
                    f"(B, {built_t[1]}, {built_t[2]}); got student {ss}, teacher {ts}"
                )
            if ss[0] != batch or ts[0] != batch:
                raise ValueError(
                    f"layer {k}: batch sizes differ: student {ss}, teacher {ts}, layer 0 has {batch} samples"
                )
