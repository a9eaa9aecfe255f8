"""An unlabelled pool (`data.unlabeled`), a kept fraction of the labels (`data.labeled_fraction`)
and the epoch length (`data.epoch_size`): what each stage trains on, and what an unlabelled sample
contributes to the loss."""

from __future__ import annotations

import dataclasses
from collections import Counter

import numpy as np
import pytest
import torch
from conftest import tiny_vit

from kdkit.config.schema import DataSpec, RecipeError
from kdkit.config.validation import parse_recipe
from kdkit.data.datasets import (
    UNLABELED,
    build_dataset,
    build_loaders,
    labeled_subset,
    training_set,
)
from kdkit.data.samplers import EpochSampler
from kdkit.distill.distiller import Distiller
from kdkit.distill.losses import labeled_cross_entropy
from kdkit.distill.pairs import layer_pairs
from kdkit.registry import DATASETS
from kdkit.training.task import SupervisedTask


def _labels(dataset) -> list[int]:
    return [int(dataset[i][1]) for i in range(len(dataset))]


def test_labeled_subset_keeps_the_fraction_of_every_class_and_partitions_the_rest() -> None:
    labels = [0] * 50 + [1] * 30 + [2] * 3
    keep, rest = labeled_subset(labels, 0.1, seed=0)
    assert Counter(labels[i] for i in keep) == {0: 5, 1: 3, 2: 1}  # at least one of each class
    assert sorted(keep + rest) == list(range(len(labels))) and not set(keep) & set(rest)
    assert labeled_subset(labels, 0.1, seed=0) == (keep, rest)  # the same labels in every run
    assert labeled_subset(labels, 0.1, seed=1)[0] != keep


def test_labels_are_kept_per_unit_within_each_stratum() -> None:
    """Units (videos) are kept or left whole; the fraction is of each stratum's units."""
    units = [f"v{i // 3}" for i in range(60)]  # 20 videos of 3 frames
    strata = [("A" if i < 30 else "B", i // 3 % 2) for i in range(60)]  # 2 domains x 2 labels
    labels = [s[1] for s in strata]
    keep, rest = labeled_subset(labels, 0.4, seed=0, units=units, strata=strata)
    kept_units, rest_units = {units[i] for i in keep}, {units[i] for i in rest}
    assert not kept_units & rest_units and sorted(keep + rest) == list(range(60))
    assert Counter(strata[i] for i in keep) == {s: 2 * 3 for s in set(strata)}  # 40 % of 5 videos, 3 frames
    assert labeled_subset(labels, 0.4, seed=0, units=units, strata=strata) == (keep, rest)


def test_labels_of_single_samples_are_drawn_as_before() -> None:
    """Without units every sample is its own: the draws of earlier versions (and the published
    digits results) stay the same."""

    def before(labels: list[int], fraction: float, seed: int) -> list[int]:
        rng, labels_ = np.random.default_rng(seed), np.asarray(labels)
        keep: list[int] = []
        for label in np.unique(labels_):
            idx = rng.permutation(np.flatnonzero(labels_ == label))
            keep += idx[: max(1, round(fraction * len(idx)))].tolist()
        return sorted(keep)

    labels = np.random.default_rng(3).integers(0, 12, 300).tolist()
    for fraction, seed in ((0.1, 0), (0.5, 1)):
        assert labeled_subset(labels, fraction, seed)[0] == before(labels, fraction, seed)


def test_a_distill_stage_trains_on_the_kept_labels_then_the_pool_without_labels(
    digits_spec: DataSpec,
) -> None:
    spec = dataclasses.replace(digits_spec, labeled_fraction=0.1, unlabeled="rest")
    full = build_dataset(spec, "train")
    with_pool, labels_only = training_set(spec, True), training_set(spec, False)
    assert len(with_pool) == len(full)
    assert len(labels_only) == with_pool.labels.count(UNLABELED) * 0 + len(labels_only)
    kept = [label for label in _labels(with_pool) if label != UNLABELED]
    assert len(kept) == len(labels_only) == pytest.approx(0.1 * len(full), abs=10)
    assert _labels(labels_only) == kept  # the train stage sees exactly the distill stage's labelled part
    assert _labels(with_pool) == with_pool.labels
    # every training image appears once: the pool is the rest of the split, not a copy
    images = torch.stack([with_pool[i][0] for i in range(len(with_pool))]).flatten(1)
    reference = torch.stack([full[i][0] for i in range(len(full))]).flatten(1)
    assert torch.equal(images.sort(dim=0).values, reference.sort(dim=0).values)


def test_another_data_set_can_be_the_pool(digits_spec: DataSpec) -> None:
    if "digits_copy" not in DATASETS:
        DATASETS.add(
            "digits_copy",
            lambda split, spec: build_dataset(dataclasses.replace(spec, dataset="digits"), "val"),
        )
    recipe_pool = {"dataset": "digits_copy", "split": "test"}
    spec = parse_recipe(_recipe({"unlabeled": recipe_pool})).data
    pool_set = training_set(spec, True)
    assert len(pool_set) == len(build_dataset(spec, "train")) + len(build_dataset(digits_spec, "val"))
    assert pool_set.labels[-1] == UNLABELED and pool_set.labels[0] != UNLABELED
    assert len(training_set(spec, False)) == len(build_dataset(spec, "train"))


def _recipe(data: dict) -> dict:
    return {
        "name": "t",
        "data": {"dataset": "digits", "image_size": 16, "mean": [0.5], "std": [0.5], **data},
        "models": {"student": {"name": "vit_tiny_patch16_224"}},
        "pipeline": [{"name": "s", "do": "train", "model": "student"}],
    }


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({"labeled_fraction": 0.0}, "data.labeled_fraction: expected a value in (0, 1], got 0.0"),
        ({"unlabeled": "rest"}, "data.unlabeled: 'rest' is the training samples whose labels"),
        ({"unlabeled": "all"}, "data.unlabeled: expected"),
        ({"unlabeled": {"root": "x"}}, "data.unlabeled.dataset"),
        ({"labeled_fraction": 0.5, "unlabeled": "rest", "balanced": True}, "data.balanced: balanced batches"),
        ({"epoch_size": 0}, "data.epoch_size: expected a positive number"),
    ],
)
def test_bad_pool_settings_are_refused_by_key(data: dict, expected: str) -> None:
    with pytest.raises(RecipeError) as info:
        parse_recipe(_recipe(data))
    assert any(expected in problem for problem in info.value.problems), info.value.problems


def test_labeled_cross_entropy_ignores_unlabelled_samples_and_is_zero_without_labels() -> None:
    logits = torch.randn(4, 3, requires_grad=True)
    labels = torch.tensor([0, UNLABELED, 2, UNLABELED])
    expected = torch.nn.functional.cross_entropy(logits[[0, 2]], labels[[0, 2]])
    torch.testing.assert_close(labeled_cross_entropy(logits, labels), expected)
    none = labeled_cross_entropy(logits, torch.full((4,), UNLABELED))
    none.backward()
    assert none.item() == 0.0 and torch.count_nonzero(logits.grad) == 0


def test_an_unlabelled_sample_gets_the_teacher_terms_and_the_teachers_class(images: torch.Tensor) -> None:
    teacher, student = tiny_vit(48, 2, seed=1), tiny_vit(32, 2, seed=2)
    pairs = layer_pairs(teacher, student, [[2, 2]])
    distiller = Distiller(
        teacher, student, pairs, adapter="projection", logit_loss="dkd", example_input=images[:2]
    )
    labels = torch.tensor([1, UNLABELED, 3, UNLABELED])
    out = distiller(images, labels)
    with torch.no_grad():
        t_logits, s_logits = teacher(images), out["logits"]
    from kdkit.distill.losses import dkd

    filled = torch.where(labels == UNLABELED, t_logits.argmax(-1), labels)
    torch.testing.assert_close(out["kd"], dkd(s_logits, t_logits, filled, distiller.tau))
    torch.testing.assert_close(out["ce"], labeled_cross_entropy(s_logits, labels))
    # the feature term is computed on all four samples: the same as with every label given
    torch.testing.assert_close(out["feat"], distiller(images, filled)["feat"])
    assert SupervisedTask(student)(images, labels)["ce"].isfinite()


def test_epoch_size_cycles_the_data_into_equal_length_epochs() -> None:
    sampler = EpochSampler(10, seed=3, epoch_size=25)
    sampler.set_epoch(4)
    order = [index for index, _ in sampler]
    assert len(order) == len(sampler) == 25
    assert Counter(order[:20]) == {i: 2 for i in range(10)}  # whole permutations first
    assert len(set(order[20:])) == 5
    plain = EpochSampler(10, seed=3)
    plain.set_epoch(4)
    assert [i for i, _ in plain] == order[:10]  # the default epoch is the first permutation, as before


def test_the_student_alone_takes_as_many_steps_as_the_distilled_one(digits_spec: DataSpec) -> None:
    spec = dataclasses.replace(
        digits_spec,
        labeled_fraction=0.1,
        unlabeled="rest",
        epoch_size=len(build_dataset(digits_spec, "train")),
    )
    alone, _, _ = build_loaders(spec, 0, eval_splits=(), with_unlabeled=False)
    distilled, _, _ = build_loaders(spec, 0, eval_splits=(), with_unlabeled=True)
    assert len(alone) == len(distilled)
    labels = torch.cat([batch[1] for batch in alone])
    assert UNLABELED not in labels and len(set(labels.tolist())) == 10
