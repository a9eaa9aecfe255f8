"""Tests of `kdkit ablate`: the grid, fair data order, the stage cache, resume and the report files."""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import statistics
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from conftest import small_ablation_recipe_dict
from torch.utils.data import Dataset

from kdkit.cli import main
from kdkit.config.loading import apply_overrides, read_yaml
from kdkit.config.schema import Recipe, RecipeError
from kdkit.config.validation import parse_recipe
from kdkit.data.digits_set import digits
from kdkit.evaluation.comparison import direction, load_replicates
from kdkit.evaluation.stats import Replicates, paired_difference
from kdkit.registry import DATASETS
from kdkit.run.ablation import RunJob
from kdkit.run.ablation_report import Group, Measured, csv_text, format_cell, markdown_tables, summarise
from kdkit.run.pipeline import RecipeRun
from kdkit.run.stage_cache import StageCache, train_stage_key
from kdkit.run.variants import baseline_stage, combine, expand_grid, read_variants, resolve, split_values
from kdkit.utils.checkpoint import load_file
from kdkit.utils.runlog import console

GRID = ["--vary", "distill.adapter=covariance,projection", "--seeds", "0,1"]
RUNS = [f"adapter-{a}__seed{s}" for s in (0, 1) for a in ("covariance", "projection")]


# ------------------------------------------------------------------------------------ the grid
@pytest.mark.parametrize(
    ("text", "values"),
    [
        ("covariance,projection, none", ["covariance", "projection", "none"]),
        ("[[1,2]],[[1,2],[2,4]]", ["[[1,2]]", "[[1,2],[2,4]]"]),
        ("{a: 1, b: [2, 3]},x", ["{a: 1, b: [2, 3]}", "x"]),
        ("'a,b',\"c,[d\"", ["'a,b'", '"c,[d"']),
    ],
)
def test_split_values_splits_only_at_top_level_commas(text: str, values: list[str]) -> None:
    assert split_values(text) == values


@pytest.mark.parametrize("text", ["[1,2", "a]", "a,,b", "a,", "'a,b"])
def test_split_values_refuses_unbalanced_or_empty(text: str) -> None:
    with pytest.raises(ValueError):
        split_values(text)


def test_expand_grid_is_the_cartesian_product_in_order() -> None:
    grid = expand_grid(["distill.adapter=covariance,projection,none", "distill.alpha=0.7,0.0"])
    assert [v.label for v in grid] == [
        f"adapter={a}, alpha={x}" for a in ("covariance", "projection", "none") for x in ("0.7", "0.0")
    ]
    assert grid[1].overrides == ["distill.adapter=covariance", "distill.alpha=0.0"]
    assert len({v.slug for v in grid}) == 6
    assert all(re.fullmatch(r"[A-Za-z0-9.+_-]+", v.slug) for v in grid)


def test_expand_grid_keeps_names_and_slugs_unambiguous() -> None:
    grid = expand_grid(["models.teacher.options.depth=1,2", "models.student.options.depth=1"])
    assert grid[0].label == "models.teacher.options.depth=1, models.student.options.depth=1"
    stages = expand_grid(["distill.stages=[[1,2]],[1,2],[[1,2],[2,4]]"])
    assert len({v.slug for v in stages}) == 3  # [[1,2]] and [1,2] sanitise alike: a hash tells them apart


def test_named_variants_set_their_keys_and_combine_with_every_vary(tmp_path: Path) -> None:
    path = tmp_path / "methods.yaml"
    path.write_text(
        "kl: {}\n"
        "dkd: {distill.logit_loss: dkd, distill.logit_options: {beta: 2.0}}\n"
        "pairs: {distill.adapter: projection, distill.pairs: [[1, 1], [2, 2]]}\n"
    )
    named = read_variants(path)
    assert [v.label for v in named] == ["kl", "dkd", "pairs"] and [v.slug for v in named] == [
        "kl",
        "dkd",
        "pairs",
    ]
    recipe = resolve(small_ablation_recipe_dict(), named[1], 0, "tiny.yaml")
    assert (recipe.distill.logit_loss, recipe.distill.logit_options) == ("dkd", {"beta": 2.0})
    assert resolve(small_ablation_recipe_dict(), named[2], 0, "tiny.yaml").distill.pairs == [[1, 1], [2, 2]]
    assert (
        resolve(small_ablation_recipe_dict(), named[0], 0, "tiny.yaml").distill
        == parse_recipe(small_ablation_recipe_dict()).distill
    )
    grid = combine(named, expand_grid(["distill.alpha=0.5,0.9"]))
    assert [v.label for v in grid][:2] == ["kl, alpha=0.5", "kl, alpha=0.9"] and len(grid) == 6
    assert grid[3].overrides == [
        'distill.logit_loss="dkd"',
        'distill.logit_options={"beta": 2.0}',
        "distill.alpha=0.9",
    ]


def test_variant_names_follow_the_stage_name_rule_underscores_included(tmp_path: Path) -> None:
    """Issue 26, item 15: `_` was refused in variant names although stage names allow it."""
    path = tmp_path / "v.yaml"
    path.write_text("kd_covariance: {distill.adapter: covariance}\nlogit_only+ce=1: {}\n")
    named = read_variants(path)
    assert [v.slug for v in named] == ["kd_covariance", "logit_only+ce=1"]
    job = RunJob(named[0], 0, resolve(small_ablation_recipe_dict(), named[0], 0, "tiny.yaml"), tmp_path)
    assert job.final == tmp_path / "runs" / "kd_covariance__seed0"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("a b: {}\n", "'a b': the variant name cannot be a folder name: use letters, digits and _ . + = -"),
        (".hidden: {}\n", "'.hidden': the variant name cannot be a folder name"),
        ("a/b: {}\n", "'a/b': the variant name cannot be a folder name"),
        ("1: {}\n", "1: the variant name is not text"),
        ("kl: [1]\n", "kl: expected a mapping of recipe keys"),
        ("kl: {'distill..x': 1}\n", "kl.distill..x:"),
        ("{}\n", "expected at least one variant"),
    ],
)
def test_bad_variant_files_are_refused_naming_the_entry(tmp_path: Path, text: str, expected: str) -> None:
    path = tmp_path / "v.yaml"
    path.write_text(text)
    with pytest.raises(RecipeError) as info:
        read_variants(path)
    assert any(expected in problem for problem in info.value.problems), info.value.problems


def test_variant_recipe_parses_values_as_yaml_and_sets_the_seed() -> None:
    variant = expand_grid(["distill.pairs=[[1,1]],[[1,1],[2,2]]"])[1]
    recipe = resolve(small_ablation_recipe_dict(), variant, 3, "tiny.yaml")
    assert recipe.seed == 3 and recipe.distill.pairs == [[1, 1], [2, 2]]


def test_teacher_seed_pins_the_teacher_only_so_seeds_share_it() -> None:
    base = small_ablation_recipe_dict()
    base["pipeline"].insert(1, {"name": "alone", "do": "train", "model": "student", "train": {"seed": 7}})
    variant = expand_grid(["distill.adapter=covariance"])[0]

    def seeds(recipe: Recipe) -> dict[str, int]:
        return {s.name: recipe.plan.of(s).seed for s in recipe.pipeline}

    def teacher_key(recipe: Recipe) -> str:
        return train_stage_key(recipe, recipe.pipeline[0])

    shared = [resolve(base, variant, s, "tiny.yaml", teacher_seed=0) for s in (1, 2)]
    # The teacher keeps the recipe's seed, a stage that pins its own keeps it, the student and its
    # baseline (added: 'alone' has another seed, so it is not one) follow.
    assert [seeds(r) for r in shared] == [
        {"teacher": 0, "alone": 7, "student_alone": s, "student_kd": s, "test": s} for s in (1, 2)
    ]
    assert teacher_key(shared[0]) == teacher_key(shared[1])
    per_seed = [resolve(base, variant, s, "tiny.yaml", baseline=False) for s in (1, 2)]
    assert [seeds(r)["teacher"] for r in per_seed] == [1, 2]
    assert teacher_key(per_seed[0]) != teacher_key(per_seed[1])
    # When the teacher itself is the compared stage, it is never pinned.
    compared = resolve(base, variant, 1, "tiny.yaml", stage="teacher", teacher_seed=0)
    assert seeds(compared)["teacher"] == 1


def test_the_baseline_is_added_unless_the_recipe_has_one() -> None:
    variant = expand_grid(["distill.adapter=covariance"])[0]
    added = resolve(small_ablation_recipe_dict(), variant, 3, "tiny.yaml")
    stages = {s.name: s for s in added.pipeline}
    assert [s.name for s in added.pipeline] == ["teacher", "student_alone", "student_kd", "test"]
    assert (stages["student_alone"].do, stages["student_alone"].model) == ("train", "student")
    assert added.plan.of(stages["student_alone"]).seed == added.plan.of(stages["student_kd"]).seed == 3
    assert (stages["test"].runs, stages["test"].baseline) == (
        ["teacher", "student_alone", "student_kd"],
        "student_alone",
    )
    assert baseline_stage(added, "student_kd") == "student_alone"
    # A stage of the same student with the same schedule is the baseline; another schedule is not.
    base = small_ablation_recipe_dict()
    base["pipeline"].insert(1, {"name": "alone", "do": "train", "model": "student"})
    assert [s.name for s in resolve(base, variant, 0, "t").pipeline] == [
        "teacher",
        "alone",
        "student_kd",
        "test",
    ]
    base["pipeline"][1]["train"] = {"lr": 0.01}
    assert baseline_stage(resolve(base, variant, 0, "t"), "student_kd") == "student_alone"
    without = resolve(small_ablation_recipe_dict(), variant, 0, "t", baseline=False)
    assert baseline_stage(without, "student_kd") is None and without.pipeline[-1].baseline is None


def test_a_run_keeps_only_the_compared_distill_stage_and_refuses_a_shadowed_key() -> None:
    """The demo distils two students; an ablation of one must not train the other in every run, and
    a variant of `distill.adapter` compared on a stage that pins its own adapter would change nothing."""
    base = small_ablation_recipe_dict()
    base["pipeline"].insert(1, {"name": "other", "do": "distill", "distill": {"adapter": "gram"}})
    base["pipeline"][-1]["runs"] = ["teacher", "other", "student_kd"]
    variant = expand_grid(["distill.adapter=projection"])[0]
    recipe = resolve(base, variant, 0, "tiny.yaml")
    assert [s.name for s in recipe.pipeline] == ["teacher", "student_alone", "student_kd", "test"]
    assert recipe.pipeline[-1].runs == ["teacher", "student_alone", "student_kd"]
    assert recipe.plan.of(recipe.pipeline[2]).distill.adapter == "projection"
    alpha = expand_grid(["distill.alpha=0.5"])[0]
    kept = resolve(base, alpha, 0, "tiny.yaml", stage="other", baseline=False)
    assert [s.name for s in kept.pipeline] == ["teacher", "other", "test"]
    with pytest.raises(
        RecipeError,
        match=r"distill.adapter: the compared stage 'other' sets "
        r"pipeline.other.distill.adapter='gram' itself",
    ):
        resolve(base, variant, 0, "tiny.yaml", stage="other")
    # a distill stage that teaches a later one stays
    base["pipeline"].insert(2, {"name": "third", "do": "distill", "distill": {"teacher": "other"}})
    assert "other" in [s.name for s in resolve(base, variant, 0, "tiny.yaml", stage="third").pipeline]
    # the stage's own `teacher` replaces the `teachers` a variant sets: shadowed too
    teachers = expand_grid(["distill.teachers=[{teacher: teacher}]"])[0]
    with pytest.raises(RecipeError, match=r"distill.teachers: the compared stage 'third' sets "):
        resolve(base, teachers, 0, "tiny.yaml", stage="third")


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--vary", "distill.adaptr=a,b"], "distill.adaptr: unknown key. Did you mean 'adapter'?"),
        (["--vary", "distill.adapter"], "--vary 'distill.adapter': expected KEY=V1,V2"),
        (["--vary", "distill.stages=[[1,1]],[[1,1]"], "--vary distill.stages: unbalanced brackets"),
        (
            ["--vary", "distill.alpha=0.7,2"],
            "with alpha=2, seed 0:\n  - pipeline.student_kd.distill.alpha",
        ),
        (
            ["--vary", "distill.adapter=foo"],
            "with adapter=foo:\n  - pipeline.student_kd.distill.adapter: unknown adapter",
        ),
        (
            ["--vary", "distill.alpha=0.1", "--vary", "distill.alpha=0.2"],
            "--vary distill.alpha: given more than once",
        ),
        (["--vary", "seed=1,2"], "use --seeds"),
        ([], "give the variants to compare: --vary KEY=V1,V2,... or --variants FILE"),
        (
            ["--vary", "distill.alpha=0.1", "--seeds", "0,x"],
            "--seeds '0,x': expected comma-separated integers",
        ),
        (
            ["--vary", "distill.alpha=0.1", "--stage", "nope"],
            "--stage 'nope': expected a train or distill stage",
        ),
        (["--vary", "distill.alpha=0.1", "--jobs", "0"], "--jobs 0: expected at least 1"),
    ],
)
def test_bad_arguments_exit_2_naming_the_key(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    args: list[str],
    expected: str,
) -> None:
    monkeypatch.chdir(tmp_path)
    Path("tiny.yaml").write_text(yaml.safe_dump(small_ablation_recipe_dict(), sort_keys=False))
    assert main(["ablate", "tiny.yaml", *args, "--out", "abl"]) == 2
    err = capsys.readouterr().err
    assert expected in err and "Traceback" not in err
    assert not Path("abl").exists()  # nothing ran


# ------------------------------------------------------------------------------------ fairness
class _Jittered(Dataset):
    """Digits with a random shift drawn from torch's global generator, as image augmentations do."""

    def __init__(self, base: Dataset) -> None:
        self.base = base

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image, label = self.base[index]
        return image + torch.rand(()), label


if "jittered_digits" not in DATASETS:
    DATASETS.add("jittered_digits", lambda split, spec: _Jittered(digits(split, spec)))


def test_same_seed_sees_the_same_batches_and_augmentations_in_every_variant(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A projection adapter draws random numbers when it is built; neither the data nor dropout
    (the global RNG when training starts) may notice."""
    import kdkit.run.pipeline

    seen: dict[str, list[tuple[torch.Tensor, ...]]] = {}

    class RecordingTrainer(kdkit.run.pipeline.Trainer):  # type: ignore[name-defined]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            if self.stage == "student_kd":
                batches = seen.setdefault(str(self.out_dir.parent.name), [])
                self.task.register_forward_pre_hook(
                    lambda _m, a: batches.append((a[0].clone(), a[1].clone(), torch.get_rng_state()))
                )

    monkeypatch.setattr(kdkit.run.pipeline, "Trainer", RecordingTrainer)
    stages = "pipeline=[{name: teacher, do: train, model: teacher}, {name: student_kd, do: distill}]"
    base = apply_overrides(small_ablation_recipe_dict(), ["data.dataset=jittered_digits", stages])
    for variant in expand_grid(["distill.adapter=covariance,projection"]):
        for seed in (0, 1):
            recipe = resolve(base, variant, seed, "tiny.yaml")
            RecipeRun(
                recipe, tmp_path / f"{variant.slug}-{seed}", stage_cache=StageCache(tmp_path / "cache")
            ).run()
    cov, proj = seen["adapter-covariance-0"], seen["adapter-projection-0"]
    assert len(cov) == len(proj) == 2
    for step_cov, step_proj in zip(cov, proj, strict=True):  # labels, images, RNG state
        assert all(torch.equal(a, b) for a, b in zip(step_cov, step_proj, strict=True))
    assert not torch.equal(seen["adapter-covariance-1"][0][1], cov[0][1])  # another seed, another order


# ------------------------------------------------------------------------------------ the stage cache
def test_train_stage_key_depends_on_the_teacher_side_only() -> None:
    base = small_ablation_recipe_dict()

    def key(*overrides: str) -> str:
        recipe = parse_recipe(apply_overrides(base, list(overrides)))
        return train_stage_key(recipe, recipe.pipeline[0])

    same = key()
    student_side = ["distill.adapter=projection", "distill.alpha=0.0", "models.student.options.depth=1"]
    assert all(key(o) == same for o in student_side)
    teacher_side = [
        "models.teacher.options.depth=1",
        "train.lr=0.001",
        "pipeline.teacher.train.epochs=2",
        "data.batch_size=16",
        "seed=1",
    ]
    assert len({same, *(key(o) for o in teacher_side)}) == 1 + len(teacher_side)


def test_stage_cache_reuses_a_teacher_and_retrains_a_changed_one(tmp_path: Path) -> None:
    cache = tmp_path / "cache"

    def run(name: str, *overrides: str) -> dict[str, Any]:
        recipe = parse_recipe(apply_overrides(small_ablation_recipe_dict(), list(overrides)))
        return RecipeRun(recipe, tmp_path / name, stage_cache=StageCache(cache)).run()

    first = run("covariance")["teacher"]["cache"]
    second = run("projection", "distill.adapter=projection")["teacher"]["cache"]
    third = run("deeper", "models.teacher.options.depth=3")["teacher"]["cache"]
    assert (first["reused"], second["reused"], third["reused"]) == (False, True, False)
    assert second == {"key": first["key"], "reused": True, "trained_by": "covariance"}
    assert third["key"] != first["key"]
    entry = cache / first["key"] / "model.pt"
    assert os.path.samefile(tmp_path / "projection" / "teacher" / "model.pt", entry)
    # Students reference the cached teacher, which outlives (renamed) run directories.
    student = load_file(tmp_path / "projection" / "student_kd" / "model.pt")
    assert student["teacher"]["path"] == str(entry.resolve())
    assert sorted(p.name for p in cache.iterdir() if p.is_dir()) == sorted([first["key"], third["key"]])


# ------------------------------------------------------------------------------------ end to end
@pytest.fixture(scope="module")
def ablation(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """One `kdkit ablate` of 2 adapters × 2 seeds with 2 worker processes, shared by the read-only tests."""
    root = tmp_path_factory.mktemp("ablate")
    (root / "tiny.yaml").write_text(yaml.safe_dump(small_ablation_recipe_dict(), sort_keys=False))
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        mp.setattr(console, "_width", 250)
        assert main(["ablate", "tiny.yaml", *GRID, "--out", "abl", "--jobs", "2"]) == 0
    yield root / "abl"


def _summary(run: Path) -> dict[str, Any]:
    return json.loads((run / "summary.json").read_text())


def test_every_run_is_complete_and_one_teacher_serves_every_variant_and_seed(ablation: Path) -> None:
    assert sorted(p.name for p in (ablation / "runs").iterdir()) == sorted(RUNS)
    assert not any((ablation / "partial").iterdir())
    for run in RUNS:
        assert {"teacher", "student_kd", "test"} <= _summary(ablation / "runs" / run).keys()
        assert (ablation / "runs" / run / "run.json").exists()
    report = json.loads((ablation / "ablation.json").read_text())
    # One teacher for every run; one baseline (student alone) per seed, shared by the variants.
    assert report["stage_cache"] == {
        "teacher": {"trained": 1, "reused": 3},
        "student_alone": {"trained": 2, "reused": 2},
    }
    # The train stages were trained before the runs, once per seed (the teacher with the recipe's
    # seed, once); every run reused them.
    assert sorted(p.name for p in (ablation / "prepare").iterdir()) == sorted(RUNS[::2])
    caches = [_summary(ablation / "runs" / run)["teacher"]["cache"] for run in RUNS]
    assert all(c["key"] == caches[0]["key"] and c["reused"] for c in caches)
    entry = ablation / "cache" / caches[0]["key"] / "model.pt"
    assert all(os.path.samefile(ablation / "runs" / r / "teacher" / "model.pt", entry) for r in RUNS)
    baselines = [_summary(ablation / "runs" / run)["student_alone"]["cache"]["key"] for run in RUNS]
    assert baselines[0] == baselines[1] != baselines[2] == baselines[3]  # per seed, shared by variants
    assert len([p for p in (ablation / "cache").iterdir() if p.is_dir()]) == 3
    # The students still ran with their own seeds.
    seeds = {run: read_yaml(ablation / "runs" / run / "recipe.yaml")["seed"] for run in RUNS}
    assert seeds == {run: int(run[-1]) for run in RUNS}


def test_csv_and_json_hold_every_run_and_mean_std_per_variant(ablation: Path) -> None:
    rows = list(csv.DictReader((ablation / "ablation.csv").open()))
    baseline = [f"{RUNS[0]}/student_alone", f"{RUNS[2]}/student_alone"]
    assert [r["run"] for r in rows[:6]] == baseline + RUNS[::2] + RUNS[1::2]
    for row in rows[:6]:
        run, _, stage = row["run"].partition("/")
        tested = _summary(ablation / "runs" / run)["test"]["results"][stage or "student_kd"]
        assert float(row["test/accuracy"]) == pytest.approx(tested["test/accuracy"])
        assert float(row["train_s_per_epoch"]) > 0
        assert (int(row["adapter_params"]) > 0) == ("projection" in row["run"])
        assert (row["peak_MiB"] == "") == bool(stage)  # the run's memory belongs to the compared stage
    stats = [(r["variant"], r["seed"]) for r in rows[6:]]
    assert stats[:4] == [
        ("baseline: student alone (no teacher)", s) for s in ("mean", "std", "ci_low", "ci_high")
    ]
    per_variant = [
        "mean",
        "std",
        "ci_low",
        "ci_high",
        "diff_mean",
        "diff_low",
        "diff_high",
        "diff_excludes_zero",
    ]
    assert stats[4:] == [(f"adapter={a}", s) for a in ("covariance", "projection") for s in per_variant]
    accuracy = [float(r["test/accuracy"]) for r in rows[:6] if r["distill.adapter"] == "projection"]
    projection = {r["seed"]: r for r in rows[6:] if r["variant"] == "adapter=projection"}
    assert float(projection["mean"]["test/accuracy"]) == pytest.approx(statistics.fmean(accuracy))
    assert float(projection["std"]["test/accuracy"]) == pytest.approx(statistics.stdev(accuracy))
    assert projection["diff_excludes_zero"]["test/accuracy"] in ("True", "False")

    report = json.loads((ablation / "ablation.json").read_text())
    assert (report["main_metric"], report["direction"], report["stage"], report["baseline"]) == (
        "test/accuracy",
        "max",
        "student_kd",
        "student_alone",
    )
    assert report["columns"] == ["test/accuracy", "adapter_params", "train_s_per_epoch", "peak_MiB"]
    assert [v["n"] for v in report["variants"]] == [2, 2, 2] and len(report["runs"]) == 6
    assert [v["baseline"] for v in report["variants"]] == [True, False, False]
    assert "VmHWM" in report["memory_measure"]


def test_the_paired_difference_is_each_runs_student_minus_its_own_baseline(ablation: Path) -> None:
    """Recomputed from the runs' own bootstrap files: same resamples, same seeds."""
    report = json.loads((ablation / "ablation.json").read_text())
    projection = next(v for v in report["variants"] if v["variant"] == "adapter=projection")
    key = "test/accuracy"

    def measured(run: str, stage: str) -> tuple[float, Replicates]:
        results = _summary(ablation / "runs" / run)["test"]["results"][stage]
        replicates = load_replicates(ablation / "runs" / run / "test" / stage, "test")
        assert replicates is not None and replicates.unit == "sample"
        return results[key], replicates

    runs = [measured(r, "student_kd") for r in RUNS[1::2]]
    bases = [measured(r, "student_alone") for r in RUNS[1::2]]
    want = paired_difference(
        [p for p, _ in runs], [p for p, _ in bases], [r for _, r in runs], [r for _, r in bases], key
    )
    got = projection["difference"][key]
    assert got["per_seed"] == pytest.approx(want.pop("per_seed"))
    assert {k: got[k] for k in want} == pytest.approx(want)
    assert projection["difference"][key]["mean"] == pytest.approx(
        statistics.fmean(p - b for (p, _), (b, _) in zip(runs, bases, strict=True))
    )
    low, high = projection["interval"][key]
    assert low <= projection["mean"][key] <= high
    # Variant against variant, paired the same way: covariance − projection.
    covariance = [measured(r, "student_kd") for r in RUNS[0::2]]
    (pair,) = report["pairwise"][key]
    want = paired_difference(
        [p for p, _ in covariance],
        [p for p, _ in runs],
        [r for _, r in covariance],
        [r for _, r in runs],
        key,
    )
    assert (pair["a"], pair["b"]) == ("adapter=covariance", "adapter=projection")
    assert pair["mean"] == pytest.approx(want["mean"]) and pair["low"] == pytest.approx(want["low"])


def test_markdown_has_the_baseline_intervals_and_differences_and_the_png_is_written(ablation: Path) -> None:
    lines = (ablation / "ablation.md").read_text().splitlines()
    rows = [line for line in lines if line.startswith(("| adapter=", "| baseline")) and " − " not in line]
    assert len(rows) == 5  # baseline + 2 variants, then 2 difference rows
    assert rows[0].startswith("| baseline: student alone (no teacher) |")
    for line in rows[:3]:
        assert re.search(r"\| \d\.\d{4} ± \d\.\d{4} \[\d\.\d{4}, \d\.\d{4}\] \|", line), line
    for line in rows[3:]:
        assert re.search(r"\| [+-]\d\.\d{4} \[[+-]\d\.\d{4}, [+-]\d\.\d{4}\]( ✓)? \|", line), line
    assert any(line.startswith("| variant − baseline |") for line in lines)
    assert any(line.startswith("| variant a − variant b |") for line in lines)
    pair = next(line for line in lines if line.startswith("| adapter=covariance − adapter=projection |"))
    assert re.search(r"\| [+-]\d\.\d{4} \[[+-]\d\.\d{4}, [+-]\d\.\d{4}\]( ✓)? \|$", pair), pair
    assert (ablation / "ablation.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_no_baseline_leaves_it_out(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    Path("tiny.yaml").write_text(yaml.safe_dump(small_ablation_recipe_dict(), sort_keys=False))
    grid = ["--vary", "distill.adapter=covariance", "--seeds", "0"]
    assert main(["ablate", "tiny.yaml", *grid, "--out", "abl", "--no-baseline"]) == 0
    report = json.loads(Path("abl/ablation.json").read_text())
    assert report["baseline"] is None and [v["baseline"] for v in report["variants"]] == [False]
    assert report["variants"][0]["difference"] == {} and "student_alone" not in report["stage_cache"]
    assert "variant − baseline" not in Path("abl/ablation.md").read_text()


@pytest.mark.slow
def test_rerun_continues_an_interrupted_ablation(
    ablation: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    shutil.copy(ablation.parent / "tiny.yaml", tmp_path / "tiny.yaml")
    out = tmp_path / "abl"
    shutil.copytree(ablation, out)
    # Interrupted while testing: its directory is still partial, without the test stage's result.
    interrupted = out / "partial" / RUNS[2]
    (out / "runs" / RUNS[2]).rename(interrupted)
    for name in ("test/done.json", "run.json"):
        (interrupted / name).unlink()
    shutil.rmtree(out / "runs" / RUNS[3])  # never started
    untouched = {run: (out / "runs" / run / "summary.json").stat().st_mtime_ns for run in RUNS[:2]}
    lines_before = len((interrupted / "metrics.jsonl").read_text().splitlines())
    caches_before = sorted(p.name for p in (out / "cache").iterdir())

    monkeypatch.chdir(tmp_path)
    assert main(["ablate", "tiny.yaml", *GRID, "--out", "abl"]) == 0
    err = capfd.readouterr().err
    assert f"{RUNS[0]}: complete, skipped" in err and f"{RUNS[1]}: complete, skipped" in err
    assert f"{RUNS[2]}: continuing the interrupted run" in err
    assert f"reused from cache {_summary(out / 'runs' / RUNS[3])['teacher']['cache']['key']}" in err
    assert sorted(p.name for p in (out / "runs").iterdir()) == sorted(RUNS)
    assert not any((out / "partial").iterdir())
    assert {run: (out / "runs" / run / "summary.json").stat().st_mtime_ns for run in RUNS[:2]} == untouched
    # The interrupted run kept its trained stages: nothing was trained again.
    assert len((out / "runs" / RUNS[2] / "metrics.jsonl").read_text().splitlines()) == lines_before
    assert sorted(p.name for p in (out / "cache").iterdir()) == caches_before
    assert _summary(out / "runs" / RUNS[3])["teacher"]["cache"]["reused"]
    assert json.loads((out / "ablation.json").read_text())["stage_cache"]["teacher"] == {
        "trained": 1,
        "reused": 3,
    }
    assert "train stages first" not in err  # the teacher and the baselines were in the cache
    assert len(list(csv.DictReader((out / "ablation.csv").open()))) == 6 + 4 + 2 * 8

    # The same folder with a changed recipe is refused, naming what differs.
    assert main(["ablate", "tiny.yaml", *GRID, "--out", "abl", "--set", "train.lr=0.001"]) == 2
    assert "holds a run of a different recipe (it differs at train.lr)" in capfd.readouterr().err


@pytest.mark.slow
def test_a_failed_variant_leaves_a_report_of_the_others_and_the_same_command_continues(
    ablation: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    """Issue 26: variants whose training diverges at run time (they pass every check) do not abort
    the ablation; the command exits 1 naming them, the report covers the finished runs, marked
    incomplete, and the same command continues once the cause is fixed. Variants named like the
    fixture's folders reuse its seed-0 runs, so only the diverging ones train."""
    shutil.copy(ablation.parent / "tiny.yaml", tmp_path / "tiny.yaml")
    shutil.copytree(ablation, tmp_path / "abl")
    monkeypatch.chdir(tmp_path)
    variants: dict[str, dict[str, Any]] = {
        "adapter-covariance": {"distill.adapter": "covariance"},
        "adapter-projection": {"distill.adapter": "projection"},
        # the feature term overflows float32 in the distill stage itself
        "huge-beta": {"distill.adapter": "covariance", "distill.beta": 1.0e38},
        # the compared stage's schedule is its baseline's too: that (shared) train stage diverges
        "huge-lr": {"pipeline.student_kd.train.lr": 1.0e30},
    }
    Path("variants.yaml").write_text(yaml.safe_dump(variants))
    command = ["ablate", "tiny.yaml", "--variants", "variants.yaml", "--seeds", "0", "--out", "abl"]
    untouched = {run: (Path("abl/runs") / run / "summary.json").stat().st_mtime_ns for run in RUNS[:2]}

    assert main(command) == 1
    err = " ".join(capfd.readouterr().err.split())  # unwrapped
    assert (
        "[ablate] run huge-beta__seed0 FAILED: TrainingDiverged: [student_kd] the loss became non-finite"
        in err
    )
    assert "ablation incomplete: 2 of 4 runs failed:" in err
    assert "(log: abl/partial/huge-beta__seed0/error.log)" in err
    assert (
        "huge-lr__seed0 (huge-lr, seed 0): its train stages could not be trained (huge-lr__seed0): Training"
        in err
    )
    assert "(log: abl/prepare/huge-lr__seed0/error.log)" in err
    assert "continue with: kdkit ablate tiny.yaml --variants variants.yaml --seeds 0 --out abl" in err
    assert "Traceback" not in err
    assert "TrainingDiverged" in Path("abl/partial/huge-beta__seed0/error.log").read_text()
    report = json.loads(Path("abl/ablation.json").read_text())
    assert report["complete"] is False
    assert [f["run"] for f in report["failed"]] == ["huge-beta__seed0", "huge-lr__seed0"]
    assert [v["variant"] for v in report["variants"]][1:] == ["adapter-covariance", "adapter-projection"]
    assert Path("abl/ablation.md").read_text().startswith("**Incomplete:** 2 run(s) failed")

    # Fixed: the same command keeps the finished runs and redoes the failed one.
    variants["huge-beta"]["distill.beta"] = 0.5
    del variants["huge-lr"]
    Path("variants.yaml").write_text(yaml.safe_dump(variants))
    assert main(command) == 0
    err = capfd.readouterr().err
    assert f"{RUNS[0]}: complete, skipped" in err and f"{RUNS[1]}: complete, skipped" in err
    assert {
        run: (Path("abl/runs") / run / "summary.json").stat().st_mtime_ns for run in RUNS[:2]
    } == untouched
    report = json.loads(Path("abl/ablation.json").read_text())
    assert report["complete"] is True and report["failed"] == [] and len(report["variants"]) == 4
    assert not Path("abl/ablation.md").read_text().startswith("**Incomplete")


# ------------------------------------------------------------------------------------ report functions
def _group(label: str, accuracy: list[float], loss: list[float], **kwargs: Any) -> Group:
    rows = [
        {"split": "test", "test/accuracy": a, "test/loss": b, "adapter_params": 0}
        for a, b in zip(accuracy, loss, strict=True)
    ]
    return Group(label, list(range(len(rows))), [Measured(r, None) for r in rows], **kwargs)


def test_summary_cells_show_mean_std_and_interval_and_markdown_has_no_ranking() -> None:
    group = _group("a", [0.9, 0.7], [0.30, 0.34])
    summary = summarise(group, ["test/accuracy", "test/loss", "adapter_params"], ["test/accuracy"])
    assert summary["mean"]["test/accuracy"] == pytest.approx(0.8)
    assert summary["std"]["test/accuracy"] == pytest.approx(statistics.stdev([0.9, 0.7]))
    assert summary["interval"] == {} and summary["difference"] == {}  # no replicates, no interval
    assert format_cell(summary, "test/accuracy") == "0.8000 ± 0.1414"
    summary["interval"]["test/accuracy"] = [0.61, 0.95]
    assert format_cell(summary, "test/accuracy") == "0.8000 ± 0.1414 [0.6100, 0.9500]"
    assert format_cell(summary, "peak_MiB") == "-"
    one = summarise(_group("b", [0.6], [0.2]), ["test/accuracy"], ["test/accuracy"])
    assert format_cell(one, "test/accuracy") == "0.6000"  # no ± with a single seed
    table = markdown_tables([summary, one], ["test/accuracy"], ["adapter_params"], "max").splitlines()
    assert table[0] == "| variant | test/accuracy ↑ | adapter params ↓ |"
    assert table[2] == "| a | 0.8000 ± 0.1414 [0.6100, 0.9500] | 0 ± 0 |"
    assert "**" not in "\n".join(table) and len(table) == 4  # no "best" bolding, no difference table


def test_summary_pairs_each_seed_with_its_own_baseline() -> None:
    draws = np.random.default_rng(0).normal(size=(2, 50))

    def measured(value: float, shift: float) -> Measured:
        replicates = Replicates({"test/accuracy": value + shift * draws[0]}, "sample", 10, "same")
        return Measured({"split": "test", "test/accuracy": value}, replicates)

    base = [measured(0.5, 0.01), measured(0.6, 0.01)]
    group = Group("kd", [0, 1], [measured(0.7, 0.01), measured(0.9, 0.01)], baseline=base)
    diff = summarise(group, ["test/accuracy"], ["test/accuracy"])["difference"]["test/accuracy"]
    assert diff["per_seed"] == pytest.approx([0.2, 0.3]) and diff["mean"] == pytest.approx(0.25)
    assert diff["excludes_zero"] and 0.19 < diff["low"] <= diff["high"] < 0.31
    rows = list(
        csv.DictReader(
            csv_text(
                [{"variant": "kd", "seed": 0, "test/accuracy": 0.7}],
                [summarise(group, ["test/accuracy"], ["test/accuracy"])],
            ).splitlines()
        )
    )
    assert [r["seed"] for r in rows][-1] == "diff_excludes_zero" and rows[-1]["test/accuracy"] == "True"


@pytest.mark.parametrize(
    ("key", "mode", "expected"),
    [
        ("test/hter", "min", "min"),
        ("test/auc", "min", "max"),
        ("test/frame_acer", "min", "min"),
        ("test/accuracy", "max", "max"),
        ("test/loss", "max", "min"),
        ("val/eer", "max", "min"),
        ("peak_MiB", "max", "min"),
        ("test/score", "max", "max"),
    ],
)
def test_direction_of_a_column(key: str, mode: str, expected: str) -> None:
    assert direction(key, mode) == expected
