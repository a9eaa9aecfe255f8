"""End-to-end tests of `kdkit run/validate/info/taps/plugins`, called in-process."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from conftest import TINY_RUN_OVERRIDES as OVERRIDES

from kdkit.cli import main
from kdkit.cli.run import _run_dir
from kdkit.config.loading import load_recipe, read_yaml
from kdkit.errors import UsageError
from kdkit.utils.checkpoint import file_sha256, load_file

STAGES = ["teacher", "student_kd", "student_alone", "test"]


def test_run_writes_the_run_directory(tiny_run: Path) -> None:
    run = tiny_run / "run"
    for stage in STAGES[:3]:
        assert {"model.pt", "last.pt", "done.json"} <= {p.name for p in (run / stage).iterdir()}, stage
    assert (run / "test" / "done.json").exists()

    # recipe.yaml is the resolved recipe, overrides included.
    resolved = load_recipe(run / "recipe.yaml")
    assert resolved == load_recipe(tiny_run / "tiny.yaml", OVERRIDES[1::2])
    assert resolved.train.lr == 1e-3

    lines = (run / "metrics.jsonl").read_text().splitlines()
    logged = [json.loads(line) for line in lines]
    assert all({"stage", "epoch", "step", "time"} <= r.keys() for r in logged)
    assert {r["stage"] for r in logged} == set(STAGES[:3])
    kd_epochs = [r for r in logged if r["stage"] == "student_kd" and "val/accuracy" in r]
    assert [r["epoch"] for r in kd_epochs] == [1, 2]
    assert {"train/kd", "train/feat", "train/feat.0", "train/feat.1", "train/ce"} <= kd_epochs[0].keys()

    summary = json.loads((run / "summary.json").read_text())
    assert list(summary) == STAGES
    for stage in STAGES[:3]:
        assert {"best", "last", "best_epoch", "params_M", "MiB"} <= summary[stage].keys()
        assert 0.0 <= summary[stage]["best"]["val/accuracy"] <= 1.0
        assert summary[stage]["best"]["val/accuracy"] >= summary[stage]["last"]["val/accuracy"]
    assert (summary["teacher"]["epochs"], summary["student_alone"]["epochs"]) == (2, 1)
    assert summary["teacher"]["params_M"] > summary["student_kd"]["params_M"]
    assert summary["test"]["split"] == "test"
    results = summary["test"]["results"]
    assert list(results) == STAGES[:3]
    assert all(0.0 <= r["test/accuracy"] <= 1.0 and "val/accuracy" in r for r in results.values())


def test_the_evaluate_stage_gives_intervals_and_the_difference_to_the_baseline(tiny_run: Path) -> None:
    test = json.loads((tiny_run / "run" / "summary.json").read_text())["test"]
    results = test["results"]
    for run, metrics in results.items():
        low, high = metrics["intervals"]["test/accuracy"]
        assert low <= metrics["test/accuracy"] <= high and high - low > 0
        assert metrics["resampling"]["unit"] == "sample" and metrics["resampling"]["n_units"] == 360
        assert (tiny_run / "run" / "test" / run / "bootstrap_test.npz").is_file()
    assert test["baseline"] == "student_alone" and set(test["differences"]) == {"teacher", "student_kd"}
    for run, per_key in test["differences"].items():
        diff = per_key["test/accuracy"]
        assert diff["mean"] == pytest.approx(
            results[run]["test/accuracy"] - results["student_alone"]["test/accuracy"]
        )
        assert diff["low"] <= diff["mean"] <= diff["high"]
        assert diff["excludes_zero"] == (diff["low"] > 0 or diff["high"] < 0)


def test_a_baseline_and_its_distilled_student_start_from_the_same_weights(
    tiny_recipe: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Same seed, same initial student: the difference between them is the teacher's doing."""
    import kdkit.run.pipeline

    initial: dict[str, dict[str, torch.Tensor]] = {}

    class RecordingTrainer(kdkit.run.pipeline.Trainer):  # type: ignore[name-defined]
        def __init__(self, task: torch.nn.Module, *args: object, **kwargs: object) -> None:
            initial[str(kwargs.get("stage", args[6]))] = {
                k: v.clone() for k, v in task.model.state_dict().items()
            }
            super().__init__(task, *args, **kwargs)

    monkeypatch.setattr(kdkit.run.pipeline, "Trainer", RecordingTrainer)
    monkeypatch.chdir(tiny_recipe.parent)
    assert main(["run", str(tiny_recipe), "--out", "run", "--set", "train.epochs=1"]) == 0
    alone, kd = initial["student_alone"], initial["student_kd"]
    assert alone.keys() == kd.keys() and all(torch.equal(alone[k], kd[k]) for k in alone)


def test_track_test_records_the_best_on_test_epoch_without_selecting_it(
    tiny_recipe: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tiny_recipe.parent)
    args = ["--set", "train.track_test=true", "--set", "train.epochs=3"]
    assert main(["run", str(tiny_recipe), "--out", "run", *args]) == 0
    summary = json.loads(Path("run/summary.json").read_text())
    logged = [json.loads(line) for line in Path("run/metrics.jsonl").read_text().splitlines()]
    for stage in STAGES[:3]:
        epochs = [r for r in logged if r["stage"] == stage and "test/accuracy" in r]
        assert [r["epoch"] for r in epochs] == [1, 2, 3]
        best = summary[stage]["best_on_test"]
        top = max(epochs, key=lambda r: r["test/accuracy"])  # first of the ties, as the trainer keeps
        assert (best["monitor"], best["epoch"], best["value"]) == (
            "test/accuracy",
            top["epoch"],
            top["test/accuracy"],
        )
        # model.pt is still the best epoch on val.
        val_best = max(epochs, key=lambda r: r["val/accuracy"])["epoch"]
        assert summary[stage]["best_epoch"] == val_best == load_file(Path(f"run/{stage}/model.pt"))["epoch"]
    paper = summary["test"]["paper"]
    assert paper["teacher"]["best_on_test"] == {
        k: summary["teacher"]["best_on_test"][k] for k in ("monitor", "epoch", "value")
    }
    assert "for comparison with published numbers only" in capsys.readouterr().out


def test_a_stage_trains_on_its_own_data_and_everything_is_tested_on_the_recipes(
    tiny_recipe: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from kdkit.data.digits_set import digits
    from kdkit.registry import DATASETS

    calls: list[tuple[str, int]] = []
    if "recorded_digits" not in DATASETS:
        DATASETS.add(
            "recorded_digits",
            lambda split, spec: calls.append((split, spec.options["split_seed"])) or digits(split, spec),
        )
    monkeypatch.chdir(tiny_recipe.parent)
    args = [
        "--set", "data.dataset=recorded_digits",
        "--set", "data.options={split_seed: 0}",
        "--set", "pipeline.teacher.data={options: {split_seed: 1}}",
        "--set", "train.epochs=1",
    ]  # fmt: skip
    assert main(["run", str(tiny_recipe), "--out", "run", *args]) == 0
    recipe = load_recipe(Path("run/recipe.yaml"))
    teacher = recipe.pipeline[0]
    assert recipe.plan.of(teacher).data.options == {"split_seed": 1} and recipe.data.options == {
        "split_seed": 0
    }
    assert ("train", 1) in calls and ("val", 1) in calls  # the teacher's own training and selection data
    assert ("test", 1) not in calls  # ... but every model is tested on the recipe's data
    from kdkit.run.stage_cache import train_stage_key

    other = load_recipe(Path("run/recipe.yaml"), ["pipeline.teacher.data={}"])
    assert train_stage_key(recipe, teacher) != train_stage_key(other, other.pipeline[0])


def test_checkpoints_are_weights_only_and_reference_the_teacher(tiny_run: Path) -> None:
    run = tiny_run / "run"
    kd = torch.load(run / "student_kd" / "model.pt", map_location="cpu", weights_only=True)
    assert kd["kind"] == "model" and kd["stage"] == "student_kd"
    assert kd["spec"]["options"]["embed_dim"] == 32 and kd["spec"]["weights"] is None
    assert not any(k.startswith(("teacher.", "adapters.")) for k in kd["model"])
    assert kd["teacher"]["model"] == "teacher"
    assert kd["teacher"]["path"] == str(run / "teacher" / "model.pt")
    assert kd["teacher"]["sha256"] == file_sha256(run / "teacher" / "model.pt")
    last = load_file(run / "student_kd" / "last.pt")
    assert last["epoch"] == 2 and not any(k.startswith("teacher.") for k in last["trainable"])


def test_resume_of_a_finished_run_skips_every_stage(
    tiny_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    shutil.copy(tiny_run / "tiny.yaml", tmp_path / "tiny.yaml")
    run = shutil.copytree(tiny_run / "run", tmp_path / "run")
    monkeypatch.chdir(tmp_path)
    before = {p: p.read_bytes() for p in run.glob("*/*.pt")}
    metrics = (run / "metrics.jsonl").read_text()
    summary = (run / "summary.json").read_text()
    assert main(["run", "tiny.yaml", "--out", "run", "--resume", *OVERRIDES]) == 0
    err = capsys.readouterr().err
    for stage in STAGES:
        assert f"[{stage}] complete, skipped (resume)" in err
    assert {p: p.read_bytes() for p in run.glob("*/*.pt")} == before
    assert (run / "metrics.jsonl").read_text() == metrics
    assert json.loads((run / "summary.json").read_text()) == json.loads(summary)


def test_resume_with_a_changed_stage_keeps_the_others_and_reruns_what_reads_it(
    tiny_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Issue 26: a fixed distill setting re-runs the distill stage and the evaluate stage that reads
    it; the teacher and the student alone are kept; the old results are set aside, never mixed."""
    shutil.copy(tiny_run / "tiny.yaml", tmp_path / "tiny.yaml")
    run = shutil.copytree(tiny_run / "run", tmp_path / "run")
    monkeypatch.chdir(tmp_path)
    before = {p: p.read_bytes() for p in run.glob("*/model.pt")}
    old_summary = json.loads((run / "summary.json").read_text())
    old_lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]

    assert (
        main(["run", "tiny.yaml", "--out", "run", "--resume", *OVERRIDES, "--set", "distill.alpha=0.2"]) == 0
    )
    err = capsys.readouterr().err
    assert "the recipe differs from the one this run started with at distill.alpha" in err
    for kept in ("teacher", "student_alone"):
        assert f"[{kept}] kept: finished, and nothing it depends on changed" in err
        assert (run / kept / "model.pt").read_bytes() == before[run / kept / "model.pt"]
    assert "[student_kd] runs again: its inputs changed at distill.alpha" in err
    assert "[test] runs again: it reads student_kd, which runs again" in err
    assert "[student_kd] resumed from" not in err  # trained from the start, not from the old last.pt
    assert (run / "student_kd" / "model.pt").read_bytes() != before[run / "student_kd" / "model.pt"]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["teacher"] == old_summary["teacher"]
    assert summary["student_kd"]["last"] != old_summary["student_kd"]["last"]
    tested = summary["test"]["results"]["student_kd"]
    assert tested["test/loss"] != old_summary["test"]["results"]["student_kd"]["test/loss"]
    # The metrics log holds the new student_kd epochs only; the old ones moved with its folder.
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r for r in lines if r["stage"] != "student_kd"] == [
        r for r in old_lines if r["stage"] != "student_kd"
    ]
    assert sum(r["stage"] == "student_kd" for r in lines) == sum(
        r["stage"] == "student_kd" for r in old_lines
    )
    (aside,) = (run / ".superseded").iterdir()
    assert sorted(p.name for p in aside.iterdir()) == [
        "metrics.jsonl",
        "recipe.yaml",
        "student_kd",
        "summary.json",
        "test",
    ]
    assert (aside / "student_kd" / "model.pt").read_bytes() == before[run / "student_kd" / "model.pt"]
    assert read_yaml(aside / "recipe.yaml")["distill"]["alpha"] == 0.7
    assert read_yaml(run / "recipe.yaml")["distill"]["alpha"] == 0.2


def test_resume_refuses_a_saved_recipe_it_cannot_read(
    tiny_recipe: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tiny_recipe.parent)
    (tiny_recipe.parent / "old").mkdir()
    (tiny_recipe.parent / "old" / "recipe.yaml").write_text("name: old\nmodels: 3\n")
    assert main(["run", str(tiny_recipe), "--out", "old", "--resume"]) == 2
    err = capsys.readouterr().err
    assert "--resume: the recipe this run started with (old/recipe.yaml) cannot be read" in err
    assert "start a new run" in err and "Traceback" not in err


def test_existing_out_without_resume_is_refused(
    tiny_run: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tiny_run)
    assert main(["run", "tiny.yaml", "--out", "run"]) == 2
    err = capsys.readouterr().err
    assert "--out: run already holds a run; pass --resume" in err and "Traceback" not in err


def test_resume_without_a_run_is_refused(
    tiny_recipe: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tiny_recipe.parent)
    assert main(["run", str(tiny_recipe), "--out", "empty", "--resume"]) == 2
    assert "holds no run to resume" in capsys.readouterr().err
    assert main(["run", str(tiny_recipe), "--resume"]) == 2
    assert "no earlier run of 'digits-kd' under runs/" in capsys.readouterr().err


def test_default_run_directories_are_never_reused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert _run_dir("exp", None, resume=False) == Path("runs/exp")
    for name in ("exp", "exp-2"):
        (tmp_path / "runs" / name).mkdir(parents=True)
        (tmp_path / "runs" / name / "recipe.yaml").write_text("{}")
    assert _run_dir("exp", None, resume=False) == Path("runs/exp-3")
    assert _run_dir("exp", None, resume=True) in {Path("runs/exp"), Path("runs/exp-2")}
    with pytest.raises(UsageError):
        _run_dir("exp", Path("runs/exp"), resume=False)


def test_resume_without_out_never_picks_another_recipes_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`kdkit run recipes/kdfas.yaml --resume` used to glob runs/kdfas* and continue the newest
    match, which could be runs/kdfas-demo (another recipe's run)."""
    monkeypatch.chdir(tmp_path)
    for name in ("kdfas", "kdfas-2", "kdfas-demo", "kdfas-demo-2", "kdfasx"):
        (tmp_path / "runs" / name).mkdir(parents=True)
        (tmp_path / "runs" / name / "recipe.yaml").write_text("{}")
        mtime = {"kdfas": 1, "kdfas-2": 2, "kdfas-demo": 5, "kdfas-demo-2": 9, "kdfasx": 10}[name]
        os.utime(tmp_path / "runs" / name, (mtime, mtime))
    assert _run_dir("kdfas", None, resume=True) == Path("runs/kdfas-2")  # its newest, not kdfas-demo-2
    assert _run_dir("kdfas-demo", None, resume=True) == Path("runs/kdfas-demo-2")
    with pytest.raises(UsageError, match="no earlier run of 'kdfa'"):
        _run_dir("kdfa", None, resume=True)


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["distill.alpha=2"], "pipeline.student_kd.distill.alpha: expected a value in [0, 1], got 2.0"),
        (["train.lrr=1"], "train.lrr: unknown key. Did you mean 'lr'?"),
        (["pipeline.nope.train.epochs=1"], "no list item named 'nope'"),
        (["models.student.name=vit_tiny_patch16_22"], "unknown model 'vit_tiny_patch16_22'"),
        (
            ["distill.adapter=identity"],
            "identity adapter needs equal widths; got student_dim=32, teacher_dim=48",
        ),
        (["data.dataset=digitz"], "data.dataset: unknown dataset 'digitz'. Did you mean 'digits'?"),
        (["pipeline.test.baseline=student"], "pipeline.test.baseline: expected one of the stage's runs"),
        (
            ["pipeline.teacher.baseline=student_kd"],
            "baseline: only an evaluate stage compares with a baseline",
        ),
        (
            ["pipeline.test.data={batch_size: 8}"],
            "pipeline.test.data: an evaluate stage reads the top-level",
        ),
        (["pipeline.teacher.data={batch_size: 0}"], "pipeline.teacher.data: image_size and batch_size"),
        (["pipeline.teacher.data={batchsize: 8}"], "pipeline.teacher.data.batchsize: unknown key"),
    ],
)
def test_bad_recipe_exits_2_with_the_key_path(
    tiny_recipe: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    overrides: list[str],
    expected: str,
) -> None:
    monkeypatch.chdir(tiny_recipe.parent)
    args = [a for o in overrides for a in ("--set", o)]
    assert main(["run", str(tiny_recipe), "--out", "bad", *args]) == 2
    err = capsys.readouterr().err
    assert expected in err and "Traceback" not in err
    assert not (tiny_recipe.parent / "bad" / "recipe.yaml").exists()  # nothing ran
    assert main(["validate", str(tiny_recipe), *args]) == 2


def test_malformed_recipe_file_exits_2(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "bad.yaml").write_text("name: x\ndata: {dataset: digits\n")
    assert main(["validate", "bad.yaml"]) == 2
    err = capsys.readouterr().err
    assert "malformed YAML at line" in err and "bad.yaml" in err and "Traceback" not in err


def test_validate_prints_the_tap_table(
    tiny_recipe: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tiny_recipe.parent)
    assert main(["validate", str(tiny_recipe)]) == 0
    out = capsys.readouterr().out  # results on stdout, so they can be piped
    assert "valid" in out and "(4 stages)" in out
    assert "stage 'student_kd': layer pairs" in out
    assert "blocks.1 [cls]" in out and "(2, 32)" in out and "(2, 48)" in out and "covariance" in out
    assert not (tiny_recipe.parent / "unused").exists()


def test_info_json_reports_cost(tiny_recipe: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info", str(tiny_recipe), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert set(rows) == {"teacher", "student"}
    teacher, student = rows["teacher"], rows["student"]
    assert teacher["params_M"] > student["params_M"] > 0
    assert teacher["GFLOPs"] > student["GFLOPs"] > 0
    assert teacher["MiB"] == pytest.approx(teacher["params_M"] * 1e6 * 4 / 2**20)


def test_info_table(tiny_recipe: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info", str(tiny_recipe), "--set", "models.student.options.depth=1"]) == 0
    out = capsys.readouterr().out
    assert "params (M)" in out and "MiB (fp32)" in out and "GFLOPs / image" in out and "teacher" in out


def test_plugins_lists_fas(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plugins"]) == 0
    out = capsys.readouterr().out
    assert "fas" in out and "kdkit_fas" in out
    assert "digits" in out and "covariance" in out and "classification" in out
    assert "group_methods: vitkd" in out and "teacher_combiners: ca_mkd, ensemble, weighted" in out


def test_taps_lists_block_paths(capsys: pytest.CaptureFixture[str]) -> None:
    args = ["taps", "vit_tiny_patch16_224", "--img-size", "32", "--option", "depth=2"]
    assert main([*args, "--option", "embed_dim=64", "--option", "num_heads=2"]) == 0
    out = capsys.readouterr().out
    assert "blocks.0" in out and "blocks.1" in out and "blocks.2" not in out
    assert "(1, 5, 64)" in out  # 4 patches + the class token, width 64
    assert main(["taps", "vit_tiny_patch16_22"]) == 2
    assert "unknown model" in capsys.readouterr().err


def test_a_teacher_name_never_resolves_to_a_later_stage(tiny_recipe: Path) -> None:
    """`teacher: teacher` before the stage named 'teacher' means the model spec, not that stage."""
    from kdkit.data.datasets import example_batch
    from kdkit.run.build import build_distiller

    recipe = load_recipe(
        tiny_recipe,
        ["pipeline=[{name: kd, do: distill}, {name: teacher, do: train, model: teacher}]"],
    )
    distiller = build_distiller(recipe, recipe.pipeline[0], {}, example_batch(recipe.data))
    assert distiller.teacher.embed_dim == 48 and len(distiller.teacher.blocks) == 2
    distiller.close()


def test_a_missing_plugin_is_a_recipe_error(
    tiny_recipe: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tiny_recipe.parent)
    assert main(["validate", str(tiny_recipe), "--set", "plugins=[fas, nope]"]) == 2
    err = capsys.readouterr().err
    assert "plugins: 'nope' is not installed (installed: [" in err and "'fas'" in err


def test_a_distill_stage_without_teacher_terms_trains_exactly_the_baseline(
    tiny_recipe: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """alpha = 0 and no feature adapter leave cross-entropy alone: with the same seed, the same
    initial weights, batches and random draws, the distill stage must end with the baseline's
    weights. Anything that made variants and baseline differ besides the teacher would show here."""
    monkeypatch.chdir(tiny_recipe.parent)
    args = ["--set", "distill.alpha=0.0", "--set", "distill.adapter=none", "--set", "train.epochs=2"]
    assert main(["run", str(tiny_recipe), "--out", "run", *args]) == 0
    alone = load_file(Path("run/student_alone/model.pt"))["model"]
    kd = load_file(Path("run/student_kd/model.pt"))["model"]
    assert alone.keys() == kd.keys() and all(torch.equal(alone[k], kd[k]) for k in alone)
