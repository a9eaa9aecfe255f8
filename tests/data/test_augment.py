"""kdkit.data.augment.FrameTransform computes what the torchvision v2 pipeline it replaces computes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import default_collate
from torchvision.transforms import v2

from kdkit.data.augment import (
    NO_JITTER,
    Frames,
    FrameTransform,
    device_images,
    finish_frames,
    reflect,
    reflect_indices,
)

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def v2_pipeline(size: int, train: bool, crop: str = "pad", scale: tuple = (0.08, 1.0)) -> v2.Compose:
    """The torchvision pipeline FrameTransform stands for (its module docstring)."""
    if train and crop == "resized":
        steps: list = [v2.ToImage(), v2.RandomResizedCrop(size, scale=scale, antialias=True)]
    else:
        steps = [v2.ToImage(), v2.Resize((size, size), antialias=True)]
    if train:
        if crop == "pad":
            steps.append(v2.RandomCrop(size, padding=max(1, size // 16), padding_mode="reflect"))
        steps += [v2.RandomHorizontalFlip(), v2.ColorJitter(brightness=0.1, contrast=0.1)]
    return v2.Compose([*steps, v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(MEAN), list(STD))])


@pytest.mark.parametrize(
    ("train", "crop", "scale"),
    [
        (True, "pad", None),
        (False, "pad", None),
        (True, "resized", (0.08, 1.0)),
        (True, "resized", (0.5, 1.0)),
    ],
)
@pytest.mark.parametrize("size", [32, 64])
def test_same_draws_and_pixels_as_the_v2_pipeline(
    size: int, train: bool, crop: str, scale: tuple | None
) -> None:
    scale = scale or (0.08, 1.0)
    ours = FrameTransform(size, MEAN, STD, train, crop=crop, crop_scale=scale)
    theirs = v2_pipeline(size, train, crop, scale)
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
    index = np.arange(-9, 19)  # within one reflection either side
    assert np.array_equal(reflect(torch.from_numpy(index), 10).numpy(), reflect(index, 10))
    assert np.array_equal(signal[reflect(index, 10)], np.pad(signal, 9, mode="reflect"))


def test_an_unknown_crop_is_refused() -> None:
    with pytest.raises(ValueError, match="crop: expected one of pad, resized, got 'center'"):
        FrameTransform(32, MEAN, STD, train=True, crop="center")


def test_repr_names_settings_not_the_object() -> None:
    a, b = FrameTransform(32, MEAN, STD, train=True), FrameTransform(32, MEAN, STD, train=True)
    assert repr(a) == repr(b) and "0x" not in repr(a)  # a teacher-cache key part, stable across runs
    assert repr(a) != repr(FrameTransform(32, MEAN, STD, train=True, contrast=0.2))
    resized = FrameTransform(32, MEAN, STD, train=True, crop="resized", crop_scale=(0.5, 1.0))
    assert "crop=resized(scale=(0.5, 1.0))" in repr(resized) and repr(resized) != repr(a)


def _views(transform: FrameTransform, frames: list[np.ndarray]) -> list:
    """`transform` of each frame, frame i drawn from seed i (as a seeded loader worker draws)."""
    views = []
    for seed, frame in enumerate(frames):
        torch.manual_seed(seed)
        views.append(transform(frame))
    return views


@pytest.mark.parametrize(("train", "crop"), [(True, "pad"), (False, "pad"), (True, "resized")])
def test_frames_finished_on_the_device_equal_the_workers_images(train: bool, crop: str) -> None:
    rng = np.random.default_rng(1)
    frames = [rng.integers(0, 256, (40, 40 + i % 3, 3), dtype=np.uint8) for i in range(64)]
    in_workers = torch.stack(_views(FrameTransform(32, MEAN, STD, train, crop=crop), frames))
    handed_over = _views(FrameTransform(32, MEAN, STD, train, on_device=True, crop=crop), frames)
    assert all(isinstance(view, Frames) and view.pixels.dtype == torch.uint8 for view in handed_over)
    batch = default_collate(handed_over)  # what a DataLoader hands the trainer
    assert isinstance(batch, Frames) and batch.pixels.shape == (64, 3, 32, 32)
    finished = device_images(batch, torch.device("cpu"))
    assert finished.dtype == torch.float32 and finished.shape == in_workers.shape
    # In pixel levels 0…255: the same augmentation; a float rounding may move a level by one.
    levels = (finished - in_workers) * torch.tensor(STD).view(1, 3, 1, 1) * 255
    assert levels.abs().max() < 1.001
    assert (levels.abs() > 1e-3).float().mean() < 1e-3


def test_finish_frames_applies_each_frames_jitter_in_its_order() -> None:
    pixels = torch.full((2, 3, 4, 4), 100, dtype=torch.uint8)
    pixels[:, 0] = 200  # a red frame: contrast pulls towards its luma mean
    # Same factors, opposite orders: brightness 1.5 first clamps red at 255 before the contrast.
    jitter = torch.tensor([[1.5, 0.5, 1.0], [1.5, 0.5, 0.0]])
    identity = torch.zeros(2, 3), torch.full((2, 3), 1 / 255)
    out = finish_frames(Frames(pixels, torch.zeros(2, 3, dtype=torch.long), jitter, *identity))
    gray = np.floor(0.2989 * 200 + 0.587 * 100 + 0.114 * 100)
    bright_gray = np.floor(0.2989 * 255 + 0.587 * 150 + 0.114 * 150)
    assert out[0, 0, 0, 0] == np.floor(255 * 0.5 + bright_gray * 0.5)  # brightness, then contrast
    assert out[1, 0, 0, 0] == min(255, np.floor(np.floor(200 * 0.5 + gray * 0.5) * 1.5))


def test_device_images_moves_a_plain_tensor_unchanged() -> None:
    images = torch.randn(2, 3, 8, 8)
    assert torch.equal(device_images(images, torch.device("cpu")), images)


def test_finish_frames_crops_and_flips_each_frame_at_its_window() -> None:
    pixels = torch.arange(2 * 3 * 6 * 6, dtype=torch.uint8).view(2, 3, 6, 6)
    window = torch.tensor([[-2, 1, 0], [1, -1, 1]])  # reflected above / at the left edge; the second flipped
    identity = (torch.tensor([NO_JITTER, NO_JITTER]), torch.zeros(2, 3), torch.full((2, 3), 1 / 255))
    out = finish_frames(Frames(pixels, window, *identity))
    padded = np.pad(pixels.numpy(), ((0, 0), (0, 0), (2, 2), (2, 2)), mode="reflect")
    assert np.array_equal(out[0].numpy(), padded[0, :, 0:6, 3:9])
    assert np.array_equal(out[1].numpy(), padded[1, :, 3:9, 1:7][:, :, ::-1])
