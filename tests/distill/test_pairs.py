"""Layer pairs (`distill.pairs`, old name `stages`), per-pair options, and the teacher cache a
Distiller is given."""

from __future__ import annotations

import copy
import io
import re
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from conftest import DIGITS_RECIPE, REPO, tiny_recipe_dict, tiny_vit
from rich.console import Console

from kdkit.config.loading import apply_overrides, diff_keys
from kdkit.config.plan import StagePlan
from kdkit.config.schema import RecipeError
from kdkit.config.validation import parse_recipe
from kdkit.data.datasets import SeededAugmentation, build_loaders
from kdkit.distill.adapters import build_adapter
from kdkit.distill.distiller import Distiller
from kdkit.distill.pairs import LayerPair, layer_pairs
from kdkit.distill.taps import Tap
from kdkit.distill.teacher_cache import teacher_cache_key, weights_digest
from kdkit.run.build import build_distiller
from kdkit.run.checks import check_recipe
from kdkit.run.resume import plan_resume

LABELS = torch.tensor([0, 3, 7, 9])


def recipe_with(**distill: Any) -> dict[str, Any]:
    data = tiny_recipe_dict()
    data["distill"].update(distill)
    return data


def problems_of(data: dict[str, Any]) -> list[str]:
    with pytest.raises(RecipeError) as info:
        parse_recipe(data)
    return info.value.problems


# ------------------------------------------------------------------------------ pairs vs stages
def test_stages_is_read_as_pairs_and_to_dict_writes_pairs() -> None:
    data = tiny_recipe_dict()
    data["distill"]["stages"] = data["distill"].pop("pairs")
    data["pipeline"][1]["distill"] = {"stages": [[2, 2]], "beta": 0.5}
    recipe = parse_recipe(data)
    assert recipe.distill.pairs == [[1, 1], [2, 2]]
    assert recipe.plan.of(recipe.pipeline[1]).distill.pairs == [[2, 2]]
    saved = recipe.to_dict()
    assert "stages" not in saved["distill"] and saved["distill"]["pairs"] == [[1, 1], [2, 2]]
    assert list(saved["pipeline"][1]["distill"]) == ["pairs", "beta"]  # renamed in place
    assert "stages" in data["distill"]  # the input is not modified


def test_both_names_in_one_section_are_an_error_naming_both() -> None:
    data = recipe_with(stages=[[1, 1]])
    assert problems_of(data) == [
        "distill: both 'pairs' and 'stages' (its old name) are given; keep only distill.pairs"
    ]
    data = tiny_recipe_dict()
    data["pipeline"][1]["distill"] = {"stages": [[1, 1]], "pairs": [[2, 2]]}
    (problem,) = problems_of(data)
    assert problem.startswith("pipeline.student_kd.distill: both 'pairs' and 'stages'")


def test_overrides_of_the_old_name_set_pairs() -> None:
    overrides = ["distill.stages=[[2, 2]]", "pipeline.student_kd.distill.stages=[[1, 2]]"]
    out = apply_overrides(tiny_recipe_dict(), overrides)
    assert out["distill"]["pairs"] == [[2, 2]] and "stages" not in out["distill"]
    assert out["pipeline"][1]["distill"] == {"pairs": [[1, 2]]}
    old = tiny_recipe_dict()
    old["distill"]["stages"] = old["distill"].pop("pairs")
    out = apply_overrides(old, ["distill.pairs.1=[2, 1]"])  # a file with the old name, the new key
    assert out["distill"]["pairs"] == [[1, 1], [2, 1]] and "stages" not in out["distill"]


def test_a_run_saved_with_stages_resumes(tmp_path: Path) -> None:
    recipe = parse_recipe(tiny_recipe_dict())
    saved = copy.deepcopy(recipe.to_dict())
    saved["distill"]["stages"] = saved["distill"].pop("pairs")  # recipe.yaml of an older kdkit
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(saved, sort_keys=False))
    assert diff_keys(yaml.safe_load(path.read_text()), recipe.to_dict()) == []
    assert plan_resume(tmp_path, recipe).changed_keys == []  # nothing to run again
    saved["distill"]["stages"] = [[2, 2]]
    path.write_text(yaml.safe_dump(saved, sort_keys=False))
    plan = plan_resume(tmp_path, recipe)
    assert plan.changed_keys == ["distill.pairs"]
    assert plan.rerun == {
        "student_kd": "its inputs changed at distill.pairs",
        "test": "it reads student_kd, which runs again",
    }


# ------------------------------------------------------------------------------ per-pair options
def distiller(pairs: list[Any], **kwargs: Any) -> Distiller:
    teacher = tiny_vit(embed_dim=64, depth=3, seed=1)
    student = tiny_vit(embed_dim=32, depth=2, seed=2)
    built = layer_pairs(teacher, student, pairs)
    return Distiller(teacher, student, built, example_input=torch.randn(2, 1, 16, 16), **kwargs)


def test_default_weights_give_exactly_the_mean_of_the_pairs(images: torch.Tensor) -> None:
    for pairs in (
        [[1, 1], [2, 3]],
        [{"student": 1, "teacher": 1}, {"student": 2, "teacher": 3, "weight": 1.0}],
    ):
        out = distiller(pairs)(images, LABELS)
        assert torch.equal(out["feat"], torch.stack([out["feat.0"], out["feat.1"]]).mean())  # bit for bit


def test_weights_and_per_pair_adapter_and_criterion(images: torch.Tensor) -> None:
    pairs = [
        [1, 1],
        {
            "student": "blocks.1",
            "teacher": 3,
            "select": "cls",
            "adapter": "projection",
            "criterion": "cosine",
            "weight": 3.0,
        },
    ]
    d = distiller(pairs, adapter="covariance", adapter_options={"detach_covariance": False}, beta=0.5)
    assert [(p.adapter, p.criterion, p.weight) for p in d.pairs] == [
        ("covariance", "mse", 1.0),
        ("projection", "cosine", 3.0),
    ]
    # a pair with its own adapter does not get the section's (covariance) options
    assert [p.adapter_options for p in d.pairs] == [{"detach_covariance": False}, {}]
    assert type(d.adapters[1]).__name__ == "ProjectionAdapter" and not d.adapters[0].detach_covariance
    assert (d.pairs[1].student, d.pairs[1].teacher) == (Tap("blocks.1"), Tap("blocks.2"))
    out = d(images, LABELS)
    torch.testing.assert_close(out["feat"], (out["feat.0"] + 3.0 * out["feat.1"]) / 2)
    torch.testing.assert_close(out["loss"], 0.3 * out["ce"] + 0.7 * out["kd"] + 0.5 * out["feat"])


def test_a_module_path_selects_all_and_a_block_number_the_presets_selector() -> None:
    teacher, student = tiny_vit(embed_dim=64, depth=3), tiny_vit()
    (pair,) = layer_pairs(teacher, student, [{"student": "blocks.1.mlp", "teacher": 3, "io": "input"}])
    assert pair.student == Tap("blocks.1.mlp", "input", "all")
    assert pair.teacher == Tap("blocks.2", "input", "cls")
    (pair,) = layer_pairs(teacher, student, [{"student": 1, "teacher": "blocks.0"}], select="mean")
    assert (pair.student.select, pair.teacher.select) == ("mean", "mean")


def test_uniform_pairs_use_the_section_settings() -> None:
    d = distiller("uniform:2", adapter="gram", criterion="smooth_l1")
    assert [(p.student.path, p.teacher.path, p.adapter, p.criterion, p.weight) for p in d.pairs] == [
        ("blocks.0", "blocks.1", "gram", "smooth_l1", 1.0),
        ("blocks.1", "blocks.2", "gram", "smooth_l1", 1.0),
    ]


def test_a_bad_pair_is_named_by_its_index() -> None:
    with pytest.raises(ValueError, match=r"pairs\[1\]: teacher: block 9 is beyond the depth 3"):
        distiller([[1, 1], {"student": 1, "teacher": 9}])
    with pytest.raises(
        ValueError, match=r"pairs\[0\]: student blocks.0 \(2, 32\) ↔ teacher blocks.0 \(2, 64\): identity"
    ):
        distiller([{"student": 1, "teacher": 1, "adapter": "identity"}])
    with pytest.raises(ValueError, match=r"pairs\[0\]\.weight: expected a value >= 0"):
        distiller([{"student": 1, "teacher": 1, "weight": -1}])


@pytest.mark.parametrize(
    ("entry", "expected"),
    [
        (
            {"student": 1, "teacher": 2, "adaptr": "gram"},
            "pairs[1].adaptr: unknown key. Did you mean 'adapter'?",
        ),
        ({"student": 1}, "pairs[1].teacher: missing required value"),
        ({"student": 1, "teacher": 2, "weight": -0.5}, "pairs[1].weight: expected a value >= 0, got -0.5"),
        ({"student": 1, "teacher": 2, "weight": "high"}, "pairs[1].weight: expected a number, got 'high'"),
        ({"student": 1.5, "teacher": 2}, "pairs[1].student: expected an integer or a string, got 1.5"),
        (
            {"student": 1, "teacher": 2, "adapter": "none"},
            "pairs[1].adapter: 'none' is not an adapter of one pair",
        ),
        (
            {"student": 1, "teacher": 2, "adapter_options": [1]},
            "pairs[1].adapter_options: expected a mapping",
        ),
        ([True, 2], "pairs[1]: expected [student_block, teacher_block] or a mapping"),
    ],
)
def test_pair_entries_are_validated_with_their_key_path(entry: Any, expected: str) -> None:
    (problem,) = problems_of(recipe_with(pairs=[[1, 1], entry]))
    assert problem.startswith("pipeline.student_kd.distill.") and expected in problem, problem


def test_checks_name_each_pairs_adapter_and_criterion() -> None:
    data = recipe_with(
        pairs=[[1, 1], {"student": 2, "teacher": 2, "adapter": "covariant", "criterion": "l1"}]
    )
    with pytest.raises(RecipeError) as info:
        check_recipe(parse_recipe(data))
    problems = info.value.problems
    assert any(
        p.startswith("pipeline.student_kd.distill.pairs[1].adapter: unknown adapter") for p in problems
    ), problems
    assert any(
        p.startswith("pipeline.student_kd.distill.pairs[1].criterion:") and "smooth_l1" in p for p in problems
    )
    assert not any(p.startswith("distill.criterion") for p in problems)


def test_checks_enforce_each_pairs_smallest_batch() -> None:
    data = recipe_with(adapter="projection", pairs=[[1, 1], {"student": 2, "teacher": 2, "adapter": "gram"}])
    data["data"]["batch_size"] = 1
    with pytest.raises(RecipeError) as info:
        check_recipe(parse_recipe(data))
    (problem,) = info.value.problems
    assert (
        problem.startswith("pipeline.student_kd.distill.pairs[1].adapter: 'gram'") and "at least 2" in problem
    )


def test_the_tap_table_shows_each_pairs_own_settings() -> None:
    pairs = [
        [1, 1],
        {"student": 2, "teacher": 2, "adapter": "projection", "criterion": "cosine", "weight": 0.25},
    ]
    (table,) = check_recipe(parse_recipe(recipe_with(pairs=pairs))).tables
    console = Console(file=io.StringIO(), width=250)
    console.print(table)
    text = console.file.getvalue()
    rows = [
        [cell.strip() for cell in line.split("│")[1:-1]] for line in text.splitlines() if "blocks." in line
    ]
    assert [row[-3:] for row in rows] == [["covariance", "mse", "1"], ["projection", "cosine", "0.25"]]
    assert f"adapter params: {32 * 48 + 48}" in text


# ------------------------------------------------------------------------------ the cache passed in
def test_build_distiller_passes_the_cache_keyed_by_what_it_is_built_from(tmp_path: Path) -> None:
    data = tiny_recipe_dict()
    data["distill"].update(cache_dir=str(tmp_path), teacher_dtype="bfloat16")
    data["data"]["aug_cycle"] = 1
    recipe = parse_recipe(data)
    stage = recipe.pipeline[1]
    loader, _, _ = build_loaders(recipe.plan.of(stage).data, seed=0, eval_splits=())
    assert isinstance(loader.dataset, SeededAugmentation)
    task = build_distiller(recipe, stage, cache_data=loader.dataset)
    assert task.cache is not None and task.cache.root == tmp_path
    expected = teacher_cache_key(
        task.teacher,
        {f"feat.{i}": p.teacher for i, p in enumerate(task.pairs)},
        "bfloat16",
        "none",
        loader.dataset,
    )
    assert task.cache.key == expected
    task.close()


def test_the_key_hashes_the_teacher_as_its_dtype_will_make_it() -> None:
    teacher = tiny_vit(embed_dim=48, seed=1)
    loader, _, _ = build_loaders(parse_recipe(tiny_recipe_dict()).data, seed=0, eval_splits=())
    key = teacher_cache_key(teacher, {"feat.0": Tap("blocks.0")}, "bfloat16", "bf16", loader.dataset)
    converted = weights_digest(copy.deepcopy(teacher).to(torch.bfloat16))
    assert key["teacher_sha256"] == converted != weights_digest(teacher)
    assert (key["teacher_dtype"], key["amp"], key["num_prefix_tokens"]) == ("torch.bfloat16", "none", 1)
    assert key["taps"] == [{"name": "feat.0", "path": "blocks.0", "io": "output", "select": "cls"}]


def test_extra_parameters_is_a_method_on_adapters_and_the_distiller() -> None:
    assert build_adapter("projection", 8, 12).extra_parameters() == 8 * 12 + 12
    d = distiller([[1, 1], [2, 3]], adapter="projection")
    assert d.extra_parameters() == sum(a.extra_parameters() for a in d.adapters) == 2 * (32 * 64 + 64)


@pytest.mark.parametrize("page", ["recipes.md", "adapters.md"])
def test_the_docs_pair_examples_are_valid(page: str) -> None:
    blocks = re.findall(r"```yaml\n(.*?)```", (REPO / "docs" / page).read_text(), flags=re.S)
    (example,) = [yaml.safe_load(b) for b in blocks if "\n  pairs:\n" in b]  # the per-pair example
    data = yaml.safe_load(DIGITS_RECIPE.read_text())  # 3 student, 6 teacher blocks
    data["distill"].update(example["distill"])
    recipe = parse_recipe(data)
    if page == "adapters.md":  # its blocks exist in the digits models: build it
        task = build_distiller(recipe, recipe.pipeline[1], example=torch.zeros(2, 1, 16, 16))
        assert [p.adapter for p in task.pairs] == ["procrustes", "procrustes", "projection"]
        assert task.adapters[2].proj.bias is None


def test_layer_pair_defaults_leave_the_options_to_the_distiller() -> None:
    pair = LayerPair(Tap("blocks.0"), Tap("blocks.1"))
    assert (pair.adapter, pair.adapter_options, pair.criterion, pair.weight) == (None, None, None, 1.0)


def _kd_stage(**distill: Any) -> StagePlan:
    return parse_recipe(recipe_with(**distill)).plan.stage("student_kd")


def test_adapter_names_lists_every_adapter_a_stage_builds() -> None:
    pairs = [[1, 1], {"student": 2, "teacher": 2, "adapter": "gram"}, {"student": 2, "teacher": 1}]
    assert _kd_stage(pairs=pairs).adapter_names() == ["covariance", "gram"]
    assert _kd_stage(pairs=pairs, adapter="none").adapter_names() == ["none"]
    assert _kd_stage(pairs="uniform:2", adapter="gram").adapter_names() == ["gram"]


# ------------------------------------------------------------------------------ layer groups
def _grouped(**extra: Any) -> dict[str, Any]:
    # tiny_recipe_dict's models: 2 blocks each, 16 px with patch 4 -> a 4 x 4 grid of patch tokens
    return recipe_with(groups=[{"method": "vitkd", "student": [1, 2], "teacher": [1, 2], **extra}])


def test_a_group_gets_its_layers_and_joins_the_feature_term(images: torch.Tensor) -> None:
    recipe = parse_recipe(_grouped(weight=2.0, options={"alpha": 1e-3, "beta": 1e-3}))
    task = build_distiller(recipe, recipe.pipeline[1], example=images[:2])
    (group,) = task.groups
    assert [t.path for t in group.student] == ["blocks.0", "blocks.1"] and group.student[0].select == "patch"
    assert task.group_shapes == [([(2, 16, 32)] * 2, [(2, 16, 48)] * 2)]
    torch.manual_seed(0)
    out = task(images, LABELS)
    # the feature term is the weighted mean over the two pairs and the group
    expected = (out["feat.0"] + out["feat.1"] + 2.0 * out["group.0"]) / 3
    torch.testing.assert_close(out["feat"], expected)
    out["loss"].backward()
    method = task.group_methods[0]
    assert all(p.grad is not None for p in method.parameters() if p.requires_grad)
    pairs_only = sum(a.extra_parameters() for a in task.adapters)
    assert task.extra_parameters() == pairs_only + method.extra_parameters() > pairs_only
    # its weights are the student's to save, and load back
    state = task.trainable_state_dict()
    assert any(k.startswith("group_methods.0.") for k in state)
    other = build_distiller(recipe, recipe.pipeline[1], example=images[:2])
    other.load_trainable_state_dict(state)
    torch.testing.assert_close(other.group_methods[0].mask_token, method.mask_token)
    task.close()


def test_the_teacher_cache_serves_a_groups_features(tmp_path: Path) -> None:
    data = _grouped()
    data["distill"].update(cache_dir=str(tmp_path), adapter="none")
    data["data"]["aug_cycle"] = 1
    recipe = parse_recipe(data)
    loader, _, _ = build_loaders(recipe.plan.of(recipe.pipeline[1]).data, seed=0, eval_splits=())
    task = build_distiller(recipe, recipe.pipeline[1], cache_data=loader.dataset)
    assert task.cache.key["taps"] == [
        {"name": f"group.0.{k}", "path": f"blocks.{k}", "io": "output", "select": "patch"} for k in range(2)
    ]
    images, labels, keys = next(iter(loader))
    live = task.teacher_outputs(images, keys)
    cached = task.teacher_outputs(images, keys)  # the second call is served from the cache
    assert sorted(live) == ["group.0.0", "group.0.1", "logits"]
    for name in live:
        torch.testing.assert_close(cached[name], live[name])
    task.close()


@pytest.mark.parametrize(
    ("group", "expected"),
    [
        (
            {"method": "vitk", "student": [1, 2], "teacher": [1, 2]},
            "groups[0]: unknown layer group method 'vitk'. Did you mean 'vitkd'?",
        ),
        (
            {"method": "vitkd", "student": [1, 2], "teacher": [1]},
            "groups[0]: expected as many student as teacher layers",
        ),
        (
            {"method": "vitkd", "student": [1, 2], "teacher": [1, 2], "weight": -1},
            "groups[0].weight: expected a value >= 0",
        ),
        ({"method": "vitkd", "student": [1, 5], "teacher": [1, 2]}, "groups[0]: student: block 5 is beyond"),
        (
            {"method": "vitkd", "student": [1, 2], "teacher": [1, 2], "options": {"mask_ratio": 2}},
            "groups[0]: method 'vitkd': mask_ratio: expected a number in (0, 1)",
        ),
        (
            {"method": "vitkd", "student": [1, 2], "teacher": [1, 2], "select": "cls"},
            "groups[0]: method 'vitkd': layer 0: expected token features",
        ),
    ],
)
def test_a_bad_group_is_named_by_its_key(group: dict[str, Any], expected: str) -> None:
    with pytest.raises(RecipeError) as info:
        check_recipe(parse_recipe(recipe_with(groups=[group])))
    assert any(expected in problem for problem in info.value.problems), info.value.problems


def test_the_tap_table_lists_a_groups_layers() -> None:
    (table,) = check_recipe(parse_recipe(_grouped())).tables
    console = Console(file=io.StringIO(), width=250)
    console.print(table)
    text = console.file.getvalue()
    assert "group 0.0" in text and "group 0.1" in text and "vitkd" in text
    assert "[patch]" in text and "(2, 16, 48)" in text


# ------------------------------------------------------------------------------ criterion options
def test_criterion_options_reach_each_pair_that_uses_the_criterion(images: torch.Tensor) -> None:
    pairs = [[1, 1], {"student": 2, "teacher": 2, "criterion": "cosine"}]
    data = recipe_with(
        pairs=pairs, adapter="projection", criterion="smooth_l1", criterion_options={"beta": 0.0}
    )
    recipe = parse_recipe(data)
    task = build_distiller(recipe, recipe.pipeline[1], example=images[:2])
    assert [p.criterion_options for p in task.pairs] == [{"beta": 0.0}, {}]  # cosine takes none of them
    out = task(images, LABELS)
    l1 = torch.nn.functional.l1_loss  # beta 0: smooth L1 is L1
    feats = task.teacher_outputs(images)
    task.student(images)
    s_feat = task.student_taps.pop()["feat.0"]
    torch.testing.assert_close(out["feat.0"], l1(*task.adapters[0](s_feat, feats["feat.0"])))
    task.close()


@pytest.mark.parametrize(
    ("distill", "expected"),
    [
        (
            {"criterion": "smooth_l1", "criterion_options": {"bta": 1}},
            "distill.criterion_options.bta: unknown option",
        ),
        (
            {"criterion": "smooth_l1", "criterion_options": {"beta": -1}},
            "distill.criterion_options.beta: expected",
        ),
        (
            {"pairs": [{"student": 1, "teacher": 1, "criterion": "cosine", "criterion_options": {"eps": 0}}]},
            "pairs[0]: criterion_options.eps:",
        ),
    ],
)
def test_bad_criterion_options_are_named_by_key(distill: dict[str, Any], expected: str) -> None:
    with pytest.raises(RecipeError) as info:
        check_recipe(parse_recipe(recipe_with(**distill)))
    assert any(expected in problem for problem in info.value.problems), info.value.problems


def test_raw_features_need_a_criterion_that_compares_different_shapes(images: torch.Tensor) -> None:
    with pytest.raises(RecipeError) as info:
        check_recipe(parse_recipe(recipe_with(adapter="raw", criterion="mse")))
    assert any(
        "pairs[0]: adapter 'raw' returned shapes (2, 32) and (2, 48), and criterion 'mse' compares "
        "equal shapes" in p
        for p in info.value.problems
    ), info.value.problems
    recipe = parse_recipe(
        recipe_with(adapter="raw", criterion="rkd", criterion_options={"angle_weight": 0.0})
    )
    task = build_distiller(recipe, recipe.pipeline[1], example=images[:2])
    out = task(images, LABELS)
    from kdkit.distill.relations import rkd

    assert out["feat.0"].item() > 0 and task.extra_parameters() == 0
    assert rkd.min_batch == 3
    task.close()


def test_a_criterion_that_compares_samples_sets_the_smallest_batch() -> None:
    from kdkit.run.build import distill_min_batch

    assert distill_min_batch(_kd_stage(adapter="raw", criterion="rkd")) == 3
    assert distill_min_batch(_kd_stage(adapter="none", criterion="rkd")) == 1
    data = recipe_with(adapter="raw", criterion="rkd")
    data["data"]["batch_size"] = 2
    with pytest.raises(
        RecipeError, match="distill.criterion: 'rkd' compares the samples of a batch and needs at least 3"
    ):
        check_recipe(parse_recipe(data))


def test_a_group_and_pairs_on_the_same_layers_keep_their_own_cache_entries(tmp_path: Path) -> None:
    data = _grouped()
    data["distill"].update(cache_dir=str(tmp_path), adapter="none")
    grouped = parse_recipe(data)
    paired = parse_recipe(recipe_with(cache_dir=str(tmp_path), pairs=[[1, 1], [2, 2]], select="patch"))
    loader, _, _ = build_loaders(grouped.data, seed=0, eval_splits=())
    keys = []
    for recipe in (grouped, paired):
        task = build_distiller(recipe, recipe.pipeline[1], cache_data=loader.dataset)
        keys.append(task.cache.folder)
        task.close()
    assert keys[0] != keys[1]  # the same teacher layers, stored under different feature names
