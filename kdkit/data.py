"""Datasets and loaders.

A dataset factory is registered in `DATASETS` and called as `factory(split, spec)` with split
'train', 'val' or 'test' and the recipe's `DataSpec`; it returns a map-style dataset of
`(image_tensor, label)` pairs. kdkit ships `digits` (scikit-learn's bundled 8×8 handwritten
digits, no download); plugins add their own.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, TensorDataset

from kdkit.recipe import DataSpec
from kdkit.registry import DATASETS

SPLITS = ("train", "val", "test")


class DataError(ValueError):
    """A data set that cannot be used as configured (missing root, empty split, ...)."""


def build_dataset(spec: DataSpec, split: str) -> Dataset:
    """Build one split of the recipe's data set, checking it is not empty."""
    dataset = DATASETS.get(spec.dataset)(split, spec)
    if len(dataset) == 0:
        raise DataError(f"data: the {split!r} split of {spec.dataset!r} (root {spec.root}) is empty")
    return dataset


def build_loaders(
    spec: DataSpec, seed: int, eval_splits: tuple[str, ...] = ("val",)
) -> tuple[DataLoader, dict[str, DataLoader], Callable[[int], None]]:
    """Train loader, evaluation loaders and a `set_epoch(epoch)` that fixes the shuffle order.

    The order of epoch e depends only on (seed, e), so a resumed run and an ablation variant with
    the same seed see exactly the same batches.
    """
    generator = torch.Generator()
    train = DataLoader(
        build_dataset(spec, "train"),
        batch_size=spec.batch_size,
        shuffle=True,
        drop_last=False,
        num_workers=spec.num_workers,
        generator=generator,
        persistent_workers=spec.num_workers > 0,
        pin_memory=torch.cuda.is_available(),
    )
    evals = {split: eval_loader(build_dataset(spec, split), spec) for split in eval_splits}

    def set_epoch(epoch: int) -> None:
        generator.manual_seed(seed * 1_000_003 + epoch)

    return train, evals, set_epoch


def eval_loader(dataset: Dataset, spec: DataSpec) -> DataLoader:
    """An ordered (unshuffled) loader for evaluation."""
    return DataLoader(
        dataset,
        batch_size=spec.eval_batch_size or 2 * spec.batch_size,
        shuffle=False,
        num_workers=spec.num_workers,
        pin_memory=torch.cuda.is_available(),
    )


def example_batch(spec: DataSpec, n: int = 2) -> torch.Tensor:
    """A few training images (for dry runs that size adapters and check shapes)."""
    dataset = build_dataset(spec, "train")
    return torch.stack([dataset[i][0] for i in range(min(n, len(dataset)))])


def stratified_split(
    labels: np.ndarray, fractions: tuple[float, float, float], seed: int
) -> dict[str, np.ndarray]:
    """Indices of train/val/test, stratified by label, fixed by `seed`."""
    rng = np.random.default_rng(seed)
    parts: dict[str, list[int]] = {s: [] for s in SPLITS}
    for label in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == label))
        n_train = int(round(fractions[0] * len(idx)))
        n_val = int(round(fractions[1] * len(idx)))
        parts["train"] += idx[:n_train].tolist()
        parts["val"] += idx[n_train : n_train + n_val].tolist()
        parts["test"] += idx[n_train + n_val :].tolist()
    return {s: np.sort(np.array(v)) for s, v in parts.items()}


@DATASETS.register("digits")
def digits(split: str, spec: DataSpec) -> Dataset:
    """scikit-learn's handwritten digits (1,797 8×8 grey images, 10 classes), resized to
    `image_size`, split 60/20/20 (stratified, fixed by `options.split_seed`, default 0)."""
    from sklearn.datasets import load_digits

    if split not in SPLITS:
        raise DataError(f"digits: unknown split {split!r}; expected one of {SPLITS}")
    unknown = set(spec.options) - {"split_seed"}
    if unknown:
        raise DataError(
            f"data.options: unknown option(s) {sorted(unknown)} for digits; valid: ['split_seed']"
        )
    bunch: Any = load_digits()
    images = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
    images = F.interpolate(
        images, size=(spec.image_size, spec.image_size), mode="bilinear", align_corners=False
    )
    mean = torch.tensor(spec.mean[:1]).view(1, 1, 1, 1)
    std = torch.tensor(spec.std[:1]).view(1, 1, 1, 1)
    images = (images - mean) / std
    labels = torch.tensor(bunch.target, dtype=torch.long)
    index = stratified_split(bunch.target, (0.6, 0.2, 0.2), spec.options.get("split_seed", 0))[split]
    return TensorDataset(images[index], labels[index])
