"""Datasets and loaders.

A dataset factory is registered in `DATASETS` and called as `factory(split, spec)` with split
'train', 'val' or 'test' and the recipe's `DataSpec`; it returns a map-style dataset of
`(image_tensor, label)` pairs. kdkit ships `digits` (`kdkit.data.digits_set`: scikit-learn's bundled
8×8 handwritten digits, no download); plugins add their own. The training order comes from
`kdkit.data.samplers`.

A factory never creates data: a missing root is a `DataError`. A factory that can generate its
data set when the recipe asks for it (e.g. `fas_folder` with `data.options.synth`) carries a
`generate(spec) -> bool` attribute, which only `generate_data` calls — and only the commands that
create data for a run call that (`kdkit run`, `kdkit ablate` and `kdkit validate`, through
`kdkit.run.checks.check_recipe(recipe, generate=True)`); `eval`, `info`, `export`, `predict` and
`bench` read the data as it is, so a mistyped root is reported, never filled with a new data set.
Image files are decoded by `kdkit.data.images.read_rgb` and CSV files read by
`kdkit.data.csvfile.read_csv`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import random
from collections.abc import Callable, Hashable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import (
    ConcatDataset,
    DataLoader,
    Dataset,
    Subset,
    TensorDataset,
    default_collate,
)

from kdkit.config.schema import DataSpec
from kdkit.data.augment import device_images
from kdkit.data.samplers import BalancedSampler, EpochSampler, sample_strata
from kdkit.errors import DataError
from kdkit.registry import DATASETS
from kdkit.utils import distributed

SPLITS = ("train", "val", "test")


def generate_data(spec: DataSpec) -> bool:
    """Generate the recipe's data set if its factory can and the recipe asks for it (see the module
    docstring); True when something was generated. Only commands that create data for a run call it."""
    generate = getattr(DATASETS.get(spec.dataset), "generate", None)
    return bool(generate(spec)) if generate is not None else False


def build_dataset(spec: DataSpec, split: str) -> Dataset:
    """Build one split of the recipe's data set, checking it is not empty."""
    dataset = DATASETS.get(spec.dataset)(split, spec)
    if len(dataset) == 0:
        raise DataError(f"data: the {split!r} split of {spec.dataset!r} (root {spec.root}) is empty")
    return dataset


UNLABELED = -1  # the label of a sample without one: it contributes only the teacher's terms
LABEL_SPLIT_SEED = 0  # which labels `data.labeled_fraction` keeps: the same samples in every run


class WithoutLabels(Dataset):
    """`dataset`'s samples with each label replaced by `UNLABELED`."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[Any, ...]:
        image, label, *rest = self.dataset[index]
        # the same type as a labelled sample's, so that a batch mixing both collates
        unlabeled = torch.full_like(label, UNLABELED) if isinstance(label, torch.Tensor) else UNLABELED
        return (image, unlabeled, *rest)


class PartlyLabeled(ConcatDataset):
    """The labelled samples followed by the unlabelled pool, with `labels` (`UNLABELED` for the pool)."""

    def __init__(self, labeled: Dataset, pool: Dataset | None) -> None:
        super().__init__([labeled] if pool is None else [labeled, WithoutLabels(pool)])
        self.labels = dataset_labels(labeled) + [UNLABELED] * (0 if pool is None else len(pool))  # type: ignore[arg-type]
        self.transform = getattr(_base(labeled), "transform", None)

    def fingerprint(self) -> Any:
        """The fingerprints of the labelled data and the pool (what the images depend on), and a
        hash of which samples are labelled (what decides which sample an index is)."""
        parts = [_base(d) for d in self.datasets]
        labeled = list(getattr(self.datasets[0], "indices", []))  # the pool of 'rest' is the others
        digest = hashlib.sha256(repr(labeled).encode()).hexdigest()
        return [getattr(p, "fingerprint", lambda: None)() for p in parts] + [digest]


def _base(dataset: Dataset) -> Dataset:
    """The data set under Subset and WithoutLabels wrappers."""
    while isinstance(dataset, (Subset, WithoutLabels)):
        dataset = dataset.dataset
    return dataset


def dataset_labels(dataset: Dataset) -> list[int]:
    """Every sample's label: the dataset's `labels` attribute (through Subsets), a TensorDataset's
    second tensor, else read sample by sample."""
    if isinstance(dataset, Subset):
        parent = dataset_labels(dataset.dataset)  # once: the fallback reads every sample
        return [parent[i] for i in dataset.indices]
    labels = getattr(dataset, "labels", None)
    if labels is None and isinstance(dataset, TensorDataset):
        labels = dataset.tensors[1]
    if labels is None:
        labels = [dataset[i][1] for i in range(len(dataset))]  # type: ignore[arg-type]
    return [int(label) for label in labels]


def training_set(spec: DataSpec, with_unlabeled: bool) -> Dataset:
    """The training split as a stage trains on it: the samples whose labels
    `spec.labeled_fraction` keeps, then (for a distill stage, `with_unlabeled`) the
    `spec.unlabeled` pool with the label `UNLABELED`.

    Labels are kept per unit (the training set's `units`, e.g. a frame data set's videos, so that
    no video is split between the labelled samples and the pool) and stratified by its `groups`
    (e.g. (domain, label)), else by label; see `labeled_subset`."""
    train = build_dataset(spec, "train")
    if spec.labeled_fraction == 1.0 and (spec.unlabeled is None or not with_unlabeled):
        return train
    keep, rest = labeled_subset(
        dataset_labels(train),
        spec.labeled_fraction,
        LABEL_SPLIT_SEED,
        units=getattr(train, "units", None),
        strata=getattr(train, "groups", None),
    )
    labeled = Subset(train, keep)
    pool = None
    if with_unlabeled and spec.unlabeled == "rest":
        pool = Subset(train, rest)
    elif with_unlabeled and spec.unlabeled is not None:
        u = spec.unlabeled
        pool_spec = dataclasses.replace(
            spec, dataset=u.dataset, root=u.root, options=u.options, labeled_fraction=1.0, unlabeled=None
        )
        pool = build_dataset(pool_spec, u.split)
    return PartlyLabeled(labeled, pool)


def augmentation_seed(seed: int, slot: int, index: int) -> int:
    """The seed of one sample's augmentation: a hash of (run seed, slot, sample index)."""
    digest = hashlib.blake2b(f"{seed}:{slot}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


@contextlib.contextmanager
def seeded_rng(seed: int) -> Iterator[None]:
    """Run a block with torch, NumPy and Python `random` seeded by `seed`, then restore all three."""
    states = torch.get_rng_state(), np.random.get_state(), random.getstate()
    torch.default_generator.manual_seed(seed)  # the CPU generator only: torch.manual_seed is 100x slower
    np.random.seed(seed % 2**32)
    random.seed(seed)
    try:
        yield
    finally:
        torch.set_rng_state(states[0])
        np.random.set_state(states[1])
        random.setstate(states[2])


class SeededAugmentation(Dataset):
    """A training set whose random augmentation is a function of (sample index, augmentation slot).

    `dataset[(index, slot)]` returns the item of `dataset[index]` plus its cache key
    `tensor([index, slot])`; the item's transform runs with every RNG seeded by
    `augmentation_seed(seed, slot, index)`, so the same key always gives the same image (in the
    main process or any worker). That is what makes a cached teacher output valid for it.
    Transforms must draw their randomness from torch, NumPy or `random` (torchvision and timm do).
    """

    def __init__(self, dataset: Dataset, seed: int, identity: dict[str, Any] | None = None) -> None:
        self.dataset, self.seed = dataset, seed
        self.identity = identity or {}

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int]) -> tuple[Any, ...]:
        index, slot = key
        with seeded_rng(augmentation_seed(self.seed, slot, index)):
            item = self.dataset[index]
        return (*item, torch.tensor([index, slot]))

    def describe(self) -> dict[str, Any]:
        """What the augmented images depend on (for cache keys): data settings, seed, transform, files."""
        fingerprint = getattr(self.dataset, "fingerprint", None)
        return {
            **self.identity,
            "seed": self.seed,
            "size": len(self),
            "type": type(self.dataset).__name__,
            "transform": repr(getattr(self.dataset, "transform", None)),
            "fingerprint": fingerprint() if callable(fingerprint) else None,
        }


# DataSpec fields that do not change what an augmented training image looks like.
_NOT_IN_IMAGES = ("batch_size", "eval_batch_size", "num_workers", "aug_cycle", "balanced", "epoch_size")


def build_loaders(
    spec: DataSpec,
    seed: int,
    eval_splits: tuple[str, ...] = ("val",),
    min_batch: int = 1,
    with_unlabeled: bool = False,
) -> tuple[DataLoader, dict[str, DataLoader], Callable[[int, int], None]]:
    """Train loader, evaluation loaders and a `set_epoch(epoch, skip=0)` that fixes the shuffle order.

    Training batches are `(images, labels, keys)`, keys `(B, 2)` = (sample index, augmentation
    slot). The order and augmentation of epoch e depend only on (seed, e), so a resumed run and an
    ablation variant with the same seed see exactly the same batches; with `spec.balanced` every
    batch draws equally from each group of the training set (`BalancedSampler`). Under torch.distributed,
    `spec.batch_size` is the global batch: each of the `world` ranks loads batch_size / world.
    A trailing batch of fewer than `min_batch` samples is dropped (see `Adapter.min_batch`).
    The training set is `training_set(spec, with_unlabeled)`.
    """
    rank, world = distributed.rank(), distributed.world_size()
    if spec.batch_size % world:
        raise DataError(
            f"data.batch_size: {spec.batch_size} is the global batch and must divide evenly "
            f"between the {world} processes"
        )
    identity = {k: v for k, v in dataclasses.asdict(spec).items() if k not in _NOT_IN_IMAGES}
    train_set = training_set(spec, with_unlabeled)
    dataset = SeededAugmentation(train_set, seed, identity)
    sampler = (
        BalancedSampler(sample_strata(train_set), spec.batch_size, seed, spec.aug_cycle, rank, world)
        if spec.balanced
        else EpochSampler(len(dataset), seed, spec.aug_cycle, rank, world, spec.epoch_size)
    )
    per_rank = spec.batch_size // world
    train = DataLoader(
        dataset,
        batch_size=per_rank,
        sampler=sampler,
        drop_last=0 < len(sampler) % per_rank < min_batch,
        num_workers=spec.num_workers,
        # Only seeds the workers' base RNG: given, so loading never draws from the global RNG.
        generator=torch.Generator().manual_seed(seed),
        persistent_workers=spec.num_workers > 0,
        pin_memory=torch.cuda.is_available(),
    )
    evals = {split: eval_loader(build_dataset(spec, split), spec) for split in eval_splits}
    return train, evals, sampler.set_epoch


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
    """A few training images (for dry runs that size adapters and check shapes), as a model takes
    them (frames whose augmentation finishes on the device are finished, on the CPU)."""
    dataset = build_dataset(spec, "train")
    images = default_collate([dataset[i][0] for i in range(min(n, len(dataset)))])
    return device_images(images, torch.device("cpu"))


def example_input(spec: DataSpec, n: int = 1) -> torch.Tensor:
    """Zeros shaped like `n` of the data's images, (n, len(mean), S, S), without reading any data."""
    return torch.zeros(n, len(spec.mean), spec.image_size, spec.image_size)


def labeled_subset(
    labels: Sequence[int],
    fraction: float,
    seed: int,
    units: Sequence[Hashable] | None = None,
    strata: Sequence[Hashable] | None = None,
) -> tuple[list[int], list[int]]:
    """Indices of the samples whose labels are kept and of the rest, both sorted; fixed by `seed`.

    The draw is per unit (`units`, one per sample, e.g. its video: a unit's samples are all kept or
    all left; default: every sample is its own unit) within each stratum (`strata`, one per sample,
    e.g. (domain, label); default: the label): `fraction` of the units of every stratum, at least
    one. A unit found in two strata counts as one unit in each.
    """
    rng = np.random.default_rng(seed)
    members: dict[Hashable, dict[Hashable, list[int]]] = {}
    strata = labels if strata is None else strata
    units = range(len(labels)) if units is None else units
    for index, (stratum, unit) in enumerate(zip(strata, units, strict=True)):
        members.setdefault(stratum, {}).setdefault(unit, []).append(index)
    keep: list[int] = []
    for stratum in _in_order(members):
        stratum_units = list(members[stratum].values())  # its units' samples, in order of first sample
        for unit in rng.permutation(len(stratum_units))[: max(1, round(fraction * len(stratum_units)))]:
            keep += stratum_units[unit]
    kept = set(keep)
    return sorted(keep), [i for i in range(len(labels)) if i not in kept]


def _in_order(keys: dict[Hashable, Any]) -> list[Hashable]:
    """`keys` sorted (so a draw does not depend on which stratum comes first in the data), or in
    their order of first appearance when they cannot be compared."""
    try:
        return sorted(keys)  # type: ignore[type-var]
    except TypeError:
        return list(keys)
