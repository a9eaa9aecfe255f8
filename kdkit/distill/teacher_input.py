"""The teacher's own input: convert the student's batch to the size and normalisation the teacher expects.

A teacher may have been trained on another input than the student gets: a 224 px CLIP or DINOv2
teacher with its own mean/std beside a 112 px student normalised with 0.5/0.5. The data loader
produces the student's input; `TeacherInput` turns each batch into the teacher's (undo the
student's normalisation, resize, apply the teacher's), on the device, under inference mode.

`InputSpace` describes one side (size, mean, std); `input_space_from_pretrained_cfg` reads a timm
model's (`distill.teacher_input: auto`); `check_input_space` checks a recipe's mapping and names
each bad key, `size_problem` a side against the teacher. docs/methods.md ("Teachers that see the
world differently") gives the conventions.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdkit.registry import did_you_mean

# `F.interpolate`'s modes for (B, C, H, W) batches.
INTERPOLATIONS = ("nearest", "nearest-exact", "bilinear", "bicubic", "area")
# The modes `F.interpolate` can antialias (it refuses `antialias=True` with the others; `area`
# averages whole input cells, so it needs none).
_ANTIALIASED = ("bilinear", "bicubic")
_KEYS = ("size", "mean", "std", "interpolation")
# The largest side a batch is converted to: beyond the inputs of any image model in use (518 px
# DINOv2, 1024 px SAM), and a batch of 64 RGB images of this side already takes 12 GiB in float32.
MAX_SIZE = 4096


@dataclass(frozen=True)
class InputSpace:
    """A model's input: square side `size` in pixels (None = whatever size the batch has) and the
    per-channel `mean` and `std` the pixels in [0, 1] were normalised with, `(pixel - mean) / std`.

    Lists are stored as tuples of floats, so equal spaces compare and hash equal; bad values raise a
    ValueError naming the field.
    """

    size: int | None
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __post_init__(self) -> None:
        problems = check_input_space(self, "InputSpace")
        if problems:
            raise ValueError("; ".join(problems))
        # frozen: object.__setattr__ is the dataclass way to normalise fields after the check
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))

    @property
    def channels(self) -> int:
        """The number of channels (one mean and one std each)."""
        return len(self.mean)

    def describe(self) -> dict[str, Any]:
        """The space as plain JSON values."""
        return {"size": self.size, "mean": list(self.mean), "std": list(self.std)}


class PretrainedInput(NamedTuple):
    """What a timm model's pretrained_cfg says about its input: the space and the resampling its
    own preprocessing uses. Unpacks as `space, interpolation = ...`."""

    space: InputSpace
    interpolation: str


def _show(value: Any) -> str:
    """A value as the recipe wrote it: tuples as lists, so messages match the YAML."""
    return repr(list(value)) if isinstance(value, tuple) else repr(value)


def _is_real(value: Any) -> bool:
    # bool is an int to Python, but `true` is no mean or std a recipe means
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _numbers(value: Any) -> bool:
    """A non-empty list (or tuple) of finite real numbers."""
    is_list = isinstance(value, Sequence) and not isinstance(value, (str, bytes))
    return is_list and len(value) > 0 and all(_is_real(v) for v in value)


def check_input_space(space: InputSpace | Mapping[str, Any], where: str) -> list[str]:
    """Every problem of an input space, each message starting with its key under `where`.

    `space` is an `InputSpace` or a recipe's mapping with the keys `size` (a positive int or None),
    `mean`, `std` (one number per channel, std > 0) and `interpolation` (one of `INTERPOLATIONS`);
    in a mapping each may be left out or null (size: keep the batch's; mean, std: the student's;
    interpolation: bicubic), as `distill.teacher_input` allows.
    E.g. `distill.teacher_input.std: expected positive numbers, got [0.5, 0]`. [] when all is well.
    """
    if isinstance(space, InputSpace):
        values: Mapping[str, Any] = {"size": space.size, "mean": space.mean, "std": space.std}
    elif isinstance(space, Mapping):
        values = space
    else:
        return [f"{where}: expected a mapping with size, mean and std, got {_show(space)}"]
    problems = [
        f"{where}.{key}: unknown key; expected {', '.join(_KEYS)}.{did_you_mean(str(key), list(_KEYS))}"
        for key in values
        if key not in _KEYS
    ]
    size = values.get("size")
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size <= 0):
        problems.append(
            f"{where}.size: expected a positive whole number of pixels (or null to keep the batch's "
            f"size), got {_show(size)}"
        )
    mean, std = values.get("mean"), values.get("std")
    # A recipe's mapping may leave mean/std out (null): the student's are used then.
    optional = not isinstance(space, InputSpace)
    if not (mean is None and optional) and not _numbers(mean):
        problems.append(f"{where}.mean: expected a list of numbers, one per channel, got {_show(mean)}")
    if not (std is None and optional) and not (_numbers(std) and all(v > 0 for v in std)):
        problems.append(f"{where}.std: expected positive numbers, got {_show(std)}")
    if _numbers(mean) and _numbers(std) and len(mean) != len(std):
        problems.append(
            f"{where}.std: expected as many values as {where}.mean (one per channel), got "
            f"{_show(std)} for mean {_show(mean)}"
        )
    interpolation = values.get("interpolation")
    if interpolation is not None and interpolation not in INTERPOLATIONS:
        problems.append(
            f"{where}.interpolation: expected one of {', '.join(INTERPOLATIONS)}, got {_show(interpolation)}"
        )
    return problems


class TeacherInput(nn.Module):
    """Convert a batch normalised for `student` into one for `teacher`.

    `forward(x)` with x (B, C, H, W), C the student's channels, is
    `normalise_teacher(resize(denormalise_student(x)))`, where denormalise is `x · std_s + mean_s`,
    resize is `F.interpolate(size=(teacher.size, teacher.size), mode=interpolation,
    align_corners=False)` (`align_corners` for bilinear and bicubic only; skipped when the batch
    already has that size or `teacher.size` is None; antialiased when it shrinks an axis and
    `antialias`) and normalise is `(p − mean_t) / std_t`.
    The two affine steps are applied as one per-channel `x · scale + shift`. When nothing changes,
    `forward` returns `x` itself; `is_identity` says so for batches of the student's size.

    A 1-channel student and a 3-channel teacher are refused unless `repeat_channels=True`, which
    repeats the grey channel (the teacher then sees a grey image). Not clamped to [0, 1] after a
    bicubic resize (as torchvision's float-tensor resize does not).
    """

    def __init__(
        self,
        student: InputSpace,
        teacher: InputSpace,
        interpolation: str = "bicubic",
        antialias: bool = True,
        repeat_channels: bool = False,
    ) -> None:
        super().__init__()
        if interpolation not in INTERPOLATIONS:
            raise ValueError(
                f"TeacherInput: interpolation: expected one of {', '.join(INTERPOLATIONS)}, got "
                f"{interpolation!r}"
            )
        for name, flag in (("antialias", antialias), ("repeat_channels", repeat_channels)):
            if not isinstance(flag, bool):
                raise ValueError(f"TeacherInput: {name}: expected true or false, got {flag!r}")
        cs, ct = student.channels, teacher.channels
        if cs != ct and not (cs == 1 and repeat_channels):
            hint = (
                "; pass repeat_channels=True to give the teacher the grey channel repeated" if cs == 1 else ""
            )
            raise ValueError(
                f"TeacherInput: the student's input has {cs} channel{'s' * (cs != 1)} (its mean/std "
                f"{list(student.mean)}/{list(student.std)}) but the teacher expects {ct} (mean/std "
                f"{list(teacher.mean)}/{list(teacher.std)}){hint}"
            )
        self.student = student
        self.teacher = teacher
        self.interpolation = interpolation
        self.antialias = antialias
        self.repeat_channels = repeat_channels
        # x · std_s + mean_s, then (· − mean_t) / std_t, is one affine map per channel:
        # x · (std_s / std_t) + (mean_s − mean_t) / std_t. Computed in float64 from the spaces'
        # numbers, so one multiply-add replaces four tensor passes with no loss of accuracy.
        # With 1 student channel both have the teacher's channel count and broadcasting does the
        # repeat.
        mean_s = student.mean * ct if cs == 1 else student.mean
        std_s = student.std * ct if cs == 1 else student.std
        scale = [s / t for s, t in zip(std_s, teacher.std, strict=True)]
        shift = [(m_s - m_t) / t for m_s, m_t, t in zip(mean_s, teacher.mean, teacher.std, strict=True)]
        # Exact comparison of the spaces, not of the rounded scale/shift: only then is skipping exact.
        self._affine = cs != ct or student.mean != teacher.mean or student.std != teacher.std
        # Not persistent: derived from the spaces, so no checkpoint needs (or may mismatch) them.
        self.register_buffer("scale", torch.tensor(scale).view(1, ct, 1, 1), persistent=False)
        self.register_buffer("shift", torch.tensor(shift).view(1, ct, 1, 1), persistent=False)

    @property
    def is_identity(self) -> bool:
        """True when `forward` returns batches of the student's size unchanged (the same object)."""
        same_size = self.teacher.size is None or self.teacher.size == self.student.size
        return same_size and not self._affine

    def forward(self, x: Tensor) -> Tensor:
        """The teacher's input for the student's batch `x` (B, C, H, W)."""
        if x.ndim != 4 or not x.is_floating_point():
            raise ValueError(
                f"TeacherInput: expected a floating-point batch (B, C, H, W), got {x.dtype} {tuple(x.shape)}"
            )
        if x.shape[1] != self.student.channels:
            raise ValueError(
                f"TeacherInput: the batch has {x.shape[1]} channels but the student's mean/std "
                f"{list(self.student.mean)}/{list(self.student.std)} have {self.student.channels}"
            )
        size = self.teacher.size
        resize = size is not None and tuple(x.shape[-2:]) != (size, size)
        if not resize and not self._affine:
            return x
        if not resize:
            return self._apply_affine(x)
        # Interpolation weights sum to 1 for each output pixel and act on each channel separately,
        # so the resize commutes with the per-channel affine map: apply it on the smaller of the
        # two tensors (after a downscale, before an upscale) for the same result.
        shrinks = x.shape[-2] > size or x.shape[-1] > size
        if self._affine and not shrinks:
            x = self._apply_affine(x)
        antialias = self.antialias and shrinks and self.interpolation in _ANTIALIASED
        align = False if self.interpolation in ("bilinear", "bicubic") else None  # others refuse it
        x = F.interpolate(
            x, size=(size, size), mode=self.interpolation, align_corners=align, antialias=antialias
        )
        return self._apply_affine(x) if self._affine and shrinks else x

    def _apply_affine(self, x: Tensor) -> Tensor:
        scale = self.scale.to(device=x.device, dtype=x.dtype)
        shift = self.shift.to(device=x.device, dtype=x.dtype)
        return torch.addcmul(shift, x, scale)

    def describe(self) -> dict[str, Any]:
        """Everything that decides the conversion, as plain JSON values (for the teacher-cache key):
        two TeacherInputs that convert differently describe differently."""
        return {
            "student": self.student.describe(),
            "teacher": self.teacher.describe(),
            "interpolation": self.interpolation,
            "antialias": self.antialias,
            "repeat_channels": self.repeat_channels,
        }

    def extra_repr(self) -> str:
        return (
            f"student={self.student}, teacher={self.teacher}, interpolation={self.interpolation!r}, "
            f"antialias={self.antialias}, repeat_channels={self.repeat_channels}"
        )


def _unwrap(model: nn.Module) -> nn.Module:
    """The model inside DistributedDataParallel/DataParallel (`module`) or torch.compile (`_orig_mod`)."""
    for attr in ("_orig_mod", "module"):
        inner = getattr(model, attr, None)
        if isinstance(inner, nn.Module):
            return _unwrap(inner)
    return model


def _built_size(model: nn.Module) -> tuple[int, int] | None:
    """The input size a timm model was built for, when it has one: its patch embedding's."""
    img_size = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if isinstance(img_size, int):
        return img_size, img_size
    if isinstance(img_size, Sequence) and len(img_size) == 2 and all(isinstance(v, int) for v in img_size):
        return int(img_size[0]), int(img_size[1])
    return None


def _built_channels(model: nn.Module, cfg: Mapping[str, Any]) -> int | None:
    """The channel count of the model's first convolution (timm's `first_conv`), when it says."""
    first = cfg.get("first_conv")
    if not isinstance(first, str):
        return None
    try:
        return getattr(model.get_submodule(first), "in_channels", None)
    except AttributeError:
        return None


def size_problem(size: int, model: nn.Module) -> str:
    """Why `model` cannot take square inputs of side `size` ('' when it can, as far as its patch
    embedding tells): beyond `MAX_SIZE`, not a multiple of its patch size, or another size than
    the one it was built for when it takes no other (timm's `strict_img_size`)."""
    if size > MAX_SIZE:
        gib = 3 * size * size * 4 / 2**30
        return f"{size} px is beyond the {MAX_SIZE} px kdkit converts to ({gib:.1f} GiB per RGB image)"
    embed = getattr(_unwrap(model), "patch_embed", None)
    patch = getattr(embed, "patch_size", None)
    if isinstance(patch, Sequence) and any(size % p for p in patch):
        return f"{size} is not a multiple of the teacher's patch size {patch[0]}"
    built = _built_size(model)
    if built is not None and getattr(embed, "strict_img_size", False) and built != (size, size):
        return (
            f"{size} px, but the teacher was built for {built[0]} px inputs and takes no other "
            "(its img_size option)"
        )
    return ""


def input_space_from_pretrained_cfg(model: nn.Module) -> PretrainedInput | None:
    """The input a timm model expects, from its `pretrained_cfg`; None when it has none (or it
    gives no mean and std).

    The size is the one the model was **built** for: a ViT-like model's `patch_embed.img_size`,
    which an `img_size` option changes, wins over `pretrained_cfg['input_size']`, which keeps the
    pretrained weights' size (timm's `resolve_data_config` reports that one too). Models without a
    patch embedding (CNNs) take `input_size` (the training size; `test_input_size` is ignored).
    `interpolation` is the cfg's when `F.interpolate` has it, else bicubic. A non-square size, or a
    first layer whose channel count differs from the cfg's mean/std (e.g. `in_chans=1` — timm
    keeps the RGB values), raise a ValueError: give the teacher's input explicitly then.
    """
    model = _unwrap(model)
    cfg = getattr(model, "pretrained_cfg", None)
    if cfg is not None and not isinstance(cfg, Mapping) and hasattr(cfg, "to_dict"):
        cfg = cfg.to_dict()  # timm's PretrainedCfg dataclass, in case a model holds it as such
    if not isinstance(cfg, Mapping) or not cfg.get("mean") or not cfg.get("std"):
        return None
    name = cfg.get("architecture") or type(model).__name__
    input_size = cfg.get("input_size")
    cfg_size = tuple(input_size[-2:]) if isinstance(input_size, Sequence) and len(input_size) == 3 else None
    height_width = _built_size(model) or cfg_size
    if height_width is not None and height_width[0] != height_width[1]:
        raise ValueError(
            f"{name}: the model takes {height_width[0]}x{height_width[1]} inputs; kdkit resizes to "
            "squares only. Give distill.teacher_input explicitly (and square inputs)"
        )
    mean, std = tuple(cfg["mean"]), tuple(cfg["std"])
    channels = _built_channels(model, cfg)
    if channels is not None and channels != len(mean):
        raise ValueError(
            f"{name}: its first layer takes {channels} channel{'s' * (channels != 1)} but its "
            f"pretrained_cfg gives mean/std for {len(mean)} ({list(mean)}/{list(std)}); give "
            "distill.teacher_input's mean and std explicitly"
        )
    interpolation = cfg.get("interpolation")
    if interpolation not in INTERPOLATIONS:
        interpolation = "bicubic"  # timm's own default; its 'random' or PIL-only modes have no twin here
    size = None if height_width is None else int(height_width[0])
    return PretrainedInput(InputSpace(size, mean, std), interpolation)
