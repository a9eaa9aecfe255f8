"""kdkit.augment.FrameTransform computes what the torchvision v2 pipeline it replaces computes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torchvision.transforms import v2

from kdkit.augment import FrameTransform, reflect_indices

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def v2_pipeline(size: int, train: bool) -> v2.Compose:
    """The torchvision pipeline FrameTransform stands for (its module docstring)."""
    steps: list = [v2.ToImage(), v2.Resize((size, size), antialias=True)]
    if train:
        steps += [
            v2.RandomCrop(size, padding=max(1, size // 16), padding_mode="reflect"),
            v2.RandomHorizontalFlip(),
            v2.ColorJitter(brightness=0.1, contrast=0.1),
        ]
    return v2.Compose([*steps, v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(MEAN), list(STD))])


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("size", [32, 64])
def test_same_draws_and_pixels_as_the_v2_pipeline(size: int, train: bool) -> None:
    ours, theirs = FrameTransform(size, MEAN, STD, train), v2_pipeline(size, train)
    rng = np.random.default_rng(size)
    for seed in range(40):
        # Square frames of the size, larger ones (resized first) and non-square ones.
        height = (size, size + 9, size + 3)[seed % 3]
        width = height + (seed % 3 == 2) * 5
        frame = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        torch.manual_seed(seed)
        expected, after_theirs = theirs(frame), torch.rand(1)
        torch.manual_seed(seed)
        got, after_ours = ours(frame), torch.rand(1)
        assert torch.equal(got, expected), f"seed {seed}: max difference {(got - expected).abs().max()}"
        assert torch.equal(after_ours, after_theirs)  # as many random numbers drawn


def test_augmentation_varies_and_reads_read_only_frames() -> None:
    frame = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    frame.flags.writeable = False  # as a memory-mapped store row is
    transform = FrameTransform(32, MEAN, STD, train=True)
    views = torch.stack([transform(frame) for _ in range(8)])
    assert len({view.sum().item() for view in views}) > 1
    assert torch.equal(FrameTransform(32, MEAN, STD)(frame), FrameTransform(32, MEAN, STD)(frame.copy()))


def test_reflect_indices_match_numpy_reflect_padding() -> None:
    signal = np.arange(10)
    padded = np.pad(signal, 3, mode="reflect")
    for start in range(-3, 4):
        assert np.array_equal(signal[reflect_indices(start, 10, 10)], padded[start + 3 : start + 13])


def test_repr_names_settings_not_the_object() -> None:
    a, b = FrameTransform(32, MEAN, STD, train=True), FrameTransform(32, MEAN, STD, train=True)
    assert repr(a) == repr(b) and "0x" not in repr(a)  # a teacher-cache key part, stable across runs
    assert repr(a) != repr(FrameTransform(32, MEAN, STD, train=True, contrast=0.2))
