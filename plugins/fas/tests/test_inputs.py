"""FAS inputs as real tools write them: images of every mode, CSV files saved by spreadsheet programs,
manifests naming missing files, and data generated only by the commands that create data for a run."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from fixtures import make_folder, write_image
from kdkit_fas import metrics_cli
from kdkit_fas.data import FrameDataset, frames_from_folder, frames_from_manifest
from kdkit_fas.layouts import _oulu_entries
from kdkit_fas.prepare import MANIFEST_COLUMNS, _read_image
from kdkit_fas.synth import generate
from PIL import Image

from kdkit.cli import main
from kdkit.data.datasets import DataError

ROOT = Path(__file__).resolve().parents[3]


def _spreadsheet(lines: list[list[str]], delimiter: str = ";") -> bytes:
    """Rows as Excel saves "CSV UTF-8" in a decimal-comma locale: BOM, `;`, CRLF, quoted cells with
    spaces, padded header names and the empty rows left below the data."""
    rows = [[f'"{cell}"' if " " in cell else cell for cell in row] for row in lines]
    rows[0] = [f" {name.upper()} " for name in lines[0]]
    text = "\r\n".join(delimiter.join(row) for row in rows) + "\r\n" + delimiter * (len(rows[0]) - 1) + "\r\n"
    return b"\xef\xbb\xbf" + text.encode()


# ------------------------------------------------------------------------------------- images
def test_frames_of_every_mode_reach_training_as_their_colours(tmp_path: Path) -> None:
    values = (np.arange(64, dtype=np.uint32) * 1040).clip(0, 65535).astype(np.uint16).reshape(8, 8)
    Image.fromarray(values).save(tmp_path / "g16.png")  # 16-bit grey
    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(tmp_path / "red.jpg", quality=95)
    Image.new("RGBA", (8, 8), (250, 250, 250, 0)).save(tmp_path / "clear.png")  # fully transparent
    records = [
        {"path": name, "video": name, "subject": "s", "label": "1", "attack_type": "live"}
        for name in ("g16.png", "red.jpg", "clear.png")
    ]
    dataset = FrameDataset(records, tmp_path, image_size=8, mean=(0, 0, 0), std=(1, 1, 1))
    grey, red, clear = (dataset[i][0] for i in range(3))
    assert torch_close(grey[0] * 255, np.rint(values / 257)) and grey.min() == 0 and grey.max() == 1
    assert (red[0] > 0.94).all() and (red[1:] < 0.06).all()
    assert (clear == 0).all()  # composited onto black, as kdkit.data.images documents


def torch_close(tensor: object, array: np.ndarray) -> bool:
    """A (H, W) tensor equals an array to within float rounding."""
    return bool(np.abs(np.asarray(tensor) - array).max() < 1e-3)


def test_prepare_reads_image_sets_through_the_same_reader(tmp_path: Path) -> None:
    Image.new("RGBA", (4, 4), (10, 20, 250, 0)).save(tmp_path / "clear.png")
    Image.new("I;16", (4, 4), 65535).save(tmp_path / "white16.png")
    assert (_read_image(tmp_path / "clear.png") == 0).all()  # OpenCV dropped alpha: (250, 20, 10)
    assert (_read_image(tmp_path / "white16.png") == 255).all()


# ---------------------------------------------------------------------------------- CSV files
def _prepared(root: Path, n: int = 4) -> list[list[str]]:
    """Frames under root/frames and the manifest rows of `kdkit fas prepare` naming them."""
    rows = [list(MANIFEST_COLUMNS)]
    for i in range(n):
        split, label = ("train", "dev")[i % 2], str(i // 2 % 2)
        path = f"frames/{split}/video {i}/0.png"
        write_image(root / path)
        rows.append([path, f"video {i}", f"s{i}", label, "live" if label == "1" else "print/1", split])
    return rows


def test_a_manifest_saved_by_a_spreadsheet_reads_like_the_original(tmp_path: Path) -> None:
    plain, excel = tmp_path / "plain", tmp_path / "excel"
    rows = _prepared(plain, n=8)
    _prepared(excel, n=8)
    (plain / "manifest.csv").write_text("\n".join(",".join(row) for row in rows) + "\n")
    (excel / "manifest.csv").write_bytes(_spreadsheet(rows))
    for split in ("train", "dev"):
        want = frames_from_manifest(plain, split)
        assert len(want) == 4 and frames_from_manifest(excel, split) == want


def test_manifest_rows_naming_missing_files_are_found_when_the_data_set_is_built(tmp_path: Path) -> None:
    rows = _prepared(tmp_path, n=16)
    (tmp_path / "manifest.csv").write_text("\n".join(",".join(row) for row in rows) + "\n")
    for row in rows[1:15]:  # 7 train and 7 dev rows lose their file
        (tmp_path / row[0]).unlink()
    with pytest.raises(DataError) as info:
        frames_from_manifest(tmp_path, "train")
    message = str(info.value)
    assert message.startswith(f"{tmp_path / 'manifest.csv'}: 7 row(s) of the 'train' split")
    assert "line 2: frames/train/video 0/0.png; line 4: frames/train/video 2/0.png" in message
    assert "line 10: frames/train/video 8/0.png; and 2 more" in message and "video 10" not in message
    assert "dev/" not in message  # each split reports its own rows


def test_validate_refuses_a_manifest_with_missing_frames(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    data = tmp_path / "prepared"
    rows = _prepared(data, n=8)
    (data / "manifest.csv").write_text("\n".join(",".join(row) for row in rows) + "\n")
    (data / rows[7][0]).unlink()
    recipe = _tiny_recipe(tmp_path, data, dataset="fas_manifest")
    assert main(["validate", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert (
        "manifest.csv: 1 row(s) of the 'train' split" in err and "line 8: frames/train/video 6/0.png" in err
    )
    assert "Traceback" not in err


def test_a_meta_csv_saved_by_a_spreadsheet_still_supplies_the_attack_types(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "data", frames=1)
    want = frames_from_folder(root, "train")
    assert {r["attack_type"] for r in want} == {"live", "print", "replay"}
    meta = [line.split(",") for line in (root / "meta.csv").read_text().splitlines()]
    (root / "meta.csv").write_bytes(_spreadsheet(meta))
    assert frames_from_folder(root, "train") == want


def test_synth_reuses_a_set_whose_meta_csv_a_spreadsheet_saved(tmp_path: Path) -> None:
    out = tmp_path / "synth"
    generate(out, **SYNTH, progress=False)
    meta = [line.split(",") for line in (out / "meta.csv").read_text().splitlines()]
    (out / "meta.csv").write_bytes(_spreadsheet(meta))
    assert generate(out, **SYNTH, progress=False).reused


def test_a_protocol_list_saved_by_a_spreadsheet_lists_the_same_videos(tmp_path: Path) -> None:
    plain, excel = tmp_path / "Train.txt", tmp_path / "Train-excel.txt"
    plain.write_text("+1,1_1_01_1\n-1,1_1_01_2\n-2,1_1_01_4\n")
    excel.write_bytes(b'\xef\xbb\xbf"+1";"1_1_01_1"\r\n-1 ; 1_1_01_2\r\n\r\n-2;1_1_01_4;\r\n;\r\n')
    assert _oulu_entries(excel) == _oulu_entries(plain) == ["1_1_01_1", "1_1_01_2", "1_1_01_4"]


def test_fas_metrics_reads_a_score_file_saved_by_a_spreadsheet(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rng = np.random.default_rng(0)
    rows = [["score", "label", "attack_type", "video"]]
    for i in range(40):
        label = i % 2
        score = rng.uniform(0.3, 1.0) if label else rng.uniform(0.0, 0.7)
        rows.append([f"{score:.6f}", str(label), "live" if label else "print glossy", f"v{i // 4}_{label}"])
    plain, excel = tmp_path / "plain.csv", tmp_path / "excel.csv"
    plain.write_text("\n".join(",".join(row) for row in rows) + "\n")
    decimal_comma = [rows[0]] + [[row[0].replace(".", ","), *row[1:]] for row in rows[1:]]
    excel.write_bytes(_spreadsheet(decimal_comma))
    parser = argparse.ArgumentParser()
    metrics_cli.add_arguments(parser)
    results = []
    for path in (plain, excel):
        assert metrics_cli.run(parser.parse_args(["--scores", str(path), "--json", "--draws", "0"])) == 0
        results.append(json.loads(capsys.readouterr().out))
    assert results[1] == results[0] and results[0]["video"]["n_attack"] == 10


# ----------------------------------------------------------------- data generation and info
SYNTH = {"n_subjects": 3, "dev_subjects": 1, "test_subjects": 1, "frames": 1, "size": 16, "seed": 0}


def _tiny_recipe(tmp_path: Path, root: Path | None, dataset: str = "fas_folder") -> Path:
    """A one-stage FAS recipe with a tiny ViT; fas_folder data is generated (options.synth)."""
    recipe = {
        "name": "tiny-fas",
        "seed": 0,
        "plugins": ["fas"],
        "data": {
            "dataset": dataset,
            "root": None if root is None else str(root),
            "image_size": 16,
            "batch_size": 8,
            "options": {"synth": SYNTH} if dataset == "fas_folder" else {},
        },
        "models": {
            "student": {
                "name": "vit_tiny_patch16_224",
                "options": {
                    "img_size": 16,
                    "patch_size": 8,
                    "num_classes": 2,
                    "embed_dim": 16,
                    "depth": 1,
                    "num_heads": 2,
                },
            }
        },
        "train": {"epochs": 1, "max_steps_per_epoch": 1, "warmup_epochs": 0, "device": "cpu"},
        "evaluator": "fas",
        "pipeline": [{"name": "student", "do": "train", "model": "student"}],
    }
    path = tmp_path / "tiny-fas.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def test_only_the_commands_that_create_data_generate_it(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    data = tmp_path / "synth"
    recipe = _tiny_recipe(tmp_path, data)
    # info needs only the models and the input shape: no data set is built, nothing is generated.
    assert main(["info", str(recipe), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["student"]["params_M"] > 0
    assert not data.exists()
    # validate checks the data run reads, so it generates the set the recipe asks for (as run would).
    assert main(["validate", str(recipe)]) == 0 and (data / "meta.csv").is_file()
    run = tmp_path / "run"
    assert main(["run", str(recipe), "--out", str(run)]) == 0
    capsys.readouterr()
    # eval with a mistyped root: refused by name, nothing generated or written.
    typo = tmp_path / "synht"
    checkpoint = run / "student" / "model.pt"
    assert main(["eval", str(checkpoint), "--set", f"data.root={typo}"]) == 2
    err = capsys.readouterr().err
    assert f"data.root: {typo} does not exist" in err and "Traceback" not in err
    assert not typo.exists() and not (run / "student" / "eval-test").exists()


def test_info_on_the_paper_recipe_needs_no_prepared_data(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    shrink = "{num_classes: 2, depth: 1, embed_dim: 32, num_heads: 2}"  # the layout of kdfas.yaml, tiny
    args = ["--set", f"models.teacher.options={shrink}", "--set", f"models.student.options={shrink}"]
    assert main(["info", str(ROOT / "recipes" / "kdfas.yaml"), "--json", *args]) == 0  # data.root: null
    rows = json.loads(capsys.readouterr().out)
    assert set(rows) == {"teacher", "student"} and rows["teacher"]["GFLOPs"] > 0
