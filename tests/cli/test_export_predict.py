"""`kdkit export`, `kdkit predict` and `kdkit eval` on a tiny digits model, called in-process."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from PIL import Image

from kdkit.cli import main
from kdkit.deploy import export
from kdkit.deploy.export import ExportError, verify_export
from kdkit.deploy.inputs import sample_indices
from kdkit.deploy.modelfile import checkpoint_metadata, load_checkpoint, open_model
from kdkit.deploy.predict import Predictor
from kdkit.evaluation.calibration import find_calibration, thresholds_in, write_calibration


@pytest.fixture(scope="module")
def checkpoint(tiny_run: Path) -> Path:
    """`RUN/teacher/model.pt` of the shared tiny digits run."""
    return tiny_run / "run" / "teacher" / "model.pt"


@pytest.fixture(scope="module")
def onnx_file(checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The checkpoint exported to ONNX once."""
    out = tmp_path_factory.mktemp("onnx") / "teacher.onnx"
    assert main(["export", str(checkpoint), "--format", "onnx", "--out", str(out)]) == 0
    return out


def _scores(network: torch.nn.Module, batch: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return torch.softmax(network(batch), dim=1)[:, 1].numpy()


def test_onnx_export_has_metadata_a_dynamic_batch_and_the_checkpoints_scores(
    checkpoint: Path, onnx_file: Path
) -> None:
    graph = onnx.load(str(onnx_file)).graph
    assert [o.name for o in graph.output] == ["logits", "score"]
    assert graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    assert {p.key for p in onnx.load(str(onnx_file)).metadata_props} >= {
        "image_size",
        "mean",
        "kdkit_version",
    }

    model = open_model(onnx_file)
    meta = model.metadata
    assert model.kind == "onnx"
    assert (meta["image_size"], meta["channels"], meta["color"]) == (16, 1, "L")
    assert (meta["mean"], meta["std"], meta["num_classes"]) == ([0.5], [0.5], 10)
    assert (meta["recipe"], meta["stage"], meta["dataset"]) == ("digits-kd", "teacher", "digits")
    assert meta["threshold"] is None and meta["thresholds"] == {}  # accuracy evaluator: no threshold
    network, _ = load_checkpoint(checkpoint)
    for n in (2, 7):  # other batch sizes than the export's verification used
        batch = torch.randn(n, 1, 16, 16, generator=torch.Generator().manual_seed(n))
        outputs = model.run(batch.numpy())
        assert outputs["logits"].shape == (n, 10)
        assert np.abs(outputs["score"] - _scores(network, batch)).max() < 1e-4


def test_torchscript_export_round_trips(checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "teacher.ts"
    assert main(["export", str(checkpoint), "--format", "torchscript", "--out", str(out)]) == 0
    model = open_model(out)
    network, ckpt = load_checkpoint(checkpoint)
    assert model.kind == "torchscript"
    assert model.metadata == checkpoint_metadata(checkpoint, network, ckpt)
    batch = torch.randn(5, 1, 16, 16)
    assert np.abs(model.run(batch.numpy())["score"] - _scores(network, batch)).max() < 1e-4


def _tamper(source: Path, target: Path) -> None:
    """Copy an ONNX export with the class-1 logit's bias shifted: its scores no longer match."""
    model = onnx.load(str(source))
    bias = next(i for i in model.graph.initializer if i.name.endswith("head.bias"))
    values = numpy_helper.to_array(bias).copy()
    values[1] += 3.0
    bias.CopyFrom(numpy_helper.from_array(values, bias.name))
    onnx.save(model, str(target))


def test_a_tampered_export_fails_verification(checkpoint: Path, onnx_file: Path, tmp_path: Path) -> None:
    network, ckpt = load_checkpoint(checkpoint)
    metadata = checkpoint_metadata(checkpoint, network, ckpt)
    assert verify_export(network, onnx_file, "onnx", metadata) < 1e-4
    tampered = tmp_path / "tampered.onnx"
    _tamper(onnx_file, tampered)
    with pytest.raises(ExportError, match="differ from the checkpoint's"):
        verify_export(network, tampered, "onnx", metadata)


def test_export_that_does_not_verify_exits_1_and_writes_nothing(
    checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    write = export.WRITERS["onnx"]

    def broken_writer(scored: torch.nn.Module, example: torch.Tensor, path: Path, metadata: dict) -> None:
        write(scored, example, path, metadata)
        _tamper(path, path)

    monkeypatch.setitem(export.WRITERS, "onnx", broken_writer)
    out = tmp_path / "out" / "model.onnx"
    assert main(["export", str(checkpoint), "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert f"{out}: export failed its check, nothing written: at batch size" in err and ".tmp" not in err
    assert os.listdir(out.parent) == []  # neither the export nor its temporary file


def _grey_images(folder: Path, n: int, size: int = 16) -> dict[Path, np.ndarray]:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    images = {folder / f"img{i}.png": rng.integers(0, 256, (size, size), dtype=np.uint8) for i in range(n)}
    for path, pixels in images.items():
        Image.fromarray(pixels).save(path)
    return images


def _json_lines(text: str) -> dict[str, dict]:
    return {row["path"]: row for row in map(json.loads, text.splitlines())}


def test_predict_scores_images_and_folders_and_reports_unreadable_inputs(
    checkpoint: Path, onnx_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    images = _grey_images(tmp_path / "digits", 3)
    (tmp_path / "digits" / "broken.png").write_text("not an image")
    missing = tmp_path / "missing.png"
    status = main(["predict", str(onnx_file), str(tmp_path / "digits"), str(missing), "--json"])
    captured = capsys.readouterr()
    assert status == 1
    rows = _json_lines(captured.out)
    assert len(rows) == 5
    for path in (tmp_path / "digits" / "broken.png", missing):
        assert rows[str(path)]["score"] is None and rows[str(path)]["error"]
        assert str(path) in captured.err

    # The preprocessing contract, by hand: [0, 1] pixels, normalised with mean 0.5 / std 0.5.
    network, _ = load_checkpoint(checkpoint)
    batch = torch.tensor(np.stack(list(images.values())), dtype=torch.float32).unsqueeze(1) / 255
    expected = torch.softmax(network((batch - 0.5) / 0.5), dim=1).detach()
    for (path, _), probs in zip(images.items(), expected, strict=True):
        row = rows[str(path)]
        assert row["frames"] == 1 and "error" not in row
        assert row["score"] == pytest.approx(probs[1].item(), abs=1e-4)
        assert row["decision"] == str(int(probs.argmax()))  # 10 classes: the most probable one
        assert row["threshold"] is None

    # The checkpoint itself gives the same scores, and a table without --json.
    assert main(["predict", str(checkpoint), *map(str, images)]) == 0
    assert "img2.png" in capsys.readouterr().out


def test_predict_samples_video_frames_evenly(onnx_file: Path, tmp_path: Path) -> None:
    cv2 = pytest.importorskip("cv2")
    path = tmp_path / "clip.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10, (16, 16))
    for i in range(10):
        writer.write(np.full((16, 16, 3), 20 * i, dtype=np.uint8))
    writer.release()
    result = Predictor(open_model(onnx_file), None, None, frames=3)(path)
    assert result.error is None and result.frames == 3
    assert sample_indices(10, 3) == [1, 5, 8] and sample_indices(2, 3) == [0, 1]


def test_predict_bad_arguments_exit_2(
    onnx_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    image = next(iter(_grey_images(tmp_path / "one", 1)))
    assert main(["predict", str(onnx_file), str(image), "--threshold", "0.5"]) == 2  # 10 classes
    assert "two-class" in capsys.readouterr().err
    assert main(["predict", str(onnx_file), str(image), "--preparer", "no_such"]) == 2
    assert "no_such" in capsys.readouterr().err
    assert main(["predict", str(tmp_path / "nothing.onnx"), str(image)]) == 2
    assert "nothing.onnx" in capsys.readouterr().err


def test_eval_rewrites_the_pipeline_metrics(
    checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = shutil.copytree(checkpoint.parent.parent, tmp_path / "run")  # eval writes beside the checkpoint
    checkpoint = run / "teacher" / "model.pt"
    assert main(["eval", str(checkpoint)]) == 0  # the recipe recorded in the checkpoint
    assert "results on test" in (printed := capsys.readouterr().out) and "accuracy ↑" in printed
    written = json.loads((checkpoint.parent / "eval-test" / "metrics.json").read_text())["metrics"]
    pipeline = json.loads((run / "summary.json").read_text())["test"]["results"]["teacher"]
    for nested in ("intervals", "resampling"):  # the same resamples: the same intervals
        assert written.pop(nested) == pipeline.pop(nested)
    assert written == pytest.approx(pipeline, abs=1e-6)

    out = tmp_path / "val-eval"
    assert (
        main(
            [
                "eval",
                str(checkpoint),
                "--recipe",
                str(run / "recipe.yaml"),
                "--split",
                "val",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    assert "val/accuracy" in json.loads((out / "metrics.json").read_text())["metrics"]
    assert main(["eval", str(checkpoint), "--set", "data.image_size=32", "--out", str(out)]) == 2
    assert "data.image_size" in capsys.readouterr().err


def test_calibration_is_written_and_found_for_a_checkpoint(tmp_path: Path) -> None:
    metrics = {"test/threshold": 0.4, "test/frame_threshold": 0.45, "test/hter": 0.1, "val/threshold": 0.9}
    assert thresholds_in(metrics, "test") == {"threshold": 0.4, "frame_threshold": 0.45}
    assert write_calibration(tmp_path, {"test/accuracy": 1.0}, "test") is None

    checkpoint = tmp_path / "run" / "student" / "model.pt"
    checkpoint.parent.mkdir(parents=True)
    assert find_calibration(checkpoint) is None
    # A run made before calibration files existed: the evaluate stage's results in summary.json.
    summary = {"test": {"do": "evaluate", "split": "test", "results": {"student": metrics}}}
    (tmp_path / "run" / "summary.json").write_text(json.dumps(summary))
    assert find_calibration(checkpoint).threshold == 0.4
    # The evaluate stage's calibration.json, then a newer `kdkit eval` one beside the checkpoint.
    stage_file = write_calibration(tmp_path / "run" / "test" / "student", metrics, "test")
    assert find_calibration(checkpoint).source == str(stage_file)
    newer = write_calibration(checkpoint.parent / "eval-test", {"test/threshold": 0.3}, "test")
    os.utime(newer, (stage_file.stat().st_mtime + 10,) * 2)
    found = find_calibration(checkpoint)
    assert (found.threshold, found.source) == (0.3, str(newer))
