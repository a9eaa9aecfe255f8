"""kdkit.data's modules have one job each: datasets.py builds data sets and loaders, samplers.py
the training order, digits_set.py the built-in digits set; the 0.2 names stay in `kdkit.data`."""

from __future__ import annotations

import kdkit.data
from kdkit.data import datasets, digits_set, samplers
from kdkit.registry import DATASETS


def test_the_digits_set_and_the_samplers_have_modules_of_their_own() -> None:
    assert DATASETS.get("digits") is digits_set.digits is kdkit.data.digits  # the 0.2 name
    for name in ("EpochSampler", "BalancedSampler", "sample_strata"):
        assert getattr(kdkit.data, name) is getattr(samplers, name)
    assert not hasattr(datasets, "digits") and not hasattr(datasets, "stratified_split")


def test_sample_strata_keeps_its_0_2_name_sample_groups() -> None:
    assert kdkit.data.sample_groups is samplers.sample_strata
    assert "sample_groups" not in vars(samplers) and "sample_groups" not in vars(datasets)
