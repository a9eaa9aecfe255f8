"""kdkit.config (schema, loading, validation): typed checks, messages, --set overrides, YAML safety."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import DIGITS_RECIPE, REPO, tiny_recipe_dict
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kdkit.config.loading import apply_overrides, load_recipe, parse_override, read_yaml
from kdkit.config.schema import (
    DataSpec,
    DistillSpec,
    GroupSpec,
    LauncherSpec,
    ModelSpec,
    PairSpec,
    Recipe,
    RecipeError,
    StageSpec,
    TeacherInputSpec,
    TrainSpec,
    UnlabeledPool,
)
from kdkit.config.validation import parse_recipe


def problems_of(data: dict[str, Any]) -> list[str]:
    with pytest.raises(RecipeError) as info:
        parse_recipe(data)
    return info.value.problems


def with_changes(**changes: Any) -> dict[str, Any]:
    data = tiny_recipe_dict()
    data.update(changes)
    return data


def test_the_bundled_recipe_is_valid() -> None:
    recipe = load_recipe(DIGITS_RECIPE)
    assert recipe.name == "digits-kd"
    assert [s.do for s in recipe.pipeline] == ["train", "distill", "train", "evaluate"]
    assert recipe.train.lr == 2e-3 and recipe.distill.pairs == [[1, 2], [2, 4], [3, 6]]
    assert recipe.models["teacher"].options["embed_dim"] == 96


def test_unknown_top_level_key_suggests_the_closest() -> None:
    data = tiny_recipe_dict()
    data["distil"] = data.pop("distill")
    (problem,) = problems_of(data)
    assert problem.startswith("distil: unknown key.")
    assert "Did you mean 'distill'?" in problem


def test_unknown_nested_key_names_its_path() -> None:
    data = tiny_recipe_dict()
    data["train"]["lrr"] = 0.1
    (problem,) = problems_of(data)
    assert problem.startswith("train.lrr: unknown key.") and "Did you mean 'lr'?" in problem


def test_wrong_types_name_the_key_and_what_was_expected() -> None:
    data = tiny_recipe_dict()
    data["train"]["lr"] = "fast"
    data["data"]["image_size"] = 1.5
    data["models"]["student"]["pretrained"] = "yes"
    data["distill"]["teacher_dtype"] = "int8"
    problems = problems_of(data)
    assert "train.lr: expected a number, got 'fast'" in problems
    assert "data.image_size: expected an integer, got 1.5" in problems
    assert "models.student.pretrained: expected true/false, got 'yes'" in problems
    assert any(p.startswith("distill.teacher_dtype: expected one of 'float32'") for p in problems)


def test_bool_is_not_accepted_as_a_number() -> None:
    data = tiny_recipe_dict()
    data["train"]["epochs"] = True
    assert problems_of(data) == ["train.epochs: expected an integer, got True"]


def test_missing_required_values() -> None:
    data = tiny_recipe_dict()
    del data["name"]
    del data["models"]["student"]["name"]
    del data["pipeline"][0]["do"]
    problems = problems_of(data)
    assert "name: missing required value (a string)" in problems
    assert "models.student.name: missing required value (a string)" in problems
    assert any(p.startswith("pipeline[0].do: missing required value") for p in problems)


def test_all_problems_are_collected_at_once() -> None:
    data = tiny_recipe_dict()
    data["seed"] = "zero"
    data["data"]["batch_sise"] = 8
    data["train"]["epochs"] = "many"
    data["pipeline"][1]["do"] = "distil"
    problems = problems_of(data)
    assert len(problems) == 4, problems
    assert str(RecipeError(problems)).count("\n  - ") == 4


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"alpha": 1.5}, "alpha: expected a value in [0, 1], got 1.5"),
        ({"alpha": -0.1}, "alpha: expected a value in [0, 1]"),
        ({"tau": 0}, "tau: expected a positive temperature, got 0"),
        ({"tau": -1.0}, "tau: expected a positive temperature"),
        ({"beta": -1}, "beta: expected a value >= 0"),
        ({"student": "studnet"}, "student: expected one of ['student', 'teacher'], got 'studnet'"),
        ({"teacher": "nobody"}, "teacher: expected a model key"),
        ({"pairs": [[1, 2], [3]]}, "pairs[1]: expected [student_block, teacher_block]"),
    ],
)
def test_invalid_distill_settings(change: dict[str, Any], expected: str) -> None:
    data = tiny_recipe_dict()
    data["distill"].update(change)
    (problem,) = problems_of(data)
    assert problem.startswith("pipeline.student_kd.distill.")
    assert expected in problem


def test_stage_overrides_are_checked_too() -> None:
    data = tiny_recipe_dict()
    data["pipeline"][1]["distill"] = {"alpha": 2.0}
    data["pipeline"][0]["train"] = {"epochs": 0, "lrr": 1}
    problems = problems_of(data)
    assert any(p.startswith("pipeline.teacher.train.lrr: unknown key") for p in problems)
    data["pipeline"][0]["train"] = {"epochs": 0}
    problems = problems_of(data)
    assert "pipeline.teacher.train.epochs: expected at least 1, got 0" in problems
    assert "pipeline.student_kd.distill.alpha: expected a value in [0, 1], got 2.0" in problems


def test_evaluate_stage_must_name_earlier_train_or_distill_stages() -> None:
    data = tiny_recipe_dict()
    data["pipeline"] = [
        {"name": "test", "do": "evaluate", "runs": ["teacher", "studnet_kd"]},
        {"name": "teacher", "do": "train", "model": "teacher"},
        {"name": "student_kd", "do": "distill"},
        {"name": "again", "do": "evaluate", "runs": ["test"]},
        {"name": "empty", "do": "evaluate"},
    ]
    problems = problems_of(data)
    assert "pipeline.test.runs: 'teacher' is not an earlier train/distill stage." in problems
    assert any("'studnet_kd' is not an earlier" in p for p in problems)
    assert "pipeline.again.runs: 'test' is not an earlier train/distill stage." in problems
    assert any(p.startswith("pipeline.empty.runs: expected the names") for p in problems)


def test_distill_teacher_may_name_an_earlier_stage_but_not_an_evaluate_stage() -> None:
    data = tiny_recipe_dict()
    data["pipeline"] = [
        {"name": "big", "do": "train", "model": "teacher"},
        {"name": "check", "do": "evaluate", "runs": ["big"]},
        {"name": "kd", "do": "distill", "distill": {"teacher": "big"}},
        {"name": "kd2", "do": "distill", "distill": {"teacher": "check"}},
        {"name": "kd3", "do": "distill", "distill": {"teacher": "later"}},
        {"name": "later", "do": "train", "model": "teacher"},
    ]
    problems = problems_of(data)
    assert len(problems) == 2, problems
    assert problems[0].startswith("pipeline.kd2.distill.teacher: expected a model key")
    assert problems[1].startswith("pipeline.kd3.distill.teacher:")


def test_duplicate_stage_names_and_empty_pipeline() -> None:
    data = tiny_recipe_dict()
    data["pipeline"][2]["name"] = "teacher"
    assert "pipeline: stage name 'teacher' is used more than once" in problems_of(data)
    assert "pipeline: expected at least one stage" in problems_of(with_changes(pipeline=[]))


def test_data_checks() -> None:
    data = tiny_recipe_dict()
    data["data"]["std"] = [0.5, 0.0]
    assert problems_of(data) == ["data.std: expected as many positive values as data.mean"]


def test_stage_overrides_merge_over_top_level_settings() -> None:
    data = tiny_recipe_dict()
    data["pipeline"][1]["train"] = {"lr": 0.01}
    data["pipeline"][1]["distill"] = {"beta": 0.0, "adapter": "projection"}
    recipe = parse_recipe(data)
    kd_stage, teacher_stage = recipe.pipeline[1], recipe.pipeline[0]
    train = recipe.plan.of(kd_stage).train
    assert isinstance(train, TrainSpec)
    assert train.lr == 0.01 and train.epochs == 2 and train.max_steps_per_epoch == 3
    distill = recipe.plan.of(kd_stage).distill
    assert isinstance(distill, DistillSpec)
    assert (distill.beta, distill.adapter, distill.alpha) == (0.0, "projection", 0.7)
    assert recipe.plan.of(teacher_stage).train.lr == recipe.train.lr == 2e-3


def test_defaults_and_to_dict_round_trip() -> None:
    data = tiny_recipe_dict()
    del data["train"]
    recipe = parse_recipe(data)
    assert recipe.train == TrainSpec()
    assert (recipe.train.optimizer, recipe.train.scheduler, recipe.distill.alpha) == ("adamw", "cosine", 0.7)
    again = parse_recipe(yaml.safe_load(yaml.safe_dump(recipe.to_dict())))
    assert again == recipe


# ------------------------------------------------------------------------------------ --set
@pytest.mark.parametrize(
    ("text", "keys", "value"),
    [
        ("train.epochs=3", ["train", "epochs"], 3),
        ("train.lr=0.001", ["train", "lr"], 0.001),
        ("train.lr=1e-3", ["train", "lr"], 0.001),  # the CLI help's own example (YAML 1.1 reads a string)
        ("train.lr=2E+2", ["train", "lr"], 200.0),
        ("distill.stages=[[1, 2], [3, 4]]", ["distill", "stages"], [[1, 2], [3, 4]]),
        ("train.clip_grad=null", ["train", "clip_grad"], None),
        ("models.student.pretrained=true", ["models", "student", "pretrained"], True),
        ("name=my run", ["name"], "my run"),
        ("data.root=/data/a=b", ["data", "root"], "/data/a=b"),
        ("data.root=", ["data", "root"], ""),
        ("name=[unclosed", ["name"], "[unclosed"),  # not YAML: kept as text
        ("name=2001-13-45", ["name"], "2001-13-45"),  # looks like a date but is none
    ],
)
def test_parse_override(text: str, keys: list[str], value: Any) -> None:
    assert parse_override(text) == (keys, value)


@pytest.mark.parametrize("text", ["train.lr", "=3", "train..lr=3", ".lr=3", "train.=3"])
def test_parse_override_rejects_bad_syntax(text: str) -> None:
    with pytest.raises(RecipeError, match="expected KEY=VALUE"):
        parse_override(text)


def test_apply_overrides_by_index_and_by_stage_name() -> None:
    data = tiny_recipe_dict()
    out = apply_overrides(
        data,
        [
            "pipeline.0.train.epochs=5",
            "pipeline.student_kd.distill.alpha=0.5",
            "pipeline.-1.split=val",
            "train.lr=1e-2",
            "data.options.split_seed=3",
        ],
    )
    assert data == tiny_recipe_dict()  # the input is not modified
    assert out["pipeline"][0]["train"] == {"epochs": 5}
    assert out["pipeline"][1]["distill"] == {"alpha": 0.5}
    assert out["pipeline"][3]["split"] == "val"
    recipe = parse_recipe(out)
    assert recipe.train.lr == 0.01 and recipe.data.options == {"split_seed": 3}
    assert recipe.plan.of(recipe.pipeline[0]).train.epochs == 5
    assert recipe.plan.of(recipe.pipeline[1]).distill.alpha == 0.5


def test_apply_overrides_replaces_a_whole_list_item() -> None:
    out = apply_overrides(tiny_recipe_dict(), ["distill.pairs.1=[2, 1]"])
    assert out["distill"]["pairs"] == [[1, 1], [2, 1]]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("pipeline.9.train.epochs=2", "pipeline.9: index out of range (the list has 4 items)"),
        ("pipeline.-5.name=x", "index out of range"),
        ("pipeline.--1.name=x", "no list item named '--1'"),
        ("pipeline.².name=x", "no list item named '²'"),
        ("pipeline.teachr.train.epochs=2", "no list item named 'teachr'. Did you mean 'teacher'?"),
        ("train.lr.value=2", "train.lr is 0.002, not a mapping"),
    ],
)
def test_apply_overrides_errors(text: str, message: str) -> None:
    with pytest.raises(RecipeError) as info:
        apply_overrides(tiny_recipe_dict(), [text])
    assert message in str(info.value)


def test_overrides_of_unknown_keys_are_reported_by_validation(tiny_recipe: Path) -> None:
    with pytest.raises(RecipeError) as info:
        load_recipe(tiny_recipe, ["train.lrr=1"])
    assert info.value.problems[0].startswith("train.lrr: unknown key")
    assert str(tiny_recipe) in info.value.source
    with pytest.raises(RecipeError) as info:
        load_recipe(tiny_recipe, ["pipeline.teacher.train.epoch=2"])
    (problem,) = info.value.problems
    assert "pipeline.teacher.train.epoch: unknown key" in problem and "'epochs'" in problem


# ------------------------------------------------------------------------------------ YAML files
def test_malformed_yaml_reports_the_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("name: x\ndata:\n  dataset: digits\n  batch_size: [1, 2\nseed: 0\n")
    with pytest.raises(RecipeError) as info:
        read_yaml(path)
    (problem,) = info.value.problems
    assert problem.startswith("malformed YAML at line 5")
    assert info.value.source == str(path)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("- a\n- b\n", "expected a YAML mapping at the top level, got list"),
        ("", "expected a YAML mapping at the top level, got NoneType"),
        ("a: !!python/object/apply:os.system ['true']\n", "malformed YAML"),
        ("a: !!timestamp 2001-13-45\n", "malformed YAML"),
        ("a: !!int x\n", "malformed YAML"),
        ("[" * 3000, "malformed YAML"),
    ],
)
def test_read_yaml_errors(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "r.yaml"
    path.write_text(text)
    with pytest.raises(RecipeError, match=message):
        read_yaml(path)


def test_read_yaml_missing_file_and_numbers(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match="file not found"):
        read_yaml(tmp_path / "nope.yaml")
    path = tmp_path / "n.yaml"
    path.write_text("lr: 1e-3\nwd: 5.0e-2\nn: 10\nname: 1e3x\n")
    assert read_yaml(path) == {"lr": 0.001, "wd": 0.05, "n": 10, "name": "1e3x"}


def test_python_tags_never_run(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.yaml"
    path.write_text(f"name: !!python/object/apply:os.system ['touch {marker}']\n")
    with pytest.raises(RecipeError):
        load_recipe(path)
    evil = f"!!python/object/apply:os.system ['touch {marker}']"
    kept = load_recipe(DIGITS_RECIPE, [f"data.options.note={evil}"]).data.options["note"]
    assert kept == evil  # kept as plain text
    assert not marker.exists()


# ------------------------------------------------------------------------------------ property
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**6), 10**6),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
)
keys = st.one_of(
    st.sampled_from(
        ["name", "data", "models", "pipeline", "train", "distill", "seed", "lr", "epochs", "dataset", "do"]
    ),
    st.text(max_size=8),
)
documents = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(keys, inner, max_size=5),
    max_leaves=25,
)
override_text = st.one_of(
    st.text(max_size=30),
    st.builds(
        lambda path, value: f"{path}={value}",
        st.lists(
            st.one_of(keys, st.sampled_from(["0", "-1", "9", "teacher", "--1"])), min_size=1, max_size=4
        ).map(".".join),
        st.one_of(
            st.text(max_size=12), scalars.map(str), st.sampled_from(["[1, 2]", "{a: 1}", "2001-13-45"])
        ),
    ),
)


def corrupt(text: str, data: st.DataObject) -> str:
    """Delete, duplicate or insert characters somewhere in the text."""
    if not text:
        return text
    i = data.draw(st.integers(0, len(text) - 1))
    junk = data.draw(st.sampled_from(["", ":", "[", "{", "- ", "\t", "&a", "*a", "!!", '"', "\n  ", "%"]))
    return text[:i] + junk + text[i + data.draw(st.integers(0, 3)) :]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    doc=st.one_of(
        documents, st.builds(lambda d: {**tiny_recipe_dict(), **d}, st.dictionaries(keys, documents))
    ),
    overrides=st.lists(override_text, max_size=3),
    data=st.data(),
)
def test_only_recipe_errors_escape(
    tmp_path: Path, doc: Any, overrides: list[str], data: st.DataObject
) -> None:
    """Whatever the document and overrides, loading either succeeds or raises RecipeError."""
    text = yaml.safe_dump(doc, allow_unicode=True)
    if data.draw(st.booleans()):
        text = corrupt(text, data)
    path = tmp_path / "doc.yaml"
    path.write_text(text, encoding="utf-8")
    with contextlib.suppress(RecipeError):
        load_recipe(path, overrides)
    if isinstance(doc, dict):
        with contextlib.suppress(RecipeError):
            parse_recipe(apply_overrides(copy.deepcopy(doc), overrides))


@settings(max_examples=60, deadline=None)
@given(
    epochs=st.integers(1, 1000),
    lr=st.floats(1e-8, 10.0),
    alpha=st.floats(0.0, 1.0),
    stage_epochs=st.integers(1, 5),
)
def test_valid_shapes_always_parse(epochs: int, lr: float, alpha: float, stage_epochs: int) -> None:
    """Valid values given through --set always give a recipe with exactly those values."""
    out = apply_overrides(
        tiny_recipe_dict(),
        [
            f"train.epochs={epochs}",
            f"train.lr={lr!r}",
            f"distill.alpha={alpha!r}",
            f"pipeline.student_alone.train.epochs={stage_epochs}",
        ],
    )
    recipe = parse_recipe(out)
    assert (recipe.train.epochs, recipe.train.lr, recipe.distill.alpha) == (epochs, lr, alpha)
    assert recipe.plan.of(recipe.pipeline[2]).train.epochs == stage_epochs


def test_the_recipe_reference_documents_every_key() -> None:
    """docs/recipes.md has a table row for every field of every recipe dataclass, with its default."""
    doc = (REPO / "docs" / "recipes.md").read_text()
    classes = (Recipe, DataSpec, UnlabeledPool, ModelSpec, DistillSpec, PairSpec, GroupSpec, TeacherInputSpec)
    for cls in (*classes, TrainSpec, StageSpec, LauncherSpec):
        assert f"`{cls.__name__}`" in doc, cls.__name__
        for f in dataclasses.fields(cls):
            rows = [line.split(" | ") for line in doc.splitlines() if line.startswith(f"| `{f.name}` |")]
            assert rows, f"{cls.__name__}.{f.name} is not documented"
            if f.default is not dataclasses.MISSING:
                expected = f.default
            elif f.default_factory is not dataclasses.MISSING:
                expected = f.default_factory()
            else:
                expected = "required"
            if dataclasses.is_dataclass(expected):
                expected = "all defaults"
            documented = [parse_override("x=" + row[2].strip("`"))[1] for row in rows]
            assert expected in documented, f"{cls.__name__}.{f.name}: default {expected!r}, doc {documented}"


def test_list_items_by_name_in_mixed_lists() -> None:
    data = {"items": ["plain", {"other": 1}, {"name": 7}, {"name": "b"}]}
    assert apply_overrides(data, ["items.b.x=1"])["items"][3] == {"name": "b", "x": 1}
    with pytest.raises(RecipeError, match="no list item named 'c'"):
        apply_overrides(data, ["items.c.x=1"])


def test_a_saved_recipe_without_keys_added_since_is_the_same_recipe(tiny_recipe: Path) -> None:
    """`--resume` compares the saved recipe read as this version reads it: keys added since, at
    their defaults, are no change; a changed value still is."""
    from kdkit.config.loading import recipe_changes

    resolved = load_recipe(tiny_recipe).to_dict()
    saved = copy.deepcopy(resolved)
    del saved["distill"]["logit_loss"], saved["distill"]["logit_options"]  # as 0.2.0 wrote it
    assert recipe_changes(saved, resolved) == []
    saved["distill"]["tau"] = 9.0
    assert recipe_changes(saved, resolved) == ["distill.tau"]
