"""The bad-input matrix: every mistake a user can make in a recipe or a file gets exit status 2,
a message naming the culprit, no Python traceback, and nothing written before is lost."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from conftest import tiny_recipe_dict, tiny_vit

from kdkit.cli import main


def _write(tmp_path: Path, data: dict[str, Any]) -> Path:
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _edit(change: Any) -> dict[str, Any]:
    data = tiny_recipe_dict()
    change(data)
    return data


def _teacher_options(**options: Any) -> Any:
    return lambda d: d["models"]["teacher"]["options"].update(options)


def _student(**options: Any) -> Any:
    return lambda d: d["models"]["student"]["options"].update(options)


# (case id, how to break the tiny digits recipe, words the error message must contain)
RECIPE_CASES = [
    ("misspelled key", lambda d: d.update(distil=d.pop("distill")), ["distil", "Did you mean 'distill'"]),
    ("unknown nested key", lambda d: d["train"].update(lrr=0.1), ["train.lrr", "Did you mean 'lr'"]),
    ("wrong type", lambda d: d["train"].update(lr="fast"), ["train.lr", "expected a number", "fast"]),
    ("missing required", lambda d: d.pop("models"), ["models", "missing required"]),
    ("alpha out of range", lambda d: d["distill"].update(alpha=1.5), ["alpha", "[0, 1]", "1.5"]),
    ("negative beta", lambda d: d["distill"].update(beta=-1), ["beta", ">= 0"]),
    ("zero temperature", lambda d: d["distill"].update(tau=0), ["tau", "positive"]),
    ("stage beyond depth", lambda d: d["distill"].update(stages=[[1, 9]]), ["stage index 9", "depth 2"]),
    ("identity between widths", lambda d: d["distill"].update(adapter="identity"), ["identity", "48", "32"]),
    (
        "classes differ",
        lambda d: d["models"]["student"]["options"].update(num_classes=3),
        ["classes", "10", "3"],
    ),
    (
        "image size not divisible by patch",
        lambda d: (
            d["data"].update(image_size=18),
            _teacher_options(img_size=18)(d),
            _student(img_size=18)(d),
        ),
        ["models.teacher", "image_size 18", "patch size 4"],
    ),
    (
        "model input size differs from data",
        _teacher_options(img_size=24),
        ["models.teacher", "(1, 16, 16)", "img_size"],
    ),
    ("unknown dataset", lambda d: d["data"].update(dataset="digitz"), ["digitz", "Did you mean 'digits'"]),
    (
        "unknown model",
        lambda d: d["models"]["student"].update(name="vit_tinny_patch16_224"),
        ["vit_tinny_patch16_224", "vit_tiny_patch16_224"],
    ),
    ("unknown adapter", lambda d: d["distill"].update(adapter="covariant"), ["covariant", "covariance"]),
    (
        "missing weights file",
        lambda d: d["models"]["teacher"].update(weights="/nonexistent/w.pth"),
        ["models.teacher.weights", "/nonexistent/w.pth"],
    ),
]


@pytest.mark.parametrize("change, words", [c[1:] for c in RECIPE_CASES], ids=[c[0] for c in RECIPE_CASES])
def test_bad_recipe(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], change: Any, words: list[str]
) -> None:
    out = tmp_path / "run"
    assert main(["run", str(_write(tmp_path, _edit(change))), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    for word in words:
        assert word in err, f"{word!r} not in:\n{err}"
    assert not out.exists()  # refused before any work started


def test_malformed_yaml_names_the_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("name: x\ndata:\n  dataset: digits\n   image_size: 16\n")
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert "line 4" in err and "Traceback" not in err


def test_checkpoint_of_another_architecture_lists_keys(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    weights = tmp_path / "other.pth"
    torch.save(tiny_vit(embed_dim=64, depth=3).state_dict(), weights)
    data = _edit(lambda d: d["models"]["teacher"].update(weights=str(weights)))
    assert main(["validate", str(_write(tmp_path, data))]) == 2
    err = capsys.readouterr().err
    assert "shape mismatch" in err and "blocks.0" in err and "Traceback" not in err


def test_file_that_is_not_a_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    weights = tmp_path / "notes.pth"
    weights.write_text("these are not weights")
    data = _edit(lambda d: d["models"]["teacher"].update(weights=str(weights)))
    assert main(["validate", str(_write(tmp_path, data))]) == 2
    err = capsys.readouterr().err
    assert "notes.pth" in err and "not a loadable checkpoint" in err and "Traceback" not in err


def test_bad_input_never_destroys_an_earlier_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    out.mkdir()
    (out / "recipe.yaml").write_text("name: earlier\n")
    (out / "summary.json").write_text('{"kept": true}')
    data = _edit(lambda d: d["train"].update(lr="fast"))
    assert main(["run", str(_write(tmp_path, data)), "--out", str(out)]) == 2
    assert (out / "summary.json").read_text() == '{"kept": true}'
