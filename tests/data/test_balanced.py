"""`data.balanced`: BalancedSampler's batches, order, DDP shares and resume; the recipe check."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from conftest import tiny_recipe_dict
from torch.utils.data import Dataset

from kdkit.config.schema import DataSpec, RecipeError
from kdkit.config.validation import parse_recipe
from kdkit.data.datasets import build_loaders
from kdkit.data.samplers import BalancedSampler, EpochSampler, sample_strata
from kdkit.errors import DataError
from kdkit.registry import DATASETS
from kdkit.run.checks import check_recipe

# 3 domains x 2 labels of unequal sizes: 40, 5, 12, 3, 7, 1 samples
SIZES = {("a", 0): 40, ("a", 1): 5, ("b", 0): 12, ("b", 1): 3, ("c", 0): 7, ("c", 1): 1}
GROUPS = [group for group, n in SIZES.items() for _ in range(n)]


def batches(sampler: BalancedSampler, size: int) -> list[list[tuple[int, int]]]:
    keys = list(sampler)
    return [keys[i : i + size] for i in range(0, len(keys), size)]


def test_every_batch_draws_equally_from_each_group() -> None:
    sampler = BalancedSampler(GROUPS, batch_size=12, seed=0)
    drawn = batches(sampler, 12)
    assert len(drawn) == len(EpochSampler(len(GROUPS), 0)) // 12 + 1 == 6  # EpochSampler's steps
    for batch in drawn:
        assert Counter(GROUPS[i] for i, _ in batch) == dict.fromkeys(SIZES, 2)
    used = Counter(i for batch in drawn for i, _ in batch)
    # the single sample of ('c', 1) repeats; ('a', 0) is subsampled without repeats
    assert used[GROUPS.index(("c", 1))] == 12
    assert max(used[i] for i, g in enumerate(GROUPS) if g == ("a", 0)) == 1


def test_order_is_fixed_by_seed_and_epoch_and_slots_follow_aug_cycle() -> None:
    first, again = BalancedSampler(GROUPS, 12, seed=3, aug_cycle=2), BalancedSampler(GROUPS, 12, seed=3)
    assert [i for i, _ in first] == [i for i, _ in again]
    first.set_epoch(1)
    assert {slot for _, slot in first} == {1}
    epoch1 = [i for i, _ in first]
    assert epoch1 != [i for i, _ in again]
    first.set_epoch(2)
    assert {slot for _, slot in first} == {0}  # epoch 2 replays slot 0 (the teacher cache's keys)
    assert [i for i, _ in BalancedSampler(GROUPS, 12, seed=4)] != [i for i, _ in again]


def test_ranks_share_every_global_batch_and_resume_skips_trained_samples() -> None:
    whole = [i for i, _ in BalancedSampler(GROUPS, 12, seed=1)]
    ranks = [BalancedSampler(GROUPS, 12, seed=1, rank=r, world=2) for r in range(2)]
    shares = [[i for i, _ in s] for s in ranks]
    assert len(ranks[0]) == len(whole) // 2
    for step in range(len(whole) // 12):  # each rank's batch of 6 = its half of global batch `step`
        merged = sorted(shares[0][step * 6 : step * 6 + 6] + shares[1][step * 6 : step * 6 + 6])
        assert merged == sorted(whole[step * 12 : step * 12 + 12])
    ranks[1].set_epoch(0, skip=6)
    assert [i for i, _ in ranks[1]] == shares[1][6:]


def test_batch_size_must_split_between_groups() -> None:
    with pytest.raises(DataError, match=r"data.batch_size: 10 must be a multiple of the 6 groups"):
        BalancedSampler(GROUPS, batch_size=10, seed=0)


class Unlabelled(Dataset):
    def __len__(self) -> int:
        return 3


def test_strata_come_from_groups_else_labels_else_a_clear_error() -> None:
    labelled = Unlabelled()
    labelled.labels = [0, 1, 1]
    assert sample_strata(labelled) == [0, 1, 1]
    labelled.groups = [("x", 0), ("x", 1), ("y", 1)]
    assert sample_strata(labelled) == [("x", 0), ("x", 1), ("y", 1)]
    with pytest.raises(DataError, match="data.balanced: the Unlabelled training set has neither"):
        sample_strata(Unlabelled())


class Grouped(Dataset):
    """Tiny grey images in 3 groups (for the recipe check)."""

    def __init__(self) -> None:
        self.groups = [0, 1, 2] * 4
        self.labels = [g % 2 for g in self.groups]

    def __len__(self) -> int:
        return len(self.groups)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return torch.zeros(1, 16, 16), self.labels[index]


def grouped_recipe(**data) -> dict:
    if "balanced_grouped" not in DATASETS:
        DATASETS.add("balanced_grouped", lambda split, spec: Grouped())
    recipe = tiny_recipe_dict()
    recipe["data"].update(dataset="balanced_grouped", **data)
    return recipe


def test_recipe_refuses_a_batch_that_does_not_split_between_groups() -> None:
    with pytest.raises(RecipeError, match=r"data.batch_size: 8 is not a multiple of the 3 groups .* 6 or 9"):
        check_recipe(parse_recipe(grouped_recipe(batch_size=8, balanced=True)))
    check_recipe(parse_recipe(grouped_recipe(batch_size=9, balanced=True)))
    with pytest.raises(RecipeError, match=r"data.balanced: expected true/false, got 'yes'"):
        parse_recipe(grouped_recipe(balanced="yes"))


def test_build_loaders_balances_the_training_batches() -> None:
    grouped_recipe()  # registers the data set
    spec = DataSpec(
        dataset="balanced_grouped", image_size=16, batch_size=6, balanced=True, mean=[0.5], std=[0.5]
    )
    train, _, set_epoch = build_loaders(spec, seed=0)
    set_epoch(1)
    groups = Grouped().groups
    for _, _, keys in train:
        assert Counter(groups[int(i)] for i in keys[:, 0]) == {0: 2, 1: 2, 2: 2}
        assert set(keys[:, 1].tolist()) == {1}
