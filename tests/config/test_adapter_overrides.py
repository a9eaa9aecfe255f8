"""Adapter options stay with their adapter (issue 26): `--set distill.adapter=X` and `kdkit ablate
--vary distill.adapter=...` drop the old adapter's options with a note, unless the overrides give
options themselves; and every shipped recipe takes every registered adapter."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import REPO, tiny_recipe_dict

from kdkit.cli import main
from kdkit.config import loading
from kdkit.config.loading import apply_overrides, read_yaml
from kdkit.distill.adapters import build_adapter
from kdkit.plugins import load_plugins
from kdkit.registry import ADAPTERS
from kdkit.run.checks import check_stage_settings
from kdkit.run.variants import expand_grid, resolve

PAPER_OPTIONS = {"detach_covariance": False}  # the shipped KDFAS recipes' covariance options


@pytest.fixture(autouse=True)
def fresh_notes() -> Iterator[None]:
    """Each test sees its notes: they are printed once per process."""
    loading._note_once.cache_clear()
    yield
    loading._note_once.cache_clear()


def _kdfas_like() -> dict[str, Any]:
    """A distill section with the paper's covariance options and a stage with its own adapter."""
    return {
        "distill": {"adapter": "covariance", "adapter_options": dict(PAPER_OPTIONS)},
        "pipeline": [
            {"name": "kd", "do": "distill"},
            {"name": "kd_own", "do": "distill", "distill": {"adapter": "covariance"}},
        ],
    }


def test_changing_the_adapter_drops_the_old_options_with_a_note(capsys: pytest.CaptureFixture[str]) -> None:
    data = apply_overrides(_kdfas_like(), ["distill.adapter=projection"])
    assert data["distill"] == {"adapter": "projection", "adapter_options": {}}
    # the stage that names its own covariance adapter keeps the options it had inherited
    assert data["pipeline"][1]["distill"] == {"adapter": "covariance", "adapter_options": PAPER_OPTIONS}
    err = capsys.readouterr().err
    assert "distill.adapter is now 'projection' (was 'covariance')" in err
    assert "dropped distill.adapter_options {'detach_covariance': False}" in err


@pytest.mark.parametrize(
    "overrides, options, noted",
    [
        (
            ["distill.adapter=procrustes", "distill.adapter_options={scale: element}"],
            {"scale": "element"},
            False,
        ),
        (
            ["distill.adapter_options={scale: element}", "distill.adapter=procrustes"],
            {"scale": "element"},
            False,
        ),
        # one option given: the old adapter's others are dropped
        (["distill.adapter=projection", "distill.adapter_options.bias=false"], {"bias": False}, True),
        (["distill.adapter=covariance"], PAPER_OPTIONS, False),  # the same adapter keeps its options
        (["distill.alpha=0.5"], PAPER_OPTIONS, False),
    ],
)
def test_options_the_overrides_give_are_kept(
    overrides: list[str], options: dict[str, Any], noted: bool, capsys: pytest.CaptureFixture[str]
) -> None:
    assert apply_overrides(_kdfas_like(), overrides)["distill"]["adapter_options"] == options
    assert (
        "dropped distill.adapter_options {'detach_covariance': False}" in capsys.readouterr().err
    ) == noted


def test_a_stage_given_another_adapter_drops_the_inherited_options() -> None:
    data = apply_overrides(_kdfas_like(), ["pipeline.kd.distill.adapter=gram"])
    assert data["pipeline"][0]["distill"] == {"adapter": "gram", "adapter_options": {}}
    assert data["distill"]["adapter_options"] == PAPER_OPTIONS  # the other stages still use them


def test_the_note_is_printed_once_per_process(capsys: pytest.CaptureFixture[str]) -> None:
    """An ablation applies each variant's overrides once per seed."""
    for _ in range(3):
        apply_overrides(_kdfas_like(), ["distill.adapter=gram"])
    assert capsys.readouterr().err.count("note: distill.adapter is now 'gram'") == 1


SHIPPED = [p for p in sorted((REPO / "recipes").glob("*.yaml")) if "distill" in read_yaml(p)]


@pytest.mark.parametrize("path", SHIPPED, ids=[p.stem for p in SHIPPED])
def test_vary_every_adapter_on_every_shipped_recipe(path: Path) -> None:
    """`kdkit ablate RECIPE --vary distill.adapter=<any>` resolves and passes the checks of adapter
    and criterion options (hatfas, kdfas and kdfas-ocim carry covariance options)."""
    load_plugins()  # the FAS recipes name the fas plugin's evaluator and data sets
    data = read_yaml(path)
    for name in [*ADAPTERS.names(), "none"]:
        (variant,) = expand_grid([f"distill.adapter={name}"])
        recipe = resolve(data, variant, 0, str(path))
        assert recipe.distill.adapter == name
        if name != "none":  # was "adapter 'projection' got unknown options ['detach_covariance']"
            build_adapter(name, 8, 8, **recipe.distill.adapter_options)
        check_stage_settings(recipe)


def test_validate_with_another_adapter_notes_what_it_dropped(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tiny_recipe_dict()
    data["distill"]["adapter_options"] = dict(PAPER_OPTIONS)
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    assert main(["validate", str(path), "--set", "distill.adapter=projection"]) == 0
    captured = capsys.readouterr()
    assert "dropped distill.adapter_options {'detach_covariance': False}" in captured.err
    assert "valid" in captured.out


@pytest.mark.parametrize(
    "name, options, words",
    [
        ("gram", {"p": 0}, "p: expected a number > 0, got 0"),
        ("covariance", {"eps": -1.0}, "eps: expected a number > 0, got -1.0"),
        ("procrustes", {"detach": "no"}, "detach: expected true or false, got 'no'"),
        ("projection", {"bias": 1}, "bias: expected true or false, got 1"),
    ],
)
def test_adapter_option_values_are_checked_when_built(name: str, options: dict[str, Any], words: str) -> None:
    """These were taken as they were: a string or 0 failed (or silently misbehaved) at step 1."""
    with pytest.raises(ValueError, match=words):
        build_adapter(name, 8, 8, **options)
