"""The built-in `digits` data set: scikit-learn's bundled 8×8 handwritten digits (no download),
registered in `DATASETS` (whose built-ins name this module, so a recipe finds it by name).

Not `digits.py`: `kdkit.data.digits` is the factory function (its 0.2 name), and a submodule of
the same name would be hidden behind it (`mock.patch("kdkit.data.digits.…")` would fail)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, TensorDataset

from kdkit.config.schema import DataSpec
from kdkit.data.datasets import SPLITS
from kdkit.errors import DataError
from kdkit.registry import DATASETS


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
    if len(spec.mean) != 1:
        raise DataError(
            f"data.mean: digits images have 1 channel, so mean and std take one value each; got "
            f"mean {spec.mean}"
        )
    bunch: Any = load_digits()
    images = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
    images = F.interpolate(
        images, size=(spec.image_size, spec.image_size), mode="bilinear", align_corners=False
    )
    mean = torch.tensor(spec.mean).view(1, 1, 1, 1)
    std = torch.tensor(spec.std).view(1, 1, 1, 1)
    images = (images - mean) / std
    labels = torch.tensor(bunch.target, dtype=torch.long)
    index = stratified_split(bunch.target, (0.6, 0.2, 0.2), spec.options.get("split_seed", 0))[split]
    return TensorDataset(images[index], labels[index])


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
