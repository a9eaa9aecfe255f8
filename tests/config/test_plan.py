"""The plan: every stage resolved once, and what was checked is what runs."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import tiny_recipe_dict, vit_options

from kdkit.cli import main
from kdkit.config.schema import RecipeError, TrainSpec
from kdkit.config.validation import parse_recipe
from kdkit.run.pipeline import RecipeRun
from kdkit.run.stage_cache import stage_inputs


def _recipe_dict() -> dict[str, Any]:
    """The tiny recipe; the teacher stage pins seed 7 and its lr, the distill stage its batch size."""
    data = tiny_recipe_dict()
    data["pipeline"][0]["train"] = {"seed": 7, "lr": 0.002}
    data["pipeline"][1]["data"] = {"batch_size": 16}
    return data


def test_each_stage_is_resolved_once_with_its_seed_models_and_pairs() -> None:
    recipe = parse_recipe(_recipe_dict())
    teacher, kd, alone, test = recipe.plan
    assert (teacher.seed, teacher.train.seed, teacher.train.lr) == (7, 7, 0.002)
    assert (kd.seed, kd.train.seed, kd.data.batch_size) == (recipe.seed, recipe.seed, 16)
    assert [s.model for s in recipe.plan] == ["teacher", "student", "student", None]
    (only,) = kd.teachers
    assert (only.model, only.stage, teacher.teachers) == ("teacher", "teacher", ())
    assert [(p.student, p.teacher) for p in only.pairs] == [(1, 1), (2, 2)]
    assert teacher.distill is None and test.distill is None and test.teachers == ()
    assert recipe.plan.of(recipe.pipeline[1]) is kd and kd.distill_spec() is kd.distill
    assert kd.adapter_names() == ["covariance"] and kd.criterion_names() == ["mse"]
    assert kd.origin("data", "batch_size") == "pipeline.student_kd.data.batch_size"
    assert kd.origin("train", "lr") == "train.lr" and alone.key == "pipeline.student_alone"


def test_the_checked_train_spec_with_its_seed_is_the_one_the_trainer_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    recipe = parse_recipe(_recipe_dict())
    given: dict[str, Any] = {}

    class Stop(Exception):
        pass

    def trainer(task: Any, train: TrainSpec, *args: Any, **kwargs: Any) -> None:
        given.update(train=train, seed=args[6])
        raise Stop

    monkeypatch.setattr("kdkit.run.pipeline.Trainer", trainer)
    with pytest.raises(Stop):
        RecipeRun(recipe, tmp_path)._fit_stage(recipe.pipeline[0], tmp_path / "teacher", None, False)  # type: ignore[arg-type]
    assert given["train"] is recipe.plan.stage("teacher").train and given["seed"] == 7


def test_a_bad_stage_seed_is_named_by_its_key_path() -> None:
    data = _recipe_dict()
    data["pipeline"][0]["train"]["seed"] = -1
    with pytest.raises(RecipeError) as info:
        parse_recipe(data)
    assert info.value.problems == [
        "pipeline.teacher.train.seed: expected a non-negative integer (or null), got -1"
    ]


def test_a_negative_recipe_seed_is_refused_before_any_work() -> None:
    """The recipe's own `seed` (every stage's default) is checked too: torch would refuse it only
    when the first stage starts."""
    data = _recipe_dict()
    data["seed"] = -3
    with pytest.raises(RecipeError) as info:
        parse_recipe(data)
    assert info.value.problems == ["seed: expected a non-negative integer, got -3"]


@pytest.mark.parametrize(
    ("where", "change", "expected"),
    [
        (1, {"distill": {"alpha": 2}}, "pipeline.student_kd.distill.alpha: expected a value in [0, 1]"),
        (1, {"distill": {"stages": [[1, 1]], "pairs": [[1, 1]]}}, "pipeline.student_kd.distill: both"),
        (0, {"data": {"batch_size": 0}}, "pipeline.teacher.data: image_size and batch_size"),
        (3, {"runs": ["nope"]}, "pipeline.test.runs: 'nope' is not an earlier"),
    ],
)
def test_stage_messages_name_keys_as_pipeline_stage_key(where: int, change: dict, expected: str) -> None:
    data = tiny_recipe_dict()
    data["pipeline"][where].update(change)
    with pytest.raises(RecipeError) as info:
        parse_recipe(data)
    assert info.value.problems[0].startswith(expected), info.value.problems


def test_stage_inputs_and_so_cache_keys_are_those_of_0_2_0() -> None:
    """Computed before the plan existed: a cached stage or teacher output stays valid."""
    recipe = parse_recipe(_recipe_dict())
    digests = {
        s.name: hashlib.sha256(
            json.dumps(stage_inputs(recipe, s), sort_keys=True, default=str).encode()
        ).hexdigest()[:16]
        for s in recipe.pipeline
    }
    assert digests == {
        "teacher": "597b1be38d30c9e2",
        "student_kd": "c7e28cdb528e3059",
        "student_alone": "e9e75b6b31579c38",
        "test": "dcbc67d897afd502",
    }


def test_bench_measures_the_distill_stage_at_its_own_data_shape(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tiny_recipe_dict()
    for name, width in (("teacher", 48), ("student", 32)):  # any image side divisible by the patch
        data["models"][name]["options"] = vit_options(embed_dim=width, dynamic_img_size=True)
    data["pipeline"][1]["data"] = {"image_size": 24, "batch_size": 4}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    argv = ["bench", str(path), "--steps", "1", "--repeats", "1", "--warmup", "1"]
    assert main([*argv, "--modes", "student", "--no-data", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["batch"] == 4 and report["input"] == [1, 24, 24]
