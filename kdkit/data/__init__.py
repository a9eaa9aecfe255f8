"""Data: datasets and loaders, the training order (samplers), the built-in digits set, augmentation,
frame stores, images, CSV files.

The names below were `kdkit.data`'s in 0.2 and stay importable from here."""

from kdkit.data.datasets import (
    LABEL_SPLIT_SEED,
    SPLITS,
    UNLABELED,
    PartlyLabeled,
    SeededAugmentation,
    WithoutLabels,
    augmentation_seed,
    build_dataset,
    build_loaders,
    dataset_labels,
    eval_loader,
    example_batch,
    example_input,
    generate_data,
    labeled_subset,
    seeded_rng,
    training_set,
)
from kdkit.data.digits_set import digits, stratified_split
from kdkit.data.samplers import BalancedSampler, EpochSampler, sample_strata
from kdkit.errors import DataError

sample_groups = sample_strata  # 0.2 name

__all__ = [
    "augmentation_seed",
    "BalancedSampler",
    "build_dataset",
    "build_loaders",
    "DataError",
    "dataset_labels",
    "digits",
    "EpochSampler",
    "eval_loader",
    "example_batch",
    "example_input",
    "generate_data",
    "LABEL_SPLIT_SEED",
    "labeled_subset",
    "PartlyLabeled",
    "sample_groups",
    "sample_strata",
    "seeded_rng",
    "SeededAugmentation",
    "SPLITS",
    "stratified_split",
    "training_set",
    "UNLABELED",
    "WithoutLabels",
]
