"""A fast image transform: uint8 (H, W, 3) frame → normalised float (3, S, S), augmented on tensors.

`FrameTransform(size, mean, std, train=True)` computes, draw for draw and pixel for pixel, what this
torchvision v2 pipeline computes on a uint8 image:

    ToImage → Resize((S, S), antialias) → RandomCrop(S, padding=P, reflect) → RandomHorizontalFlip
            → ColorJitter(brightness=b, contrast=c) → ToDtype(float32, scale) → Normalize(mean, std)

(eval: ToImage → Resize → ToDtype → Normalize), at about a third of its cost (`benchmarks/
loader_throughput.py`). With `crop="resized"` the first two training steps are
`RandomResizedCrop(S, scale, ratio=(3/4, 4/3), antialias)` instead. It takes the same random
numbers from torch's generator in the same order, so a seeded run draws the same crops, flips and
jitters; the reflect padding, crop and flip are one index gather (no padded copy), and the jitter
works in float32 with the floor that v2's uint8 arithmetic applies after each step, so the result
matches v2's up to float rounding in the final normalisation (tests/data/test_augment.py checks it over
many seeds).

With `on_device=True` the transform stops after the draws: it returns `Frames`, the resized uint8
pixels with the crop window, flip and jitter it drew (same draws, same order) and the mean/std (a
resized crop is cropped, resized and flipped in the worker, since each frame's resize differs). A
DataLoader collates them into a batch of `Frames`; `device_images` moves that batch to the
training device as uint8 (a quarter of float32's bytes) and finishes it there, batched
(`finish_frames`): the padded crop and flip as two gathers, then the jitter and normalisation. The
worker then only resizes (when the frame is not S × S yet, or for a resized crop) and draws, and
the cache, seeds and `aug_cycle` see the same augmentation as before.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple, TypeVar

import numpy as np
import torch
from torchvision.transforms import RandomResizedCrop
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


Index = TypeVar("Index", np.ndarray, torch.Tensor)


def reflect(index: Index, size: int) -> Index:
    """Integer indices into a signal of `size` (within one reflection of it), reflected at both ends
    without repeating the edge (torch's and NumPy's "reflect"): -1 → 1, size → size-2. Works on a
    NumPy array (a worker's crop) and on a tensor (a batch's crops on the device) alike."""
    index = abs(index)
    return index - 2 * (index - (size - 1)).clip(min=0)


def reflect_indices(start: int, length: int, size: int) -> np.ndarray:
    """Indices `start … start+length-1` into a signal of `size`, reflected at both ends (`reflect`)."""
    return reflect(np.arange(start, start + length), size)


class Frames(NamedTuple):
    """Frames (one, or a collated batch with a leading dimension) whose augmentation ends on the
    device: `finish_frames` turns them into the normalised float images `FrameTransform` makes."""

    pixels: torch.Tensor  # uint8 (…, 3, S, S): resized (a resized crop: cropped, resized, flipped)
    window: torch.Tensor  # int64 (…, 3): the padded crop's first row and column in the frame, 1 to flip
    jitter: torch.Tensor  # float32 (…, 3): brightness factor, contrast factor, 1.0 if brightness goes first
    mean: torch.Tensor  # float32 (…, 3)
    std: torch.Tensor  # float32 (…, 3)


NO_WINDOW = (0, 0, 0)  # the whole frame, unflipped
NO_JITTER = (1.0, 1.0, 1.0)  # factors of 1 leave integer pixels exactly as they are


def device_images(images: torch.Tensor | Frames, device: torch.device) -> torch.Tensor:
    """The float images a model takes, on `device`: a tensor is moved there; `Frames` are moved as
    uint8 and finished there (`finish_frames`). The trainer, `predict` and the bench call it."""
    if isinstance(images, Frames):
        return finish_frames(Frames(*(part.to(device, non_blocking=True) for part in images)))
    return images.to(device, non_blocking=True)


def finish_frames(frames: Frames) -> torch.Tensor:
    """A batch of `Frames` → normalised float32 (B, 3, S, S), on the frames' device: each frame's
    crop window and flip, its brightness and contrast jitter in its drawn order, then scaling to
    [0, 1] and mean/std. Equal to `FrameTransform`'s per-frame result up to float rounding (where a
    rounding crosses an integer, a pixel moves by one level before normalisation)."""
    pixels = _gather_windows(frames.pixels, frames.window).to(torch.float32)
    brightness, contrast, brightness_first = (frames.jitter[:, i].view(-1, 1, 1, 1) for i in range(3))
    # Brightness before the contrast where it was drawn first, after it elsewhere; a factor of 1
    # leaves integer pixels as they are, so each frame gets exactly its own order.
    first = brightness_first.bool()
    before, after = torch.where(first, brightness, 1.0), torch.where(first, 1.0, brightness)
    pixels = _brightness(_contrast(_brightness(pixels, before), contrast), after)
    mean, std = frames.mean.view(-1, 3, 1, 1), frames.std.view(-1, 3, 1, 1)
    return pixels.mul_(1.0 / 255).sub_(mean).div_(std)


def _gather_windows(pixels: torch.Tensor, window: torch.Tensor) -> torch.Tensor:
    """Each frame of `pixels` (B, C, S, S) cropped at its window's reflected first row and column
    and flipped where it says so: two gathers, as `FrameTransform` crops a single frame."""
    batch, channels, size = pixels.shape[0], pixels.shape[1], pixels.shape[-1]
    steps = torch.arange(size, device=pixels.device)
    rows = reflect(window[:, :1] + steps, size)
    cols = reflect(window[:, 1:2] + steps, size)
    cols = torch.where(window[:, 2:].bool(), cols.flip(-1), cols)
    shape = (batch, channels, size, size)
    pixels = pixels.gather(2, rows.view(batch, 1, size, 1).expand(shape))
    return pixels.gather(3, cols.view(batch, 1, 1, size).expand(shape))


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


CROPS = ("pad", "resized")
CROP_SCALE = (0.08, 1.0)  # a resized crop's share of the frame's area, as torchvision's default


class FrameTransform:
    """Resize to S × S; when `train`, a crop, a horizontal flip with probability 1/2 and a
    brightness/contrast jitter of ±`brightness`/±`contrast` in random order; then scale to [0, 1]
    and normalise with mean/std. The crop: `pad`, a reflect-padded random S × S crop (padding
    `padding`, default max(1, S // 16)), which keeps the pixel scale; or `resized`, a random resized
    crop (a `crop_scale` share of the frame's area, aspect ratio 3/4…4/3, resized to S × S).
    `on_device`: return `Frames` and leave the crop, jitter and normalisation to `device_images`."""

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
        crop: str = "pad",
        crop_scale: tuple[float, float] = CROP_SCALE,
    ) -> None:
        if crop not in CROPS:
            raise ValueError(f"crop: expected one of {', '.join(CROPS)}, got {crop!r}")
        self.size, self.train, self.on_device, self.crop = size, train, on_device, crop
        self.padding = max(1, size // 16) if padding is None else padding
        self.crop_scale = tuple(crop_scale)
        self.brightness = (1 - brightness, 1 + brightness)
        self.contrast = (1 - contrast, 1 + contrast)
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)

    def __repr__(self) -> str:  # part of the teacher-output cache's key: settings only, no address
        crop = f"crop=resized(scale={self.crop_scale}), " if self.crop == "resized" else ""
        jitter = f"{crop}brightness={self.brightness}, contrast={self.contrast}, " if self.train else ""
        return (
            f"FrameTransform(size={self.size}, train={self.train}, padding={self.padding}, {jitter}"
            f"mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()}"
            f"{', finished on the device' if self.on_device else ''})"
        )

    def __call__(self, rgb: np.ndarray) -> torch.Tensor | Frames:
        """The transformed frame `rgb` ((H, W, 3) uint8, e.g. `kdkit.data.images.read_rgb` or a store
        row): a float tensor, or with `on_device` the `Frames` that `device_images` finishes."""
        if self.train and self.crop == "resized":
            image, window = self._resized_crop(rgb), NO_WINDOW  # cropped, resized and flipped
        else:
            rgb = resize_rgb(rgb, self.size)
            window = self._draw_window() if self.train else NO_WINDOW
            if window != NO_WINDOW and not self.on_device:
                rgb = _crop_window(rgb, window)
            image = _channels_first(rgb)
        jitter = self._draw_jitter() if self.train else NO_JITTER
        if self.on_device:
            window, jitter = torch.tensor(window), torch.tensor(jitter)
            return Frames(image.contiguous(), window, jitter, self.mean.flatten(), self.std.flatten())
        pixels = image.to(torch.float32, memory_format=torch.contiguous_format)
        if self.train:
            brightness, contrast, brightness_first = jitter
            if brightness_first:
                pixels = _contrast(_brightness(pixels, brightness), contrast)
            else:
                pixels = _brightness(_contrast(pixels, contrast), brightness)
        return pixels.mul_(1.0 / 255).sub_(self.mean).div_(self.std)

    def _draw_window(self) -> tuple[int, int, int]:
        """RandomCrop's and RandomHorizontalFlip's draws: the crop's first row and column in the
        frame (the padded image's offset less the padding) and 1 to flip."""
        span = 2 * self.padding + 1  # crop offsets 0 … 2P into the padded image, as RandomCrop draws them
        top = int(torch.randint(0, span, size=()))
        left = int(torch.randint(0, span, size=()))
        return top - self.padding, left - self.padding, self._draw_flip()

    @staticmethod
    def _draw_flip() -> int:
        return int(torch.rand(1) < 0.5)  # RandomHorizontalFlip(p=0.5) flips when its draw is below p

    def _resized_crop(self, rgb: np.ndarray) -> torch.Tensor:
        """RandomResizedCrop's and RandomHorizontalFlip's draws and their result: the crop resized
        to S × S (antialiased) and flipped, as a (3, S, S) uint8 tensor. Flipping here costs little
        next to the resize, so nothing of a resized crop is left for the device to gather."""
        image = _channels_first(rgb)
        top, left, height, width = RandomResizedCrop.get_params(image, list(self.crop_scale), [3 / 4, 4 / 3])
        crop = F.resized_crop(image, top, left, height, width, [self.size, self.size], antialias=True)
        return crop.flip(-1) if self._draw_flip() else crop

    def _draw_jitter(self) -> tuple[float, float, float]:
        """ColorJitter's draws in its order (the order of its four steps, then the brightness and
        contrast factors): (brightness, contrast, 1.0 if brightness comes before contrast)."""
        order = torch.randperm(4).tolist()  # brightness, contrast, saturation, hue
        brightness = float(torch.empty(1).uniform_(*self.brightness).item())
        contrast = float(torch.empty(1).uniform_(*self.contrast).item())
        return brightness, contrast, float(order.index(0) < order.index(1))


def _crop_window(rgb: np.ndarray, window: tuple[int, int, int]) -> np.ndarray:
    """The S × S crop of the square frame `rgb` at `window` (reflected at the edges), flipped when
    it says so: in a worker, one frame at a time, where these NumPy takes on (H, W, 3) are twice
    as fast as `_gather_windows` on a batch of one (188 against 406 µs at 224 px)."""
    size = rgb.shape[0]
    top, left, flip = window
    rows, cols = reflect_indices(top, size, size), reflect_indices(left, size, size)
    if flip:
        cols = cols[::-1]
    return rgb.take(rows, axis=0).take(cols, axis=1)  # two takes: faster than one 2-D gather
