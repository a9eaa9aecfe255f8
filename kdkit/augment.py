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

With `on_device=True` the transform stops before the float work: it returns `Frames`, the resized,
cropped and flipped uint8 pixels with the jitter it drew (same draws, same order) and the mean/std.
A DataLoader collates them into a batch of `Frames`; `device_images` moves that batch to the
training device as uint8 (a quarter of float32's bytes) and finishes the jitter and normalisation
there, batched (`finish_frames`). The worker then only resizes (when the frame is not S × S yet),
crops and flips, and the cache, seeds and `aug_cycle` see the same augmentation as before.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

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


class Frames(NamedTuple):
    """Frames (one, or a collated batch with a leading dimension) whose augmentation ends on the
    device: `finish_frames` turns them into the normalised float images `FrameTransform` makes."""

    pixels: torch.Tensor  # uint8 (…, 3, S, S): resized, cropped and flipped
    jitter: torch.Tensor  # float32 (…, 3): brightness factor, contrast factor, 1.0 if brightness goes first
    mean: torch.Tensor  # float32 (…, 3)
    std: torch.Tensor  # float32 (…, 3)


NO_JITTER = (1.0, 1.0, 1.0)  # factors of 1 leave integer pixels exactly as they are


def device_images(images: torch.Tensor | Frames, device: torch.device) -> torch.Tensor:
    """The float images a model takes, on `device`: a tensor is moved there; `Frames` are moved as
    uint8 and finished there (`finish_frames`). The trainer, `predict` and the bench call it."""
    if isinstance(images, Frames):
        return finish_frames(Frames(*(part.to(device, non_blocking=True) for part in images)))
    return images.to(device, non_blocking=True)


def finish_frames(frames: Frames) -> torch.Tensor:
    """A batch of `Frames` → normalised float32 (B, 3, S, S), on the frames' device: each frame's
    brightness and contrast jitter in its drawn order, then scaling to [0, 1] and mean/std. Equal to
    `FrameTransform`'s per-frame result up to float rounding (where a rounding crosses an integer,
    a pixel moves by one level before normalisation)."""
    pixels = frames.pixels.to(torch.float32)
    brightness, contrast, brightness_first = (frames.jitter[:, i].view(-1, 1, 1, 1) for i in range(3))
    # Brightness before the contrast where it was drawn first, after it elsewhere; a factor of 1
    # leaves integer pixels as they are, so each frame gets exactly its own order.
    first = brightness_first.bool()
    before, after = torch.where(first, brightness, 1.0), torch.where(first, 1.0, brightness)
    pixels = _brightness(_contrast(_brightness(pixels, before), contrast), after)
    mean, std = frames.mean.view(-1, 3, 1, 1), frames.std.view(-1, 3, 1, 1)
    return pixels.mul_(1.0 / 255).sub_(mean).div_(std)


def _brightness(pixels: torch.Tensor, factor: float | torch.Tensor) -> torch.Tensor:
    """ColorJitter's brightness on float pixels 0…255, in place, with uint8 arithmetic's floor."""
    return pixels.mul_(factor).clamp_(0, 255).floor_()


def _contrast(pixels: torch.Tensor, factor: float | torch.Tensor) -> torch.Tensor:
    """ColorJitter's contrast on float pixels (…, 3, H, W) 0…255, in place: a blend with the mean
    of the (floored) luma of each frame, then the floor."""
    red, green, blue = pixels.unbind(-3)
    gray = red.mul(GRAY_WEIGHTS[0]).add_(green, alpha=GRAY_WEIGHTS[1]).add_(blue, alpha=GRAY_WEIGHTS[2])
    mean = gray.floor_().unsqueeze(-3).mean(dim=(-3, -2, -1), keepdim=True)
    if isinstance(factor, float):  # v2's blend, operation for operation (alpha, not a product)
        blended = pixels.mul_(factor).add_(mean, alpha=1.0 - factor)
    else:
        blended = pixels.mul_(factor).add_(mean * (1.0 - factor))
    return blended.clamp_(0, 255).floor_()


class FrameTransform:
    """Resize to S × S; when `train`, a reflect-padded random crop (padding `padding`, default
    max(1, S // 16)), a horizontal flip with probability 1/2 and a brightness/contrast jitter of
    ±`brightness`/±`contrast` in random order; then scale to [0, 1] and normalise with mean/std.
    `on_device`: return `Frames` and leave the jitter and normalisation to `device_images`."""

    def __init__(
        self,
        size: int,
        mean: Sequence[float],
        std: Sequence[float],
        train: bool = False,
        padding: int | None = None,
        brightness: float = 0.1,
        contrast: float = 0.1,
        on_device: bool = False,
    ) -> None:
        self.size, self.train, self.on_device = size, train, on_device
        self.padding = max(1, size // 16) if padding is None else padding
        self.brightness = (1 - brightness, 1 + brightness)
        self.contrast = (1 - contrast, 1 + contrast)
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)

    def __repr__(self) -> str:  # part of the teacher-output cache's key: settings only, no address
        jitter = f"brightness={self.brightness}, contrast={self.contrast}, " if self.train else ""
        return (
            f"FrameTransform(size={self.size}, train={self.train}, padding={self.padding}, {jitter}"
            f"mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()}"
            f"{', finished on the device' if self.on_device else ''})"
        )

    def __call__(self, rgb: np.ndarray) -> torch.Tensor | Frames:
        """The transformed frame `rgb` ((H, W, 3) uint8, e.g. `kdkit.images.read_rgb` or a store
        row): a float tensor, or with `on_device` the `Frames` that `device_images` finishes."""
        rgb = resize_rgb(rgb, self.size)
        if self.train:
            rgb = self._crop_and_flip(rgb)
        jitter = self._draw_jitter() if self.train else NO_JITTER
        if self.on_device:
            pixels = _channels_first(rgb).contiguous()
            return Frames(pixels, torch.tensor(jitter), self.mean.flatten(), self.std.flatten())
        pixels = _channels_first(rgb).to(torch.float32, memory_format=torch.contiguous_format)
        if self.train:
            brightness, contrast, brightness_first = jitter
            if brightness_first:
                pixels = _contrast(_brightness(pixels, brightness), contrast)
            else:
                pixels = _brightness(_contrast(pixels, contrast), brightness)
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

    def _draw_jitter(self) -> tuple[float, float, float]:
        """ColorJitter's draws in its order (the order of its four steps, then the brightness and
        contrast factors): (brightness, contrast, 1.0 if brightness comes before contrast)."""
        order = torch.randperm(4).tolist()  # brightness, contrast, saturation, hue
        brightness = float(torch.empty(1).uniform_(*self.brightness).item())
        contrast = float(torch.empty(1).uniform_(*self.contrast).item())
        return brightness, contrast, float(order.index(0) < order.index(1))
