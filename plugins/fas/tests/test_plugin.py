"""The FAS plugin inside kdkit: registration, the evaluator, and the demo pipeline end to end."""

from __future__ import annotations

import argparse
import contextlib
import csv
import functools
import io
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from fixtures import make_folder
from kdkit_fas import metrics_cli
from kdkit_fas.evaluator import FasEvaluator
from kdkit_fas.metrics import ScoreSet, eer_threshold, hter

from kdkit import load_recipe
from kdkit.cli import main
from kdkit.evaluation.protocol import Predictions
from kdkit.plugins import load_plugins
from kdkit.registry import DATASETS, EVALUATORS

ROOT = Path(__file__).resolve().parents[3]
DEMO = ROOT / "recipes" / "kdfas-demo.yaml"


class _Meta:
    """A stand-in dataset: only `meta` matters to the evaluator."""

    def __init__(self, meta: list[dict]) -> None:
        self.meta = meta


def _predictions(rng: np.random.Generator, n_videos: int, frames: int, shift: float) -> Predictions:
    """Frames of live (label 1) and print/replay (label 0) videos with P(live) from a logistic model."""
    meta, logits, labels = [], [], []
    for v in range(n_videos):
        label = v % 2
        kind = "live" if label else ("print" if v % 4 == 0 else "replay")
        centre = rng.normal(shift if label else -shift, 1.0)
        for _ in range(frames):
            z = centre + rng.normal(0, 0.5)
            logits.append([0.0, z])
            labels.append(label)
            meta.append({"video": f"{kind}_{v}", "attack_type": kind, "label": label})
    return Predictions(torch.tensor(logits), torch.tensor(labels), _Meta(meta))


def test_plugin_registers_through_the_entry_point() -> None:
    plugins = load_plugins()
    assert "fas" in plugins and plugins["fas"].error is None
    assert {"fas_folder", "fas_manifest"} <= set(DATASETS.names())
    assert "fas" in EVALUATORS


def test_evaluator_fixes_the_threshold_on_dev_and_writes_reusable_scores(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    dev, test = _predictions(rng, 40, 3, 1.0), _predictions(rng, 40, 3, 1.5)
    evaluator = FasEvaluator(level="video")
    metrics = evaluator({"val": dev, "test": test}, tmp_path)

    # Recompute the video-level numbers by hand: threshold from dev's EER, HTER on test.
    def video_scores(pred: Predictions) -> ScoreSet:
        p = torch.softmax(pred.logits, 1)[:, 1].numpy()
        videos = [m["video"] for m in pred.dataset.meta]
        return ScoreSet(
            p, pred.labels.numpy(), [m["attack_type"] for m in pred.dataset.meta], videos
        ).per_video()

    d, t = video_scores(dev), video_scores(test)
    _, threshold = eer_threshold(d.scores, d.labels)
    assert metrics["test/threshold"] == pytest.approx(threshold)
    assert metrics["test/hter"] == pytest.approx(hter(t.scores, t.labels, threshold))
    assert metrics["val/eer"] == pytest.approx(eer_threshold(d.scores, d.labels)[0])
    assert 0.0 <= metrics["test/frame_hter"] <= 1.0 and metrics["test/auc"] > 0.5

    # The scores CSV it writes is the input of `kdkit fas metrics` and gives the same HTER.
    for name in ("scores_val.csv", "scores_test.csv", "metrics_test.json", "roc_det_test.png"):
        assert (tmp_path / name).is_file()
    parser = argparse.ArgumentParser()
    metrics_cli.add_arguments(parser)
    args = parser.parse_args(
        ["--scores", str(tmp_path / "scores_test.csv"), "--dev", str(tmp_path / "scores_val.csv"), "--json"]
    )
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        assert metrics_cli.run(args) == 0
    result = json.loads(buffer.getvalue())
    assert result["video"]["hter"] == pytest.approx(metrics["test/hter"], abs=1e-6)
    assert result["frame"]["hter"] == pytest.approx(metrics["test/frame_hter"], abs=1e-6)


def test_evaluator_needs_dev_and_two_classes() -> None:
    rng = np.random.default_rng(1)
    with pytest.raises(ValueError, match="dev split"):
        FasEvaluator()({"test": _predictions(rng, 4, 1, 1.0)})
    with pytest.raises(ValueError, match="level"):
        FasEvaluator(level="clip")


def _tiny_demo_args(tmp_path: Path) -> list[str]:
    vit = "{img_size: 32, patch_size: 8, num_classes: 2, depth: %d, embed_dim: %d, num_heads: 2}"
    synth = "{n_subjects: %d, dev_subjects: 1, test_subjects: %d, frames: 2, size: 32, seed: %d, workers: 1}"
    overrides = [
        f"data.root={tmp_path / 'synth'}",
        "data.image_size=32",
        "data.batch_size=16",
        "data.options.synth=" + synth % (6, 3, 0),
        f"pipeline.teacher.data.root={tmp_path / 'pool'}",
        "pipeline.teacher.data.options.synth=" + synth % (4, 0, 1),
        "pipeline.teacher.train.epochs=2",
        "models.teacher.options=" + vit % (2, 32),
        "models.student.options=" + vit % (1, 16),
        "distill.stages=[[1, 2]]",
        "train.epochs=2",
        "train.max_steps_per_epoch=2",
    ]
    return [arg for text in overrides for arg in ("--set", text)]


@dataclass(frozen=True)
class DemoRun:
    """A finished tiny demo run: `root/run`, beside its data sets `root/synth` and `root/pool`."""

    root: Path
    printed: str  # what the run wrote on stdout


@functools.cache
def _demo_run_in(basetemp: Path) -> DemoRun:
    root = basetemp / "fas-demo"
    root.mkdir()
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(["run", str(DEMO), "--out", str(root / "run"), *_tiny_demo_args(root)]) == 0
    return DemoRun(root, printed.getvalue())


def tiny_demo_run(tmp_path_factory: pytest.TempPathFactory) -> DemoRun:
    """`kdkit run recipes/kdfas-demo.yaml` at a tiny size, run once per test process (pytest-xdist
    worker) for every test module that reads it. Tests that change the run work on a copy."""
    return _demo_run_in(tmp_path_factory.getbasetemp())


@pytest.fixture
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> DemoRun:
    """The shared tiny demo run."""
    return tiny_demo_run(tmp_path_factory)


def test_demo_pipeline_end_to_end(demo_run: DemoRun) -> None:
    out = demo_run.root / "run"
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary) == ["teacher", "student_alone", "student_procrustes", "student_kd", "test"]
    # the demo's two bridges, each in its own stage
    recipe = load_recipe(out / "recipe.yaml")
    stages = {s.name: s for s in recipe.pipeline}
    assert [recipe.plan.of(stages[n]).distill.adapter for n in ("student_procrustes", "student_kd")] == [
        "procrustes",
        "covariance",
    ]
    results = summary["test"]["results"]
    for run in ("teacher", "student_alone", "student_kd", "student_procrustes"):
        assert 0.0 <= results[run]["test/hter"] <= 1.0
        assert (out / "test" / run / "roc_det_test.png").is_file()
        with open(out / "test" / run / "scores_test.csv", newline="") as handle:
            rows = list(csv.DictReader(handle))
        assert {r["attack_type"] for r in rows} == {"live", "print", "replay"}
        assert {r["subject"] for r in rows} and all(r["subject"] for r in rows)
        # 3 test subjects are too few for an interval (kdkit.evaluation.stats.MIN_UNITS): none is recorded;
        # the replicates are kept for ablations (which also refuse intervals over 3 subjects).
        assert results[run]["resampling"] == {
            "unit": "subject",
            "n_units": 3,
            "draws": 2000,
            "confidence": 0.95,
        }
        assert "intervals" not in results[run]
        assert (out / "test" / run / "bootstrap_test.npz").is_file()
        assert results[run]["test/apcer"] == max(
            v for k, v in results[run].items() if k.startswith("test/apcer_species.")
        )
    assert results["teacher"]["params_M"] > results["student_kd"]["params_M"]
    # Every run's difference to the student trained alone, paired on the same test subjects.
    assert summary["test"]["baseline"] == "student_alone"
    differences = summary["test"]["differences"]
    assert set(differences) == {"teacher", "student_kd", "student_procrustes"}
    kd = differences["student_kd"]["test/hter"]
    assert kd["mean"] == pytest.approx(
        results["student_kd"]["test/hter"] - results["student_alone"]["test/hter"]
    )
    assert kd["n_units"] == 3 and kd["low"] is kd["excludes_zero"] is None  # too few subjects: no interval
    # The paper-comparable section: test-EER-threshold HTER and the epoch a test selection keeps.
    paper = summary["test"]["paper"]["student_kd"]
    assert paper["test/optimistic_hter"] == results["student_kd"]["test/eer"]
    assert paper["best_on_test"]["monitor"] == "test/optimistic_hter"
    assert paper["best_on_test"] == {
        k: summary["student_kd"]["best_on_test"][k] for k in ("monitor", "epoch", "value")
    }
    # The teacher trained on its own pool (other subjects), and is tested on the student's test set.
    pool = demo_run.root / "pool"
    assert (pool / "meta.csv").is_file() and not (pool / "test").exists()
    # The student's checkpoint references the teacher instead of containing it.
    student = torch.load(out / "student_kd" / "model.pt", weights_only=True)
    assert student["teacher"]["sha256"] and not any(k.startswith("teacher") for k in student["model"])
    printed = demo_run.printed  # the evaluate stage's tables are results: on stdout
    assert "difference to student_alone" in printed
    assert "for comparison with published numbers only" in printed


def test_missing_data_root_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status = main(["validate", str(ROOT / "recipes" / "kdfas.yaml")])
    assert status == 2
    err = capsys.readouterr().err
    assert "data.root" in err and "Traceback" not in err


@pytest.mark.parametrize(
    ("broken", "message"),
    [
        ("test/fake", "the 'test' split of {root} holds only bona fide (label 1) frames"),
        ("val", "the 'dev' split of {root} has no frames"),
    ],
)
def test_a_one_class_or_empty_split_is_refused_before_any_work(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], broken: str, message: str
) -> None:
    root = make_folder(tmp_path / "data")
    shutil.rmtree(root / broken)
    meta = root / "meta.csv"
    meta.write_text("".join(line for line in meta.read_text().splitlines(True) if f"{broken}/" not in line))
    args = [a.replace(str(tmp_path / "synth"), str(root)) for a in _tiny_demo_args(tmp_path)]
    assert main(["run", str(DEMO), "--out", str(tmp_path / "run"), *args]) == 2
    err = capsys.readouterr().err
    assert message.format(root=root) in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()  # found by the checks, before training started


def test_fas_command_group_is_wired_into_kdkit(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "synth"
    assert (
        main(["fas", "synth", "--out", str(out), "--n-subjects", "3", "--frames", "1", "--size", "16"]) == 0
    )
    assert (out / "meta.csv").is_file()
    assert main(["fas", "metrics", "--scores", str(tmp_path / "missing.csv")]) == 2
    assert "missing.csv" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["fas", "--help"])
    assert exit_info.value.code == 0
    usage = capsys.readouterr().out
    assert all(name in usage for name in ("synth", "prepare", "metrics"))


def test_the_pinned_opencv_ships_a_working_face_detector() -> None:
    import cv2
    from kdkit_fas.faces import HaarDetector, make_detector

    detector = make_detector("haar")
    assert isinstance(detector, HaarDetector), f"OpenCV {cv2.__version__} ships no Haar cascade"
    blank = np.full((120, 160, 3), 128, np.uint8)
    assert detector(blank) is None  # no face in a flat grey frame: reported, not invented


def test_species_apcer_on_an_oulu_fixture_prepared_by_kdkit(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The issue's case end to end: attack types written by `kdkit fas prepare`; half of the
    printer-1 attacks pass, no printer-2 one does. The evaluator and `kdkit fas metrics` both report
    print APCER 25 % (species), with printer 1 at 50 % beside it."""
    from fixtures import make_oulu
    from kdkit_fas.data import frames_from_manifest
    from kdkit_fas.prepare import prepare

    prepare(
        "oulu",
        make_oulu(tmp_path / "raw"),
        tmp_path / "p1",
        protocol=1,
        frames_per_video=2,
        size=16,
        workers=1,
        progress=False,
    )
    splits = {split: frames_from_manifest(tmp_path / "p1", split) for split in ("dev", "test")}
    print1 = sorted({r["video"] for r in splits["test"] if r["attack_type"] == "print/1"})
    assert len(print1) == 4 and {r["attack_type"] for r in splits["test"]} == {
        "live",
        "print/1",
        "print/2",
        "replay/1",
        "replay/2",
    }

    def predictions(rows: list[dict], accepted: set[str]) -> Predictions:
        live = [r["label"] == 1 or r["video"] in accepted for r in rows]
        logits = torch.tensor([[0.0, 3.0 if ok else -3.0] for ok in live])
        return Predictions(logits, torch.tensor([r["label"] for r in rows]), _Meta(rows))

    preds = {"val": predictions(splits["dev"], set()), "test": predictions(splits["test"], set(print1[:2]))}
    metrics = FasEvaluator()(preds, tmp_path / "eval")
    assert metrics["test/apcer"] == 0.25 and metrics["test/apcer_species.print"] == 0.25
    assert metrics["test/apcer_instrument.print/1"] == 0.5 and metrics["test/apcer_instrument.print/2"] == 0.0
    assert metrics["test/acer"] == 0.125 and metrics["test/bpcer"] == 0.0

    parser = argparse.ArgumentParser()
    metrics_cli.add_arguments(parser)
    csvs = [str(tmp_path / "eval" / f"scores_{s}.csv") for s in ("test", "val")]
    assert metrics_cli.run(parser.parse_args(["--scores", csvs[0], "--dev", csvs[1], "--json"])) == 0
    video = json.loads(capsys.readouterr().out)["video"]
    assert video["apcer"] == 0.25 and video["apcer_per_species"] == {"print": 0.25, "replay": 0.0}
    assert video["apcer_per_instrument"]["print/1"] == 0.5
