"""Shared tiny fixtures: ViTs small enough to train in seconds on 2 CPU cores, and a tiny recipe."""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import timm
import torch
import yaml
from torch import nn

import kdkit.data.digits_set  # noqa: F401  (registers the digits data set)
import kdkit.distill.adapters  # noqa: F401  (registers the built-in adapters)
import kdkit.evaluation.classification  # noqa: F401  (registers the classification evaluator)
from kdkit.cli import main
from kdkit.config.schema import DataSpec, TrainSpec
from kdkit.data.datasets import build_loaders
from kdkit.distill.distiller import Distiller
from kdkit.distill.pairs import layer_pairs
from kdkit.evaluation.classification import ClassificationEvaluator
from kdkit.run.ablation_report import BASELINE_LABEL
from kdkit.training.task import SupervisedTask
from kdkit.training.trainer import Trainer
from kdkit.utils.runlog import MetricsLog, console, output

# Tiny models gain nothing from intra-op threads, and on a busy 2-core machine OpenMP's thread
# hand-offs make every small matmul ~500x slower.
torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Test files holding a test marked `slow` first, each file's tests kept together. pytest-xdist
    hands whole files to its workers in this order (`--dist loadfile`, pyproject.toml): the long
    ones start first and the short ones fill in, so no worker is left running a long one alone."""
    slow_files = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.path not in slow_files)


@pytest.fixture(autouse=True)
def wide_console(monkeypatch: pytest.MonkeyPatch) -> None:
    """Wide enough that rich never wraps a file name or table cell the tests look for."""
    monkeypatch.setattr(console, "_width", 250)
    # pytest-xdist's workers export COLUMNS=80, which rich read when `output` was made: without it
    # `output` (and any kdkit subprocess) lays out a pipe as in a user's shell.
    monkeypatch.setattr(output, "_width", None)
    monkeypatch.delenv("COLUMNS", raising=False)
    monkeypatch.delenv("LINES", raising=False)


# torch.distributed's rendezvous variables: a test that leaves them set makes every later in-process
# run of its worker start a process group and wait for ranks that never come.
DISTRIBUTED_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture(autouse=True)
def no_distributed_variables_left_behind() -> Iterator[None]:
    """Fail the test that leaves torch.distributed's variables otherwise than it found them."""
    before = {name: os.environ.get(name) for name in DISTRIBUTED_VARIABLES}
    yield
    after = {name: os.environ.get(name) for name in DISTRIBUTED_VARIABLES}
    assert after == before, f"the test changed torch.distributed's variables: {before} -> {after}"


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


# ------------------------------------------------------------ one tiny finished run (cli tests)
# Options as a user passes them: they must end up in the run's resolved recipe.yaml.
TINY_RUN_OVERRIDES = ["--set", "pipeline.student_alone.train.epochs=1", "--set", "train.lr=1e-3"]


def folder_contents(root: Path) -> dict[str, bytes]:
    """Every file under `root` (relative path -> bytes)."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A folder holding tiny.yaml and `run/`, one complete `kdkit run tiny.yaml --out run` with
    TINY_RUN_OVERRIDES: trained once for every test that reads it. A test that changes the run
    (resumes it, evaluates into it) works on a copy; the session fails if one did not."""
    root = tmp_path_factory.mktemp("tiny-run")
    (root / "tiny.yaml").write_text(yaml.safe_dump(tiny_recipe_dict(), sort_keys=False))
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        patch.setattr(console, "_width", 250)
        assert main(["run", "tiny.yaml", "--out", "run", *TINY_RUN_OVERRIDES]) == 0
    made = folder_contents(root)
    yield root
    changed = sorted({name for name, _ in set(made.items()) ^ set(folder_contents(root).items())})
    assert not changed, f"a test changed the shared tiny run (it should copy it first): {changed}"


# ------------------------------------------------------------ a tiny trainer (training, utils tests)
TINY_DATA = DataSpec(dataset="digits", image_size=16, batch_size=32, mean=[0.5], std=[0.5])


def tiny_train_spec(**changes: Any) -> TrainSpec:
    """Two epochs of three steps on the CPU, with `changes`."""
    base = {"epochs": 2, "max_steps_per_epoch": 3, "log_every": 2, "warmup_epochs": 1, "device": "cpu"}
    return TrainSpec(**{**base, **changes})


def tiny_supervised_task() -> SupervisedTask:
    """A tiny ViT trained alone."""
    return SupervisedTask(tiny_vit(seed=0, drop_rate=0.2))  # dropout: resume must restore the RNG


def tiny_distill_task() -> Distiller:
    """A tiny ViT distilled from a wider one through two projected layer pairs."""
    teacher = tiny_vit(embed_dim=48, seed=1)
    student = tiny_vit(embed_dim=32, seed=2, drop_rate=0.2)
    pairs = layer_pairs(teacher, student, [[1, 1], [2, 2]])
    return Distiller(teacher, student, pairs, adapter="projection", example_input=torch.zeros(2, 1, 16, 16))


def tiny_trainer(out: Path, task: torch.nn.Module, train: TrainSpec, evaluator: Any = None) -> Trainer:
    """A Trainer of `task` on 16 px digits, writing into `out`."""
    train_loader, evals, set_epoch = build_loaders(TINY_DATA, seed=0)
    return Trainer(
        task,
        train,
        train_loader,
        evals,
        evaluator or ClassificationEvaluator(),
        out,
        MetricsLog(out),
        "stage",
        seed=0,
        model_meta={"spec": {"name": "tiny"}},
        set_epoch=set_epoch,
    )


# ------------------------------------------------------------ ablations (run, cli and docs tests)
def small_ablation_recipe_dict() -> dict[str, Any]:
    """The tiny digits recipe cut to teacher → student_kd → test, one epoch of two steps."""
    data = tiny_recipe_dict()
    data["train"].update(epochs=1, max_steps_per_epoch=2)
    data["pipeline"] = [
        {"name": "teacher", "do": "train", "model": "teacher"},
        {"name": "student_kd", "do": "distill"},
        {"name": "test", "do": "evaluate", "runs": ["teacher", "student_kd"], "split": "test"},
    ]
    return data


ABLATION_METRIC = "test/accuracy"
# The names of docs/methods.md's 13-method ablation; more variants repeat them with a suffix.
ABLATION_METHODS = (
    "kl kl-standardized dkd dist nkd kl-labels-only covariance projection mlp orthogonal rkd at vitkd"
)


def fake_ablation_variant(name: str, mean: float, baseline: bool = False) -> dict[str, Any]:
    """One variant of an `ablation.json` report, its numbers made up around `mean`."""
    difference = (
        {} if baseline else {ABLATION_METRIC: {"mean": mean - 0.6, "low": mean - 0.65, "high": mean - 0.55}}
    )
    if difference:
        difference[ABLATION_METRIC]["excludes_zero"] = True
    return {
        "variant": name,
        "baseline": baseline,
        "mean": {ABLATION_METRIC: mean},
        "interval": {ABLATION_METRIC: [mean - 0.05, mean + 0.05]},
        "difference": difference,
        "per_seed": [mean - 0.02, mean, mean + 0.02],
    }


def fake_ablation_variants(n: int) -> list[dict[str, Any]]:
    """Two baselines and `n` variants named after docs/methods.md's methods."""
    names = [f"{m}-{k}" if k else m for k, m in itertools.product(range(3), ABLATION_METHODS.split())][:n]
    baselines = [
        fake_ablation_variant(f"{BASELINE_LABEL} for {', '.join(names[:-1])}", 0.63, baseline=True),
        fake_ablation_variant(f"{BASELINE_LABEL} for {names[-1]}", 0.62, baseline=True),
    ]
    return baselines + [fake_ablation_variant(name, 0.8 + 0.01 * i) for i, name in enumerate(names)]
