"""Small things a user reads: registry listings in the plural, rates below 1 img/s, and no CUDA
warning when compiling on a CPU-only machine."""

from __future__ import annotations

import logging

import pytest
import torch

from kdkit.models.compile import compile_in_place
from kdkit.registry import FEATURE_CRITERIA, LOGIT_LOSSES, Registry, RegistryError
from kdkit.training.display import rate_text


def test_registry_listings_use_the_right_plural() -> None:
    with pytest.raises(RegistryError, match="Registered logit losses: dist, dkd, kl, nkd") as info:
        LOGIT_LOSSES.get("kll")
    assert "losss" not in str(info.value)
    assert FEATURE_CRITERIA.plural == "feature criteria" and Registry("adapter").plural == "adapters"


@pytest.mark.parametrize(
    ("rate", "shown"), [(0.004, "0.004"), (0.42, "0.42"), (3.44, "3.4"), (12.6, "13"), (1234.5, "1234")]
)
def test_rates_below_10_keep_two_significant_digits(rate: float, shown: str) -> None:
    assert rate_text(rate) == shown


def _record(message: str) -> logging.LogRecord:
    return logging.LogRecord(
        "torch.utils.cpp_extension", logging.WARNING, __file__, 1, message, ("/x",), None
    )


def test_compiling_drops_torchs_no_cuda_runtime_warning_and_nothing_else() -> None:
    compile_in_place(torch.nn.Linear(2, 2))  # lazy: nothing is compiled until the first call
    logger = logging.getLogger("torch.utils.cpp_extension")
    assert not logger.filter(_record("No CUDA runtime is found, using CUDA_HOME='%s'"))
    assert logger.filter(_record("Error building extension under %s"))
