"""The bad-input matrix: every mistake a user can make in a recipe or a file gets exit status 2,
a message naming the culprit, no Python traceback, and nothing written before is lost."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from conftest import folder_contents, tiny_recipe_dict, tiny_vit

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
    (
        "block beyond depth",
        lambda d: d["distill"].update(pairs=[[1, 9]]),
        ["distill.pairs[0]", "block 9", "depth 2"],
    ),
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
    # --- what `run` used to crash on with a traceback after `validate` had passed (issue 15)
    ("unknown optimizer", lambda d: d["train"].update(optimizer="adamww"), ["train.optimizer", "'adamw'"]),
    ("unknown scheduler", lambda d: d["train"].update(scheduler="cosin"), ["train.scheduler", "cosine"]),
    (
        "a stage's own unknown optimizer",
        lambda d: d["pipeline"][0].update(train={"optimizer": "sgdd"}),
        ["pipeline.teacher.train.optimizer", "'sgdd'"],
    ),
    ("negative loader workers", lambda d: d["data"].update(num_workers=-1), ["data.num_workers", "-1"]),
    ("zero eval batch", lambda d: d["data"].update(eval_batch_size=0), ["data.eval_batch_size", "positive"]),
    (
        "evaluator for 2 classes on a 10-class model",
        lambda d: d.update(evaluator="fas", plugins=["fas"]),
        ["models.teacher", "10 classes", "'fas' scores 2", "num_classes: 2"],
    ),
    (
        "width not divisible by heads",
        _student(embed_dim=30, num_heads=4),
        ["models.student.options", "divisible by num_heads", "'embed_dim': 30"],
    ),
    ("zero heads", _student(num_heads=0), ["models.student.options", "'num_heads': 0", "positive"]),
    ("zero depth", _student(depth=0), ["has no blocks", "depth 0"]),
    (
        "batch of one with covariance",
        lambda d: d["data"].update(batch_size=1),
        ["distill.adapter", "'covariance'", "at least 2 samples", "batch_size is 1"],
    ),
    (
        "batch of one with gram",
        lambda d: (d["data"].update(batch_size=1), d["distill"].update(adapter="gram")),
        ["'gram'", "at least 2 samples"],
    ),
    ("recipe name escaping runs/", lambda d: d.update(name="../../x"), ["name: '../../x'", "folder name"]),
    (
        "stage name with a separator",
        lambda d: d["pipeline"][0].update(name="a/b"),
        ["pipeline[0].name: 'a/b'", "no path separators"],
    ),
    ("hidden-file recipe name", lambda d: d.update(name=".x"), ["name: '.x'", "not starting with '.'"]),
    ("negative weight decay", lambda d: d["train"].update(weight_decay=-1), ["train.weight_decay", ">= 0"]),
    (
        "label smoothing of 1.5",
        lambda d: d["train"].update(label_smoothing=1.5),
        ["label_smoothing", "[0, 1)"],
    ),
    ("negative gradient clip", lambda d: d["train"].update(clip_grad=-1), ["train.clip_grad", "positive"]),
    ("zero steps per epoch", lambda d: d["train"].update(max_steps_per_epoch=0), ["max_steps_per_epoch"]),
    ("zero epochs", lambda d: d["train"].update(epochs=0), ["train.epochs", "at least 1"]),
    ("negative warmup", lambda d: d["train"].update(warmup_epochs=-1), ["train.warmup_epochs", ">= 0"]),
    ("fp16 on the CPU", lambda d: d["train"].update(amp="fp16"), ["train.amp", "fp16 needs a CUDA device"]),
    (
        "cuda without a GPU",
        lambda d: d["train"].update(device="cuda"),
        ["train.device", "CUDA is not available"],
    ),
    (
        "three means for one channel",
        lambda d: d["data"].update(mean=[0.5] * 3, std=[0.5] * 3),
        ["data.mean", "1 channel"],
    ),
    ("std of another length", lambda d: d["data"].update(std=[0.5, 0.5]), ["data.std", "as many"]),
    ("zero aug_cycle", lambda d: d["data"].update(aug_cycle=0), ["data.aug_cycle", "at least 1"]),
    (
        "unknown data option",
        lambda d: d["data"].update(options={"fraction": 0.5}),
        ["data.options", "fraction"],
    ),
    (
        "unknown adapter option",
        lambda d: d["distill"].update(adapter_options={"epsilon": 1}),
        ["epsilon", "eps"],
    ),
    (
        "unknown evaluator option",
        lambda d: d.update(evaluator_options={"level": "video"}),
        ["evaluator_options", "level"],
    ),
    ("unknown evaluator", lambda d: d.update(evaluator="clasification"), ["evaluator", "'classification'"]),
    ("unknown teacher dtype", lambda d: d["distill"].update(teacher_dtype="int8"), ["teacher_dtype", "int8"]),
    ("unknown criterion", lambda d: d["distill"].update(criterion="l1"), ["distill.criterion", "smooth_l1"]),
    ("unknown tap point", lambda d: d["distill"].update(point="ffn"), ["'ffn'", "block, attn, mlp"]),
    ("unknown token selector", lambda d: d["distill"].update(select="first"), ["'first'", "cls"]),
    ("uniform:0 pairs", lambda d: d["distill"].update(pairs="uniform:0"), ["distill.pairs", "uniform:0"]),
    ("block 0", lambda d: d["distill"].update(pairs=[[0, 1]]), ["distill.pairs[0]", "block 0", "1-based"]),
    ("unknown split", lambda d: d["pipeline"][-1].update(split="tset"), ["'tset'", "'test'"]),
    (
        "teacher is a later stage",
        lambda d: d["distill"].update(teacher="student_alone"),
        ["distill.teacher", "'student_alone'"],
    ),
    (
        "evaluate an unknown run",
        lambda d: d["pipeline"][-1].update(runs=["teacher", "studnet_kd"]),
        ["'studnet_kd'", "Did you mean 'student_kd'"],
    ),
    (
        "baseline outside the runs",
        lambda d: d["pipeline"][-1].update(baseline="nobody"),
        ["baseline", "'nobody'"],
    ),
    (
        "duplicate stage names",
        lambda d: d["pipeline"][1].update(name="teacher"),
        ["'teacher'", "more than once"],
    ),
    ("empty pipeline", lambda d: d.update(pipeline=[]), ["pipeline", "at least one stage"]),
    (
        "missing plugin",
        lambda d: d.update(plugins=["fas", "nonexistent"]),
        ["'nonexistent'", "not installed"],
    ),
    ("negative cache size", lambda d: d["distill"].update(cache_max_gb=-1), ["cache_max_gb", "positive"]),
    # --- what `run` met only at a distill stage's first step, after training the stages before it
    # (issue 26): each stage's data, models and a training step are now dry-run before any work
    (
        "at on class tokens",
        lambda d: d["distill"].update(adapter="raw", criterion="at", select="cls"),
        ["pipeline.student_kd.distill.pairs[0]", "criterion 'at'", "(2, 32) and (2, 48)", "select: tokens"],
    ),
    (
        "at on a gram adapter's matrices",
        lambda d: d["distill"].update(adapter="gram", criterion="at"),
        ["pipeline.student_kd.distill.pairs[0]", "criterion 'at'", "adapter 'gram'", "(2, 2)"],
    ),
    (
        "at on one pair's class tokens",
        lambda d: d["distill"].update(
            pairs=[[1, 1], {"student": 2, "teacher": 2, "adapter": "raw", "criterion": "at"}]
        ),
        ["pipeline.student_kd.distill.pairs[1]", "criterion 'at'", "blocks.1 [cls]"],
    ),
    (
        "at across token counts",
        lambda d: (
            d["distill"].update(adapter="raw", criterion="at", select="tokens"),
            _student(patch_size=2)(d),
        ),
        ["pipeline.student_kd.distill.pairs[0]", "token counts N differ", "(2, 65, 32)", "(2, 17, 48)"],
    ),
    (
        "unknown unlabelled pool data set",
        lambda d: d["data"].update(labeled_fraction=0.5, unlabeled={"dataset": "digitz"}),
        ["data.unlabeled", "'digitz'", "Did you mean 'digits'"],
    ),
    (
        "unlabelled pool of an unknown split",
        lambda d: d["data"].update(labeled_fraction=0.5, unlabeled={"dataset": "digits", "split": "trainn"}),
        ["data.unlabeled", "'trainn'"],
    ),
    (
        "unlabelled pool with an unknown option",
        lambda d: d["data"].update(
            labeled_fraction=0.5, unlabeled={"dataset": "digits", "options": {"x": 1}}
        ),
        ["data.unlabeled", "['x']", "split_seed"],
    ),
    (
        "adapter option of another adapter",
        lambda d: d["distill"].update(adapter="projection", adapter_options={"detach_covariance": False}),
        [
            "distill.adapter_options",
            "adapter 'projection' got unknown options ['detach_covariance']",
            "--set distill.adapter_options={}",
        ],
    ),
    (
        "a pair's adapter option of another adapter",
        lambda d: d["distill"].update(
            pairs=[{"student": 1, "teacher": 1, "adapter": "projection", "adapter_options": {"p": 1}}]
        ),
        ["pipeline.student_kd.distill.pairs[0].adapter_options", "['p']", "remove them from the pair"],
    ),
    (
        "adapter eps that is a string",
        lambda d: d["distill"].update(adapter="cka", adapter_options={"eps": "tiny"}),
        ["distill.adapter_options", "adapter 'cka'", "eps", "'tiny'"],
    ),
    (
        "adapter flag that is a string",
        lambda d: d["distill"].update(adapter_options={"detach_covariance": "no"}),
        ["distill.adapter_options", "detach_covariance", "true or false", "'no'"],
    ),
    (
        "teacher input not a multiple of the patch",
        lambda d: d["distill"].update(teacher_input={"size": 33}),
        ["distill.teacher_input.size", "33", "patch size 4"],
    ),
    (
        "teacher input beside the teacher's built size",
        lambda d: d["distill"].update(teacher_input={"size": 64}),
        ["distill.teacher_input.size", "64", "built for 16 px"],
    ),
    (
        "teacher input of 100000 px",
        lambda d: d["distill"].update(teacher_input={"size": 100000}),
        ["distill.teacher_input.size", "100000", "4096"],
    ),
]


@pytest.mark.parametrize("change, words", [c[1:] for c in RECIPE_CASES], ids=[c[0] for c in RECIPE_CASES])
def test_bad_recipe(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], change: Any, words: list[str]
) -> None:
    out = tmp_path / "run"
    assert main(["run", str(_write(tmp_path, _edit(change))), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "bad.yaml" in err  # the file is named, whichever check found it
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
    assert (
        "models.teacher.weights" in err
        and "notes.pth" in err
        and "not a PyTorch checkpoint" in err
        and "Traceback" not in err
    )


def test_bad_input_never_destroys_an_earlier_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    out.mkdir()
    (out / "recipe.yaml").write_text("name: earlier\n")
    (out / "summary.json").write_text('{"kept": true}')
    data = _edit(lambda d: d["train"].update(lr="fast"))
    assert main(["run", str(_write(tmp_path, data)), "--out", str(out)]) == 2
    assert (out / "summary.json").read_text() == '{"kept": true}'


# ------------------------------------------------------------------------------------ commands
def _teacher_only(steps: int) -> dict[str, Any]:
    """The tiny recipe cut to one train stage of one epoch of `steps` steps."""
    data = tiny_recipe_dict()
    data["pipeline"] = [{"name": "teacher", "do": "train", "model": "teacher"}]
    data["train"].update(epochs=1, max_steps_per_epoch=steps)
    return data


@pytest.fixture
def trained(tiny_run: Path) -> Path:
    """The shared finished tiny run: the checkpoints every command case must leave intact."""
    return tiny_run / "run"


def _bomb(tmp: Path) -> list[str]:
    """A 'billion laughs' document: 9 levels of 9 aliases expand to 387 million strings."""
    lines = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 9)]
    (tmp / "bomb.yaml").write_text("\n".join([*lines, "name: *a8", ""]))
    return ["validate", str(tmp / "bomb.yaml")]


def _recipe_file(tmp: Path, text: str | bytes) -> Path:
    path = tmp / "file.yaml"
    path.write_bytes(text.encode() if isinstance(text, str) else text)
    return path


def _tiny(tmp: Path, change: Any = lambda d: None) -> str:
    return str(_write(tmp, _edit(change)))


# (case id, argv from (tmp folder, finished run), words the message must contain); all exit 2
COMMAND_CASES = [
    (
        "taps zero image size",
        lambda t, r: ["taps", "vit_tiny_patch16_224", "--img-size", "0"],
        ["--img-size", "0"],
    ),
    ("taps zero channels", lambda t, r: ["taps", "vit_tiny_patch16_224", "--in-chans", "0"], ["--in-chans"]),
    (
        "taps unknown model",
        lambda t, r: ["taps", "vit_tinny_patch16_224"],
        ["vit_tinny_patch16_224", "Close names"],
    ),
    (
        "taps option without a value",
        lambda t, r: ["taps", "vit_tiny_patch16_224", "--option", "depth"],
        ["--option 'depth'", "KEY=VALUE"],
    ),
    (
        "taps option that cannot build",
        lambda t, r: ["taps", "vit_tiny_patch16_224", "--option", "num_heads=0"],
        ["num_heads", "positive"],
    ),
    (
        "export of a text file",
        lambda t, r: ["export", str(_recipe_file(t, "notes")), "--out", str(t / "m.onnx")],
        ["file.yaml", "not a PyTorch checkpoint", "b'notes'"],
    ),
    (
        "export torchscript to .onnx",
        lambda t, r: [
            "export",
            str(r / "teacher/model.pt"),
            "--format",
            "torchscript",
            "--out",
            str(t / "m.onnx"),
        ],
        ["--out", "m.onnx", "torchscript files end in .pt"],
    ),
    (
        "export onnx to .pt",
        lambda t, r: ["export", str(r / "teacher/model.pt"), "--out", str(t / "m.pt")],
        ["onnx files end in .onnx", "'.pt'"],
    ),
    (
        "export onto the checkpoint itself",
        lambda t, r: [
            "export",
            str(r / "teacher/model.pt"),
            "--format",
            "torchscript",
            "--out",
            str(r / "teacher/model.pt"),
        ],
        ["is the checkpoint being exported"],
    ),
    (
        "export of resume state",
        lambda t, r: ["export", str(r / "teacher/last.pt"), "--out", str(t / "m.onnx")],
        ["last.pt", "not a kdkit model checkpoint"],
    ),
    ("eval of a missing file", lambda t, r: ["eval", str(t / "none.pt")], ["none.pt", "not found"]),
    (
        "eval at another image size",
        lambda t, r: ["eval", str(r / "teacher/model.pt"), "--set", "data.image_size=32"],
        ["data.image_size", "32", "16"],
    ),
    (
        "resume where no run is",
        lambda t, r: ["run", _tiny(t), "--out", str(t / "empty"), "--resume"],
        ["--resume", "holds no run"],
    ),
    ("run into an earlier run", lambda t, r: ["run", _tiny(t), "--out", str(r)], ["already holds a run"]),
    ("YAML alias bomb", lambda t, r: _bomb(t), ["bomb.yaml", "anchors and aliases"]),
    (
        "recipe file not found",
        lambda t, r: ["validate", str(t / "nope.yaml")],
        ["file not found", "nope.yaml"],
    ),
    (
        "recipe that is a list",
        lambda t, r: ["validate", str(_recipe_file(t, "- a\n- b\n"))],
        ["mapping", "list"],
    ),
    (
        "recipe that is not UTF-8",
        lambda t, r: ["validate", str(_recipe_file(t, "name: caf\xe9\n".encode("latin-1")))],
        ["file.yaml", "cannot read"],
    ),
    ("--set without =", lambda t, r: ["validate", _tiny(t), "--set", "train.lr"], ["train.lr", "KEY=VALUE"]),
    (
        "--set beyond a list",
        lambda t, r: ["validate", _tiny(t), "--set", "pipeline.9.train.epochs=1"],
        ["pipeline.9", "index out of range"],
    ),
    (
        "--set of an unknown stage",
        lambda t, r: ["validate", _tiny(t), "--set", "pipeline.techer.train.epochs=1"],
        ["'techer'", "Did you mean 'teacher'"],
    ),
    (
        "teacher cache under a file",
        lambda t, r: [
            "validate",
            _tiny(t, lambda d: d["distill"].update(cache_dir=str(t / "bad.yaml" / "c"))),
        ],
        ["distill.cache_dir", "is a file, not a directory", "distill.cache: false"],
    ),
]


@pytest.mark.parametrize("argv, words", [c[1:] for c in COMMAND_CASES], ids=[c[0] for c in COMMAND_CASES])
def test_bad_command(
    tmp_path: Path, trained: Path, capsys: pytest.CaptureFixture[str], argv: Any, words: list[str]
) -> None:
    before = folder_contents(trained)
    assert main(argv(tmp_path, trained)) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err) < 4000
    for word in words:
        assert word in err, f"{word!r} not in:\n{err}"
    assert folder_contents(trained) == before  # nothing lost
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp")]  # nothing half-written


def test_a_thousand_bad_keys_give_a_bounded_message(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = _edit(lambda d: d["train"].update({f"typo{i}": i for i in range(1000)}))
    data["name"] = "x" * 5000
    assert main(["validate", str(_write(tmp_path, data))]) == 2
    err = capsys.readouterr().err
    assert "train.typo0" in err and "more problems" in err and len(err) < 20_000


def test_a_full_disk_names_the_file_it_could_not_write(
    tiny_recipe: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A failed write or fsync raises an OSError without a file name; the message must still say
    which file (here recipe.yaml, the first file a run writes)."""
    import os

    def full(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    assert main(["run", str(tiny_recipe), "--out", str(tmp_path / "run")]) == 1
    err = capsys.readouterr().err
    assert "No space left on device" in err and "recipe.yaml" in err and "Traceback" not in err
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp")]


def test_predict_names_each_input_it_cannot_read_and_exits_1(
    tmp_path: Path, trained: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`predict` scores what it can; an unreadable input is named and makes the exit status 1."""
    (tmp_path / "notes.png").write_text("not an image")
    argv = [
        "predict",
        str(trained / "teacher/model.pt"),
        str(tmp_path / "missing.png"),
        str(tmp_path / "notes.png"),
    ]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "missing.png: no such file" in err and "notes.png" in err and "Traceback" not in err


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_outputs_honour_the_umask(tmp_path: Path, umask: int) -> None:
    """Every file and folder a run and an export create gets the mode the umask allows (files were
    0600 and folders 0700 whatever the umask, so a team's shared results folder was unreadable)."""
    import os

    previous = os.umask(umask)
    try:
        assert (
            main(["run", str(_write(tmp_path, _teacher_only(steps=1))), "--out", str(tmp_path / "run")]) == 0
        )
        model = tmp_path / "run" / "teacher" / "model.pt"
        assert main(["export", str(model), "--format", "torchscript", "--out", str(tmp_path / "m.pt")]) == 0
    finally:
        os.umask(previous)
    made = [p for p in (tmp_path / "run").rglob("*") if "tensorboard" not in p.parts] + [tmp_path / "m.pt"]
    modes = {p.relative_to(tmp_path): p.stat().st_mode & 0o777 for p in made}
    expected = {p.relative_to(tmp_path): (0o777 if p.is_dir() else 0o666) & ~umask for p in made}
    assert modes == expected
