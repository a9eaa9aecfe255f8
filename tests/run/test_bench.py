"""Tests for `kdkit bench` and its yardstick, benchmarks/reference_loop.py (no timing asserts)."""

from __future__ import annotations

import ast
import copy
import json
from pathlib import Path

import pytest
import torch
from conftest import REPO, tiny_vit

from kdkit.cli import main
from kdkit.cli.bench import print_report
from kdkit.config.schema import DistillSpec, TrainSpec
from kdkit.distill.distiller import Distiller
from kdkit.distill.pairs import layer_pairs
from kdkit.run.benchmark import REFERENCE, reference_for
from kdkit.training.trainer import Trainer


def _batches(n: int = 3) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [
        (torch.randn(8, 1, 16, 16, generator=g), torch.randint(0, 10, (8,), generator=g)) for _ in range(n)
    ]


def _distiller(teacher: torch.nn.Module, student: torch.nn.Module, adapter: str, options: dict) -> Distiller:
    pairs = layer_pairs(teacher, student, [[1, 1], [2, 2]])
    return Distiller(
        teacher,
        student,
        pairs,
        adapter=adapter,
        adapter_options=options,
        alpha=0.6,
        tau=2.0,
        beta=0.5,
        label_smoothing=0.1,
        example_input=torch.zeros(2, 1, 16, 16),
    )


@pytest.mark.parametrize(
    ("adapter", "options"),
    [("covariance", {}), ("covariance", {"detach_covariance": False}), ("projection", {})],
)
def test_the_reference_loop_computes_what_a_kdkit_distill_step_computes(adapter: str, options: dict) -> None:
    """Same weights in, same batches: the hand-written loop and kdkit's Trainer end with the same
    student, so (b)/(d) compares equal work."""
    teacher, student = tiny_vit(embed_dim=48, seed=1), tiny_vit(embed_dim=32, seed=2)
    kd = _distiller(teacher, student, adapter, options)
    ref_distiller = _distiller(copy.deepcopy(teacher), copy.deepcopy(student), adapter, options)
    ref_distiller.adapters.load_state_dict(kd.adapters.state_dict())
    train = TrainSpec(epochs=2, lr=1e-3, warmup_epochs=1, clip_grad=1.0, device="cpu")
    batches = _batches()
    trainer = Trainer(kd, train, batches, stage="bench")  # no evaluator, run directory or log
    loop = reference_for(ref_distiller, DistillSpec(adapter=adapter), train, len(batches), batches[0][0][:2])
    for i, projection in enumerate(loop.projections):
        projection.load_state_dict(kd.adapters[i].proj.state_dict())
    for epoch in range(2):
        trainer.train_one_epoch(epoch)
        for images, labels in batches:
            loop.step(images, labels)
    assert trainer.optimizer.param_groups[0]["lr"] == loop.optimizer.param_groups[0]["lr"]
    mine, theirs = kd.student.state_dict(), loop.student.state_dict()
    assert not torch.equal(mine["head.weight"], tiny_vit(embed_dim=32, seed=2).state_dict()["head.weight"])
    for key in mine:
        torch.testing.assert_close(mine[key], theirs[key], rtol=1e-5, atol=1e-6, msg=key)


def test_the_reference_loop_uses_no_kdkit_code() -> None:
    tree = ast.parse(REFERENCE.read_text())
    modules = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    modules += [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    assert modules and not [m for m in modules if m.split(".")[0] in ("kdkit", "kdkit_fas", "timm")]
    assert REFERENCE.parent == REPO / "benchmarks"


@pytest.mark.slow
def test_bench_json_reports_every_mode_the_ratios_the_machine_and_the_loader(
    tiny_recipe: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["bench", str(tiny_recipe), "--steps", "2", "--repeats", "2", "--warmup", "1", "--batch", "8"]
    assert main([*argv, "--peak-tflops", "0.5", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert set(report["modes"]) == {"student", "distill", "cached", "reference", "compiled"}
    for row in report["modes"].values():
        assert row["img_per_s"] > 0 and row["step_ms_min"] <= row["step_ms"] <= row["step_ms_max"]
    assert report["modes"]["cached"]["cache_hit_rate"] == 1.0  # the timed cached steps never ran the teacher
    b, d = report["modes"]["distill"], report["modes"]["reference"]
    assert (
        b["step_ms_min"] / d["step_ms_max"] <= report["ratios"]["b/d"] <= b["step_ms_max"] / d["step_ms_min"]
    )
    assert set(report["ratios"]) == {"b/d", "c/a", "b/a", "b/e"}
    assert report["batch"] == 8 and report["input"] == [1, 16, 16]
    assert report["machine"]["torch_threads"] >= 1 and report["machine"]["torch"] == torch.__version__
    loader = report["loader"]
    assert 0 <= loader["wait_share"] <= 1 and loader["steps"] == 2
    assert loader["worker_img_per_s"] > 0 and loader["served_from_store"] == 0
    # Model FLOPs: the student's forward + backward (3 forwards), plus the teacher's forward where it runs.
    flops = report["forward_gflops_per_image"]
    assert flops["teacher"] > flops["student"] > 0  # the tiny teacher is the wider one
    assert flops["teachers"] == [flops["teacher"]]
    (teacher,) = report["teachers"]  # its forward alone, timed beside (b)
    assert (
        teacher["model"] == "teacher" and teacher["forward_ms"] > 0 and teacher["share_of_distill_step"] > 0
    )
    modes = (
        ("student", False),
        ("distill", True),
        ("cached", False),
        ("reference", True),
        ("compiled", True),
    )
    for mode, teacher_runs in modes:
        row = report["modes"][mode]
        per_image = 3 * flops["student"] + (flops["teacher"] if teacher_runs else 0.0)
        assert row["tflops_per_s"] == pytest.approx(per_image * row["img_per_s"] / 1000)
        assert row["mfu"] == pytest.approx(row["tflops_per_s"] / 0.5)
    assert report["peak_tflops"] == 0.5


def test_bench_modes_choose_what_is_measured(
    tiny_recipe: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KDKIT_PROGRESS_STEPS", "1")  # a plain progress line at every step
    argv = ["bench", str(tiny_recipe), "--steps", "1", "--repeats", "1", "--warmup", "1", "--batch", "4"]
    assert main([*argv, "--modes", "student,distill", "--no-data", "--json"]) == 0
    out, err = capsys.readouterr()
    report = json.loads(out)  # progress never mixes into the JSON on stdout
    assert set(report["modes"]) == {"student", "distill"} and report["ratios"]["b/d"] is None
    assert report["ratios"]["b/a"] > 0
    # Progress on stderr: each mode's warm-up, then the timed rounds naming the mode measured.
    assert "bench (a) student alone: warm-up: 1/1 steps" in err
    assert "bench (b) distill, live teacher: warm-up: 1/1 steps" in err
    rounds = [line for line in err.splitlines() if line.startswith("bench: 1 timed rounds of 3 measurements")]
    measured = sorted(line.split(", ETA ")[1].split(", ", 1)[1] for line in rounds)
    assert measured == ["(a) student alone", "(b) distill, live teacher", "teacher.t0 forward"]


def test_bench_needs_a_distill_stage(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    recipe = REPO / "recipes" / "digits-kd.yaml"
    assert main(["bench", str(recipe), "--stage", "nope", "--json"]) == 2
    assert "needs a distill stage named 'nope'" in capsys.readouterr().err


def test_the_bench_table_shows_slow_rates_with_two_significant_digits(
    capsys: pytest.CaptureFixture[str],
) -> None:
    row = {"img_per_s": 0.42, "step_ms": 19047.6, "step_ms_min": 19000.0, "step_ms_max": 19100.0}
    row |= {"label": "(b) distill, live teacher", "peak_mem_mib": None, "tflops_per_s": 0.001}
    machine = {"cpu": "cpu", "cpus_usable": 2, "cpus": 2, "torch_threads": 2, "torch": "2", "device": "cpu"}
    report = {
        "machine": machine | {"load_average_1m": 1.0},
        "stage": "kd",
        "batch": 8,
        "input": [3, 224, 224],
    }
    report |= {"amp": "none", "teacher_dtype": "float32", "repeats": 1, "steps": 1, "modes": {"distill": row}}
    print_report(report | {"ratios": {}, "loader": None})
    line = next(line for line in capsys.readouterr().out.splitlines() if "(b) distill" in line)
    assert "│  0.42 │" in line  # not "0.4" (or "0" as the progress showed it)


def test_the_loader_line_gives_the_store_command_for_the_data_root(
    capsys: pytest.CaptureFixture[str],
) -> None:
    machine = {"cpu": "cpu", "cpus_usable": 2, "cpus": 2, "torch_threads": 2, "torch": "2", "device": "cpu"}
    report = {"machine": machine | {"load_average_1m": 1.0}, "stage": "kd", "batch": 8, "input": [3, 64, 64]}
    report |= {"amp": "none", "teacher_dtype": "float32", "repeats": 1, "steps": 1, "modes": {}, "ratios": {}}
    loader = {"num_workers": 2, "data_root": "data/my frames", "wait_ms_per_step": 1.0, "step_ms": 10.0}
    loader |= {"wait_share": 0.1, "worker_img_per_s": 900.0, "served_from_store": 0, "size": 64}
    print_report(report | {"loader": loader})
    assert "(no frame store: `kdkit store 'data/my frames'`)" in capsys.readouterr().out
