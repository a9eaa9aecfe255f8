"""Shared tiny fixtures: ViTs small enough to train in seconds on 2 CPU cores, and a tiny recipe."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import timm
import torch
import yaml
from torch import nn

import kdkit.adapters  # noqa: F401  (registers the built-in adapters)
import kdkit.data  # noqa: F401  (registers the digits data set)
import kdkit.evaluators  # noqa: F401  (registers the classification evaluator)
from kdkit.recipe import DataSpec
from kdkit.runlog import console, output

# Tiny models gain nothing from intra-op threads, and on a busy 2-core machine OpenMP's thread
# hand-offs make every small matmul ~500x slower.
torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def wide_console(monkeypatch: pytest.MonkeyPatch) -> None:
    """Wide enough that rich never wraps a file name or table cell the tests look for."""
    monkeypatch.setattr(console, "_width", 250)
    # pytest-xdist's workers export COLUMNS=80, which rich read when `output` was made: without it
    # `output` (and any kdkit subprocess) lays out a pipe as in a user's shell.
    monkeypatch.setattr(output, "_width", None)
    monkeypatch.delenv("COLUMNS", raising=False)
    monkeypatch.delenv("LINES", raising=False)


@pytest.fixture(autouse=True, scope="session")
def teacher_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Teacher-output caches written by the tests (and their subprocesses) go to a temporary
    folder, never the user's ~/.cache."""
    path = tmp_path_factory.mktemp("teacher-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("KDKIT_CACHE_DIR", str(path))
        yield path


DIGITS_RECIPE = REPO / "recipes" / "digits-kd.yaml"


def vit_options(embed_dim: int = 32, depth: int = 2, **extra: Any) -> dict[str, Any]:
    """timm `vit_tiny_patch16_224` options for a 16 px, 1-channel, 10-class ViT."""
    return {
        "img_size": 16,
        "patch_size": 4,
        "in_chans": 1,
        "embed_dim": embed_dim,
        "depth": depth,
        "num_heads": 2,
        "num_classes": 10,
        **extra,
    }


def tiny_vit(embed_dim: int = 32, depth: int = 2, seed: int = 0, **extra: Any) -> nn.Module:
    """A freshly initialised tiny ViT (deterministic for a given seed)."""
    torch.manual_seed(seed)
    return timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, **vit_options(embed_dim, depth, **extra)
    )


@pytest.fixture
def digits_spec() -> DataSpec:
    """The digits data set at 16 px with small batches."""
    return DataSpec(dataset="digits", image_size=16, batch_size=32, mean=[0.5], std=[0.5])


@pytest.fixture
def images() -> torch.Tensor:
    """Four random 1×16×16 images."""
    return torch.randn(4, 1, 16, 16, generator=torch.Generator().manual_seed(0))


def tiny_recipe_dict() -> dict[str, Any]:
    """recipes/digits-kd.yaml shrunk to seconds: tiny models, 2 epochs of 3 steps each."""
    data = yaml.safe_load(DIGITS_RECIPE.read_text())
    data["models"]["teacher"]["options"] = vit_options(embed_dim=48, depth=2)
    data["models"]["student"]["options"] = vit_options(embed_dim=32, depth=2)
    data["distill"]["pairs"] = [[1, 1], [2, 2]]
    data["train"].update(epochs=2, max_steps_per_epoch=3, warmup_epochs=0, log_every=2, device="cpu")
    data["data"]["batch_size"] = 32
    return data


@pytest.fixture
def tiny_recipe(tmp_path: Path) -> Path:
    """A tiny copy of digits-kd.yaml written into tmp_path."""
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(tiny_recipe_dict(), sort_keys=False))
    return path
