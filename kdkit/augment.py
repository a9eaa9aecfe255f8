"""A fast image transform: uint8 (H, W, 3) frame → normalised float (3, S, S), augmented on tensors.

`FrameTransform(size, mean, std, train=True)` computes, draw for draw and pixel for pixel, what this
torchvision v2 pipeline computes on a uint8 image:

    ToImage → Resize((S, S), antialias) → RandomCrop(S, padding=P, reflect) → RandomHorizontalFlip
            → ColorJitter(brightness=b, contrast=c) → ToDtype(float32, scale) → Normalize(mean, std)

(eval: ToImage → Resize → ToDtype → Normalize), at about a third of its cost (`benchmarks/
loader_throughput.py`). It takes the same random numbers from torch's generator in the same order,
so a seeded run draws the same crops, flips and jitters; the reflect padding, crop and flip are one
index gather (no padded copy), and the jitter works in float32 with the floor that v2's uint8
arithmetic applies after each step, so the result matches v2's up to float rounding in the final
normalisation (tests/test_augment.py checks it over many seeds).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torchvision.transforms.v2 import functional as F

GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # ITU-R 601-2 luma, as torchvision's rgb_to_grayscale


def resize_rgb(rgb: np.ndarray, size: int) -> np.ndarray:
    """`rgb` (H, W, 3) uint8 resized to (size, size) with torchvision's antialiased bilinear resize on
    the uint8 tensor: the same operation as `v2.Resize((size, size), antialias=True)` after
    `v2.ToImage()`. An image of that size already is returned as it is."""
    if rgb.shape[:2] == (size, size):
        return rgb
    image = F.resize(_channels_first(rgb), [size, size], antialias=True)
    return image.permute(1, 2, 0).numpy()


def _channels_first(rgb: np.ndarray) -> torch.Tensor:
    """(H, W, 3) array → (3, H, W) tensor view; a read-only array (a store's mapped frame) is copied,
    since torch cannot share it."""
    rgb = np.ascontiguousarray(rgb) if rgb.flags.writeable else np.array(rgb, order="C")
    return torch.from_numpy(rgb).permute(2, 0, 1)


def reflect_indices(start: int, length: int, size: int) -> np.ndarray:
    """Indices `start … start+length-1` into a signal of `size`, reflected at both ends without
    repeating the edge (torch's and NumPy's "reflect"): -1 → 1, size → size-2."""
    index = np.abs(np.arange(start, start + length))
    return np.where(index >= size, 2 * (size - 1) - index, index)


class FrameTransform:
    """Resize to S × S; when `train`, a reflect-padded random crop (padding `padding`, default
    max(1, S // 16)), a horizontal flip with probability 1/2 and a brightness/contrast jitter of
    ±`brightness`/±`contrast` in random order; then scale to [0, 1] and normalise with mean/std."""

    def __init__(
        self,
        size: int,
        mean: Sequence[float],
        std: Sequence[float],
        train: bool = False,
        padding: int | None = None,
        brightness: float = 0.1,
        contrast: float = 0.1,
    ) -> None:
        self.size, self.train = size, train
        self.padding = max(1, size // 16) if padding is None else padding
        self.brightness = (1 - brightness, 1 + brightness)
        self.contrast = (1 - contrast, 1 + contrast)
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)

    def __repr__(self) -> str:  # part of the teacher-output cache's key: settings only, no address
        jitter = f"brightness={self.brightness}, contrast={self.contrast}, " if self.train else ""
        return (
            f"FrameTransform(size={self.size}, train={self.train}, padding={self.padding}, {jitter}"
            f"mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()})"
        )

    def __call__(self, rgb: np.ndarray) -> torch.Tensor:
        """The transformed frame `rgb` ((H, W, 3) uint8, e.g. `kdkit.images.read_rgb` or a store row)."""
        rgb = resize_rgb(rgb, self.size)
        if self.train:
            rgb = self._crop_and_flip(rgb)
        pixels = _channels_first(rgb).to(torch.float32, memory_format=torch.contiguous_format)
        if self.train:
            pixels = self._jitter(pixels)
        return pixels.mul_(1.0 / 255).sub_(self.mean).div_(self.std)

    def _crop_and_flip(self, rgb: np.ndarray) -> np.ndarray:
        span = 2 * self.padding + 1  # crop offsets 0 … 2P into the padded image, as RandomCrop draws them
        top = int(torch.randint(0, span, size=()))
        left = int(torch.randint(0, span, size=()))
        rows = reflect_indices(top - self.padding, self.size, self.size)
        cols = reflect_indices(left - self.padding, self.size, self.size)
        if torch.rand(1) < 0.5:  # RandomHorizontalFlip(p=0.5) flips when its draw is below p
            cols = cols[::-1]
        return rgb.take(rows, axis=0).take(cols, axis=1)  # two takes: faster than one 2-D gather

    def _jitter(self, pixels: torch.Tensor) -> torch.Tensor:
        order = torch.randperm(4)  # ColorJitter's order of brightness, contrast, saturation, hue
        brightness = float(torch.empty(1).uniform_(*self.brightness).item())
        contrast = float(torch.empty(1).uniform_(*self.contrast).item())
        for step in order.tolist():
            if step == 0:
                pixels = pixels.mul_(brightness).clamp_(0, 255).floor_()
            elif step == 1:
                red, green, blue = pixels.unbind(0)
                gray = red.mul(GRAY_WEIGHTS[0]).add_(green, alpha=GRAY_WEIGHTS[1])
                gray = gray.add_(blue, alpha=GRAY_WEIGHTS[2])
                mean = gray.floor_().unsqueeze(0).mean(dim=(-3, -2, -1), keepdim=True)
                pixels = pixels.mul_(contrast).add_(mean, alpha=1.0 - contrast).clamp_(0, 255).floor_()
        return pixels
