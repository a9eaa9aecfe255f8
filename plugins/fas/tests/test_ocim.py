"""Cross-domain protocols (`fas_domains`): split tables, a leave-one-out run end to end on fixture
trees of the four real layouts, per-domain metrics and where the threshold came from."""

from __future__ import annotations

import csv
import json
import shutil
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from fixtures import make_casia, make_msu, make_oulu, make_replay
from kdkit_fas.domains import PROTOCOLS, fas_domains, parse_protocol, split_sets
from kdkit_fas.evaluator import FasEvaluator
from kdkit_fas.metrics import ScoreSet, evaluate_scores
from kdkit_fas.prepare import prepare

from kdkit.cli import main
from kdkit.config.schema import DataSpec
from kdkit.data.datasets import DataError
from kdkit.evaluation.protocol import Predictions

RECIPE = Path(__file__).resolve().parents[3] / "recipes" / "kdfas-ocim.yaml"
LAYOUTS = {
    "O": (make_oulu, "oulu"),
    "C": (make_casia, "casia"),
    "I": (make_replay, "replay"),
    "M": (make_msu, "msu"),
}


def test_the_six_protocols_split_their_sets_by_the_ssdg_convention() -> None:
    table = {
        name: {split: split_sets(name, split) for split in ("train", "val", "test")} for name in PROTOCOLS
    }
    assert table["O_C_I_to_M"] == {
        "train": [("O", ("train", "test")), ("C", ("train", "test")), ("I", ("train", "test"))],
        "val": [("O", ("dev",)), ("I", ("dev",))],  # CASIA-FASD ships no dev split
        "test": [("M", ("train", "test"))],
    }
    assert table["O_C_M_to_I"]["val"] == [("O", ("dev",))]
    assert table["I_C_M_to_O"]["val"] == [("I", ("dev",))]
    assert table["O_M_I_to_C"]["test"] == [("C", ("train", "test"))]
    for name in ("M_I_to_C", "M_I_to_O"):  # limited source: two sets, Replay-Attack's devel is 'val'
        assert [s for s, _ in table[name]["train"]] == ["M", "I"] and table[name]["val"] == [("I", ("dev",))]
    for name, splits in table.items():  # every protocol has held-out source data; the target is never in it
        target = PROTOCOLS[name][1]
        assert splits["val"] and all(letter != target for letter, _ in splits["train"] + splits["val"])
    assert (
        parse_protocol("O&C&I->M")
        == parse_protocol("c&o&i→m")
        == parse_protocol("O_C_I_to_M")
        == "O_C_I_to_M"
    )
    with pytest.raises(DataError, match=r"data.options.protocol: unknown protocol 'O&C->M'; expected one of"):
        parse_protocol("O&C->M")


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The four fixture trees, each prepared with its default protocol (1 frame per video, 32 px)."""
    base = tmp_path_factory.mktemp("ocim")
    roots = {}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "MSU-MFSD: skipped")  # the fixture's unlisted subject 099
        for letter, (make, layout) in LAYOUTS.items():
            raw = make(base / f"raw-{layout}")
            roots[letter] = base / layout
            prepare(
                layout,
                raw,
                roots[letter],
                frames_per_video=1,
                size=32,
                workers=1,
                progress=False,
                detector="full",
            )
    return roots


def manifest_videos(root: Path, letter: str, splits: set[str]) -> set[str]:
    with (root / "manifest.csv").open(newline="") as handle:
        return {f"{letter}:{row['video']}" for row in csv.DictReader(handle) if row["split"] in splits}


def roots_args(roots: dict[str, Path]) -> list[str]:
    return [arg for k, v in roots.items() for arg in ("--set", f"data.options.roots.{k}={v}")]


def test_leave_one_out_end_to_end(prepared: dict[str, Path], tmp_path: Path) -> None:
    spec = DataSpec("fas_domains", image_size=32, options={"protocol": "O&C&I->M", "roots": prepared})
    splits = {split: fas_domains(split, spec) for split in ("train", "val", "test")}
    videos = {split: {m["video"] for m in data.meta} for split, data in splits.items()}
    # which videos land on which side: the sources' train+test train, their dev is 'val', M's all are test
    assert videos["train"] == set().union(
        *(manifest_videos(prepared[k], k, {"train", "test"}) for k in "OCI")
    )
    assert videos["val"] == manifest_videos(prepared["O"], "O", {"dev"}) | manifest_videos(
        prepared["I"], "I", {"dev"}
    )
    assert videos["test"] == manifest_videos(prepared["M"], "M", {"train", "test", "dev"})
    assert not videos["train"] & videos["val"] and len(videos["test"]) == 24  # MSU: 3 listed clients x 8
    for data in splits.values():  # every sample keeps its domain; balanced batches group by (domain, label)
        assert all(m["video"].startswith(f"{m['domain']}:") for m in data.meta)
        assert data.groups == [(m["domain"], m["label"]) for m in data.meta]
    assert Counter(d for d, _ in splits["train"].groups) == {"O": 120, "C": 72, "I": 48}
    assert splits["val"].origin == "source dev: O, I"

    vit = "{img_size: 32, patch_size: 8, num_classes: 2, depth: %d, embed_dim: %d, num_heads: 2}"
    overrides = [
        "data.image_size=32",
        "data.batch_size=12",
        "data.num_workers=0",
        "models.teacher.options=" + vit % (2, 32),
        "models.student.options=" + vit % (1, 16),
        "models.teacher.pretrained=false",
        "models.student.pretrained=false",
        "distill.pairs=[[1, 2]]",
        "train.epochs=1",
        "train.max_steps_per_epoch=2",
        "train.amp=none",
        "train.device=cpu",
        "train.warmup_epochs=0",
        "distill.cache=false",
    ]
    args = [a for text in overrides for a in ("--set", text)] + roots_args(prepared)
    out = tmp_path / "run"
    assert main(["run", str(RECIPE), "--out", str(out), *args]) == 0
    summary = json.loads((out / "summary.json").read_text())
    for run, result in summary["test"]["results"].items():
        assert result["threshold_source"] == "val (source dev: O, I)", run
        assert (
            result["test/M/hter"] == result["test/hter"]
        )  # one target domain: its metrics are the pooled ones
        assert 0.0 <= result["test/M/auc"] <= 1.0 and "test/M/threshold" not in result
    assert set(summary["test"]["paper"]["student_kd"]) >= {"test/optimistic_hter", "best_on_test"}


def test_missing_or_wrong_roots_are_named(
    prepared: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["validate", str(RECIPE), "--set", f"data.options.roots.O={prepared['O']}"]) == 2
    error = capsys.readouterr().err
    assert "needs the prepared folders of C (CASIA-FASD), I (Replay-Attack), M (MSU-MFSD)" in error
    assert (
        "--set data.options.roots.C=DIR --set data.options.roots.I=DIR --set data.options.roots.M=DIR"
        in error
    )
    swapped = roots_args({**prepared, "O": prepared["C"]})
    assert main(["validate", str(RECIPE), *swapped]) == 2
    assert "data.options.roots.O:" in capsys.readouterr().err
    assert main(["validate", str(RECIPE), *roots_args(prepared), "--set", "data.batch_size=64"]) == 2
    assert "data.batch_size: 64 is not a multiple of the 6 groups" in capsys.readouterr().err
    spec = DataSpec(
        "fas_domains", options={"protocol": "O_C_I_to_M", "roots": {**prepared, "M": tmp_path / "no"}}
    )
    with pytest.raises(DataError, match=r"data.options.roots.M: .*no does not exist \(expected MSU-MFSD"):
        fas_domains("test", spec)


def _settings_only(base: Path, frames: dict[str, tuple[str, int, int]]) -> dict[str, Path]:
    """Folders holding only what the preparation checks read: a manifest header and `prepare.json`
    with each letter's (sampling, frames per video, size)."""
    roots = {}
    for letter, (sampling, k, size) in frames.items():
        roots[letter] = base / LAYOUTS[letter][1]
        roots[letter].mkdir(parents=True)
        (roots[letter] / "manifest.csv").write_text("path,video,subject,label,attack_type,split\n")
        settings = {"dataset": LAYOUTS[letter][1], "protocol": None, "fold": None, "sampling": sampling}
        settings |= {
            "frames_per_video": k,
            "size": size,
            "detector": "mtcnn",
            "scale": 1.2,
            "image_format": "png",
        }
        (roots[letter] / "prepare.json").write_text(json.dumps(settings))
    return roots


def test_sets_prepared_differently_are_refused_naming_each_ones_settings(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    roots = _settings_only(
        tmp_path, {"O": ("flip", 2, 32), "C": ("flip", 2, 32), "I": ("flip", 2, 32), "M": ("uniform", 8, 64)}
    )
    assert main(["validate", str(RECIPE), *roots_args(roots)]) == 2
    error = capsys.readouterr().err
    assert (
        "data.options.roots: the sets of O_C_I_to_M were prepared with different sampling, "
        f"frames_per_video, size: O ({roots['O']}): sampling 'flip', frames_per_video 2, size 32; " in error
    )
    assert f"M ({roots['M']}): sampling 'uniform', frames_per_video 8, size 64. " in error
    assert "or set data.options.mixed_preparation: true" in error and "Traceback" not in error
    odd = roots_args(roots) + ["--set", "data.options.mixed_preparation=maybe"]
    assert main(["validate", str(RECIPE), *odd]) == 2
    assert "data.options.mixed_preparation: expected true " in capsys.readouterr().err


def test_an_unreadable_prepare_json_is_named_by_every_reader(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """One reader of `prepare.json` (`kdkit_fas.prepare.read_settings`): the cross-domain check names
    the root's key and the file, and `kdkit fas prepare` into that folder treats every setting as
    changed instead of crashing."""
    roots = _settings_only(tmp_path, {letter: ("flip", 2, 32) for letter in "OCIM"})
    for content in ("[1, 2]", "{not json"):
        (roots["C"] / "prepare.json").write_text(content)
        assert main(["validate", str(RECIPE), *roots_args(roots)]) == 2
        error = capsys.readouterr().err
        assert f"data.options.roots.C: {roots['C'] / 'prepare.json'}: not a readable settings file" in error
        assert "Traceback" not in error
    raw = make_replay(tmp_path / "raw")
    with pytest.raises(ValueError, match=r"holds frames prepared with other settings \(dataset None"):
        prepare("replay", raw, roots["C"], size=32, workers=1, progress=False)


def _cropped_by(root: Path, detector: str, sources: list[str]) -> None:
    """Name `detector` in `root`'s settings and give its manifest rows whose faces came from `sources`."""
    settings = json.loads((root / "prepare.json").read_text())
    (root / "prepare.json").write_text(json.dumps(settings | {"detector": detector}))
    rows = "".join(f"f{i}.png,v{i},s,live,,train,{source},\n" for i, source in enumerate(sources))
    header = "path,video,subject,label,attack_type,split,face_source,face_score\n"
    (root / "manifest.csv").write_text(header + rows)


def test_sets_are_compared_by_the_detector_that_cropped_their_frames(tmp_path: Path) -> None:
    """A set whose faces all came from its annotation files agrees with any detector, whatever its
    prepare.json names; two sets cropped by different detectors differ."""
    roots = _settings_only(tmp_path, {letter: ("flip", 2, 32) for letter in "OCIM"})
    _cropped_by(roots["O"], "mtcnn", ["oulu_txt", "oulu_txt"])
    _cropped_by(roots["C"], "haar", ["haar", "haar", "full"])
    _cropped_by(roots["I"], "mtcnn", ["replay_face", "mtcnn"])  # a detector where the file had no face
    _cropped_by(roots["M"], "auto", ["msu_face"])
    spec = DataSpec("fas_domains", options={"protocol": "O_C_I_to_M", "roots": roots})
    with pytest.raises(
        DataError, match=r"different detector: O \(.*\): detector None; C \(.*\): detector 'haar'"
    ):
        fas_domains("test", spec)
    _cropped_by(roots["I"], "mtcnn", ["replay_face"])
    with pytest.raises(DataError) as past_the_check:  # C's haar beside sets no detector cropped
        fas_domains("test", spec)
    assert "has labels ['live']" in str(past_the_check.value)  # the next check: these rows are fake


def test_mixed_preparation_uses_sets_prepared_differently(prepared: dict[str, Path], tmp_path: Path) -> None:
    larger = tmp_path / "msu-64"
    shutil.copytree(prepared["M"], larger)
    settings = json.loads((larger / "prepare.json").read_text())
    (larger / "prepare.json").write_text(json.dumps(settings | {"size": 64}))
    options = {"protocol": "O_C_I_to_M", "roots": {**prepared, "M": larger}}
    spec = DataSpec("fas_domains", image_size=32, options=options)
    with pytest.raises(
        DataError, match=rf"different size: O \({prepared['O']}\): size 32; .* M \({larger}\): size 64"
    ):
        fas_domains("test", spec)
    spec.options["mixed_preparation"] = True
    assert len(fas_domains("test", spec)) == 24


def test_a_raw_tree_or_an_unknown_letter_in_roots_is_named(
    prepared: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    raw = tmp_path / "OULU-NPU"
    (raw / "Train_files").mkdir(parents=True)
    assert main(["validate", str(RECIPE), *roots_args({**prepared, "O": raw})]) == 2
    assert (
        f"error: invalid {RECIPE}:\n  - data.options.roots.O: {raw} has no manifest.csv, so it is not "
        "a folder made by "
        f"`kdkit fas prepare`; if it is the raw data set, prepare it with `kdkit fas prepare oulu --root "
        f"{raw} --out {raw}-prepared`, then --set data.options.roots.O={raw}-prepared (O is OULU-NPU)"
    ) in capsys.readouterr().err
    (raw / "prepare.json").write_text("{}")  # an interrupted `kdkit fas prepare --out` into it
    assert main(["validate", str(RECIPE), *roots_args({**prepared, "O": raw})]) == 2
    assert f"preparing it did not finish; run `kdkit fas prepare oulu --root RAW --out {raw}` again" in (
        capsys.readouterr().err
    )
    assert main(["validate", str(RECIPE), *roots_args(prepared), "--set", f"data.options.roots.X={raw}"]) == 2
    assert (
        "  - data.options.roots.X: unknown letter 'X'; expected one of O (OULU-NPU), C (CASIA-FASD), "
        "I (Replay-Attack), M (MSU-MFSD)\n"
    ) in capsys.readouterr().err


class _Meta:
    def __init__(self, meta: list[dict]) -> None:
        self.meta = meta


def test_metrics_are_reported_per_test_domain_at_the_dev_threshold() -> None:
    rng = np.random.default_rng(0)

    def predictions(domains: str, shift: dict[str, float]) -> Predictions:
        meta, logits, labels = [], [], []
        for v in range(80):
            domain, label = domains[v % len(domains)], (v // len(domains)) % 2
            logits.append([0.0, rng.normal(shift[domain] * (1 if label else -1), 1.0)])
            labels.append(label)
            meta.append({"video": f"{domain}:{v}", "attack_type": "print", "label": label, "domain": domain})
        return Predictions(torch.tensor(logits), torch.tensor(labels), _Meta(meta))

    dev, test = predictions("OI", {"O": 2.0, "I": 2.0}), predictions("CM", {"C": 3.0, "M": 0.3})
    metrics = FasEvaluator()({"val": dev, "test": test})
    scores = ScoreSet(
        torch.softmax(test.logits, 1)[:, 1].numpy(),
        test.labels.numpy(),
        None,
        [m["video"] for m in test.dataset.meta],
    )
    dev_scores = ScoreSet(
        torch.softmax(dev.logits, 1)[:, 1].numpy(),
        dev.labels.numpy(),
        None,
        [m["video"] for m in dev.dataset.meta],
    )
    for domain in "CM":
        mask = np.array([m["domain"] == domain for m in test.dataset.meta])
        expected = evaluate_scores(scores.subset(mask), dev_scores)["video"]["hter"]
        assert metrics[f"test/{domain}/hter"] == pytest.approx(expected)
    assert metrics["test/C/hter"] < metrics["test/M/hter"]  # each domain on its own
    assert metrics["threshold_source"] == "val (dev split)"  # a dataset without an origin


def test_predict_gets_the_sources_crop_settings_when_they_agree(tmp_path: Path) -> None:
    """A cross-domain model records the face_crop settings of its data sets when they agree,
    and each set's when they differ (`kdkit predict` then asks which)."""
    from kdkit_fas.plugin import domains_crop_options

    from kdkit.config.schema import DataSpec

    roots = {}
    for letter, size in (("M", 64), ("I", 64), ("C", 64)):
        roots[letter] = tmp_path / letter
        roots[letter].mkdir()
        (roots[letter] / "prepare.json").write_text(
            json.dumps({"detector": "mtcnn", "scale": 1.2, "size": size})
        )
    spec = DataSpec(
        "fas_domains", options={"protocol": "M_I_to_C", "roots": {k: str(v) for k, v in roots.items()}}
    )
    assert domains_crop_options(spec) == {"detector": "mtcnn", "scale": 1.2, "size": 64}
    (roots["I"] / "prepare.json").write_text(json.dumps({"detector": "haar", "scale": 1.2, "size": 64}))
    assert domains_crop_options(spec)["sources"]["I"] == {"detector": "haar", "scale": 1.2, "size": 64}
