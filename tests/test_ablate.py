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

import pytest
import torch
import yaml
from conftest import tiny_recipe_dict
from torch.utils.data import Dataset

from kdkit.ablate import expand_grid, resolve, split_values
from kdkit.ablation_report import aggregate, csv_text, direction, markdown_table
from kdkit.checkpoint import load_file
from kdkit.cli import main
from kdkit.data import digits
from kdkit.pipeline import RecipeRun, train_stage_key
from kdkit.recipe import Recipe, apply_overrides, parse_recipe, read_yaml
from kdkit.registry import DATASETS
from kdkit.runlog import console

GRID = ["--vary", "distill.adapter=covariance,projection", "--seeds", "0,1"]
RUNS = [f"adapter-{a}__seed{s}" for s in (0, 1) for a in ("covariance", "projection")]


def small_recipe() -> dict[str, Any]:
    """The tiny digits recipe cut to teacher → student_kd → test, one epoch of two steps."""
    data = tiny_recipe_dict()
    data["train"].update(epochs=1, max_steps_per_epoch=2)
    data["pipeline"] = [
        {"name": "teacher", "do": "train", "model": "teacher"},
        {"name": "student_kd", "do": "distill"},
        {"name": "test", "do": "evaluate", "runs": ["teacher", "student_kd"], "split": "test"},
    ]
    return data


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


def test_variant_recipe_parses_values_as_yaml_and_sets_the_seed() -> None:
    variant = expand_grid(["distill.stages=[[1,1]],[[1,1],[2,2]]"])[1]
    recipe = resolve(small_recipe(), variant, 3, "tiny.yaml")
    assert recipe.seed == 3 and recipe.distill.stages == [[1, 1], [2, 2]]


def test_teacher_seed_pins_the_teacher_only_so_seeds_share_it() -> None:
    base = small_recipe()
    base["pipeline"].insert(1, {"name": "alone", "do": "train", "model": "student", "train": {"seed": 7}})
    variant = expand_grid(["distill.adapter=covariance"])[0]

    def seeds(recipe: Recipe) -> dict[str, int]:
        return {s.name: recipe.stage_seed(s) for s in recipe.pipeline}

    def teacher_key(recipe: Recipe) -> str:
        return train_stage_key(recipe, recipe.pipeline[0])

    shared = [resolve(base, variant, s, "tiny.yaml", teacher_seed=0) for s in (1, 2)]
    # The teacher keeps the recipe's seed, a stage that pins its own keeps it, the student follows.
    assert [seeds(r) for r in shared] == [
        {"teacher": 0, "alone": 7, "student_kd": s, "test": s} for s in (1, 2)
    ]
    assert teacher_key(shared[0]) == teacher_key(shared[1])
    per_seed = [resolve(base, variant, s, "tiny.yaml") for s in (1, 2)]
    assert [seeds(r)["teacher"] for r in per_seed] == [1, 2]
    assert teacher_key(per_seed[0]) != teacher_key(per_seed[1])
    # When the teacher itself is the compared stage, it is never pinned.
    compared = resolve(base, variant, 1, "tiny.yaml", stage="teacher", teacher_seed=0)
    assert seeds(compared)["teacher"] == 1


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--vary", "distill.adaptr=a,b"], "distill.adaptr: unknown key. Did you mean 'adapter'?"),
        (["--vary", "distill.adapter"], "--vary 'distill.adapter': expected KEY=V1,V2"),
        (["--vary", "distill.stages=[[1,1]],[[1,1]"], "--vary distill.stages: unbalanced brackets"),
        (
            ["--vary", "distill.alpha=0.7,2"],
            "with alpha=2, seed 0:\n  - pipeline[1] (student_kd).distill.alpha",
        ),
        (
            ["--vary", "distill.adapter=foo"],
            "with adapter=foo:\n  - pipeline.student_kd.distill: unknown adapter",
        ),
        (
            ["--vary", "distill.alpha=0.1", "--vary", "distill.alpha=0.2"],
            "--vary distill.alpha: given more than once",
        ),
        (["--vary", "seed=1,2"], "use --seeds"),
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
    Path("tiny.yaml").write_text(yaml.safe_dump(small_recipe(), sort_keys=False))
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
    import kdkit.pipeline

    seen: dict[str, list[tuple[torch.Tensor, ...]]] = {}

    class RecordingTrainer(kdkit.pipeline.Trainer):  # type: ignore[name-defined]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            if self.stage == "student_kd":
                batches = seen.setdefault(str(self.out_dir.parent.name), [])
                self.task.register_forward_pre_hook(
                    lambda _m, a: batches.append((a[0].clone(), a[1].clone(), torch.get_rng_state()))
                )

    monkeypatch.setattr(kdkit.pipeline, "Trainer", RecordingTrainer)
    stages = "pipeline=[{name: teacher, do: train, model: teacher}, {name: student_kd, do: distill}]"
    base = apply_overrides(small_recipe(), ["data.dataset=jittered_digits", stages])
    for variant in expand_grid(["distill.adapter=covariance,projection"]):
        for seed in (0, 1):
            recipe = resolve(base, variant, seed, "tiny.yaml")
            RecipeRun(recipe, tmp_path / f"{variant.slug}-{seed}", stage_cache=tmp_path / "cache").run()
    cov, proj = seen["adapter-covariance-0"], seen["adapter-projection-0"]
    assert len(cov) == len(proj) == 2
    for step_cov, step_proj in zip(cov, proj, strict=True):  # labels, images, RNG state
        assert all(torch.equal(a, b) for a, b in zip(step_cov, step_proj, strict=True))
    assert not torch.equal(seen["adapter-covariance-1"][0][1], cov[0][1])  # another seed, another order


# ------------------------------------------------------------------------------------ the stage cache
def test_train_stage_key_depends_on_the_teacher_side_only() -> None:
    base = small_recipe()

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
        recipe = parse_recipe(apply_overrides(small_recipe(), list(overrides)))
        return RecipeRun(recipe, tmp_path / name, stage_cache=cache).run()

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
    (root / "tiny.yaml").write_text(yaml.safe_dump(small_recipe(), sort_keys=False))
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
    assert report["stage_cache"] == {"teacher": {"trained": 1, "reused": 3}}
    # The teacher was trained once, alone, before the runs, with the recipe's seed; every run reused it.
    assert [p.name for p in (ablation / "prepare").iterdir()] == [RUNS[0]]
    caches = [_summary(ablation / "runs" / run)["teacher"]["cache"] for run in RUNS]
    assert all(c == {**caches[0], "reused": True, "trained_by": RUNS[0]} for c in caches)
    entry = ablation / "cache" / caches[0]["key"] / "model.pt"
    assert all(os.path.samefile(ablation / "runs" / r / "teacher" / "model.pt", entry) for r in RUNS)
    prepared = _summary(ablation / "prepare" / RUNS[0])
    assert list(prepared) == ["teacher"] and not prepared["teacher"]["cache"]["reused"]
    assert len([p for p in (ablation / "cache").iterdir() if p.is_dir()]) == 1
    # The students still ran with their own seeds.
    seeds = {run: read_yaml(ablation / "runs" / run / "recipe.yaml")["seed"] for run in RUNS}
    assert seeds == {run: int(run[-1]) for run in RUNS}


def test_csv_and_json_hold_every_run_and_mean_std_per_variant(ablation: Path) -> None:
    rows = list(csv.DictReader((ablation / "ablation.csv").open()))
    assert [r["run"] for r in rows[:4]] == RUNS
    assert [(r["variant"], r["seed"]) for r in rows[4:]] == [
        (f"adapter={a}", stat) for a in ("covariance", "projection") for stat in ("mean", "std")
    ]
    for row in rows[:4]:
        tested = _summary(ablation / "runs" / row["run"])["test"]["results"]["student_kd"]
        assert float(row["test/accuracy"]) == pytest.approx(tested["test/accuracy"])
        assert float(row["peak_MiB"]) > 0 and float(row["train_s_per_epoch"]) > 0
        assert (int(row["adapter_params"]) > 0) == ("projection" in row["run"])
    accuracy = [float(r["test/accuracy"]) for r in rows[:4] if r["distill.adapter"] == "projection"]
    projection_mean, projection_std = rows[6], rows[7]
    assert float(projection_mean["test/accuracy"]) == pytest.approx(statistics.fmean(accuracy))
    assert float(projection_std["test/accuracy"]) == pytest.approx(statistics.stdev(accuracy))

    report = json.loads((ablation / "ablation.json").read_text())
    assert (report["main_metric"], report["direction"], report["stage"]) == (
        "test/accuracy",
        "max",
        "student_kd",
    )
    assert report["columns"] == [
        "test/accuracy",
        "test/loss",
        "adapter_params",
        "train_s_per_epoch",
        "peak_MiB",
    ]
    assert [v["n"] for v in report["variants"]] == [2, 2] and len(report["runs"]) == 4
    assert "ru_maxrss" in report["memory_measure"]


def test_markdown_bolds_the_best_mean_and_the_png_is_written(ablation: Path) -> None:
    report = json.loads((ablation / "ablation.json").read_text())
    means = {v["variant"]: v["mean"]["test/accuracy"] for v in report["variants"]}
    best = max(means, key=means.__getitem__)
    lines = (ablation / "ablation.md").read_text().splitlines()
    table = [line for line in lines if line.startswith("| adapter=")]
    assert len(table) == 2
    for line in table:
        accuracy_cell = line.split("|")[2].strip()
        assert " ± " in accuracy_cell
        assert accuracy_cell.startswith("**") == line.startswith(f"| {best} |")
    assert (ablation / "ablation.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


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
    assert "train stages first" not in err  # the teacher was in the cache
    assert len(list(csv.DictReader((out / "ablation.csv").open()))) == 8

    # The same folder with a changed recipe is refused, naming what differs.
    assert main(["ablate", "tiny.yaml", *GRID, "--out", "abl", "--set", "train.lr=0.001"]) == 2
    assert "holds a run of a different recipe (it differs at train.lr)" in capfd.readouterr().err


# ------------------------------------------------------------------------------------ report functions
def _rows() -> list[dict[str, Any]]:
    values = {("a", 0): (0.9, 0.30), ("a", 1): (0.7, 0.34), ("b", 0): (0.6, 0.20), ("b", 1): (0.6, 0.22)}
    return [
        {
            "variant": v,
            "seed": s,
            "split": "test",
            "test/accuracy": acc,
            "test/loss": loss,
            "adapter_params": 0,
        }
        for (v, s), (acc, loss) in values.items()
    ]


def test_markdown_marks_the_best_per_column_in_its_direction() -> None:
    summary = aggregate(_rows())
    assert summary[0]["mean"]["test/accuracy"] == pytest.approx(0.8)
    assert summary[0]["std"]["test/accuracy"] == pytest.approx(statistics.stdev([0.9, 0.7]))
    table = markdown_table(summary, ["test/accuracy", "test/loss", "adapter_params"], "max").splitlines()
    assert table[0] == "| variant | test/accuracy ↑ | test/loss ↓ | adapter params ↓ |"
    assert table[2] == "| a | **0.8000 ± 0.1414** | 0.3200 ± 0.0283 | **0 ± 0** |"
    assert table[3] == "| b | 0.6000 ± 0.0000 | **0.2100 ± 0.0141** | **0 ± 0** |"
    one_seed = markdown_table(aggregate(_rows()[::2]), ["test/accuracy"], "max").splitlines()
    assert one_seed[2] == "| a | **0.9000** |"  # no ± with a single seed


def test_csv_text_has_mean_and_std_rows() -> None:
    rows = list(csv.DictReader(csv_text(_rows(), aggregate(_rows())).splitlines()))
    assert [r["seed"] for r in rows] == ["0", "1", "0", "1", "mean", "std", "mean", "std"]
    assert float(rows[6]["test/loss"]) == pytest.approx(0.21)


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
