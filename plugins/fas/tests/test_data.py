"""FrameDataset and the two record builders (prepare manifest, plain folder layout)."""

from __future__ import annotations

import importlib.util
import json
from collections import Counter
from pathlib import Path

import pytest
import torch
from fixtures import make_folder, make_oulu, write_image
from kdkit_fas.data import FrameDataset, frames_from_folder, frames_from_manifest
from kdkit_fas.plugin import fas_folder
from kdkit_fas.prepare import prepare, write_manifest

from kdkit.cli.entry import run
from kdkit.config.schema import DataSpec, TrainSpec
from kdkit.data.augment import Frames
from kdkit.data.datasets import UNLABELED, DataError, build_loaders, training_set
from kdkit.data.frame_store import StoreError
from kdkit.data.throughput import loader_throughput
from kdkit.registry import DATASETS
from kdkit.training.task import SupervisedTask
from kdkit.training.trainer import EpochProgress, Trainer

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


def test_frame_dataset_items_and_meta(tmp_path: Path) -> None:
    root = make_folder(tmp_path)
    records = frames_from_folder(root, "train")
    dataset = FrameDataset(records, root, image_size=24, mean=MEAN, std=STD, train=False)
    assert len(dataset) == 4 * 3
    image, label = dataset[0]
    assert image.shape == (3, 24, 24) and image.dtype == torch.float32 and isinstance(label, int)
    assert image.min() >= -2.0 - 1e-6 and image.max() <= 2.0 + 1e-6  # (x - 0.5) / 0.25 with x in [0, 1]
    assert [dataset[i][1] for i in range(len(dataset))] == [m["label"] for m in dataset.meta]
    assert dataset.meta[-1] == {
        "video": "s002_replay0",
        "subject": "s002",
        "label": 0,
        "attack_type": "replay",
    }
    train = FrameDataset(records, root, image_size=24, mean=MEAN, std=STD, train=True)
    assert train[0][0].shape == (3, 24, 24)


def test_frames_from_folder_split_aliases_and_single_images(tmp_path: Path) -> None:
    root = make_folder(tmp_path)
    dev = frames_from_folder(root, "val")
    assert {r["split"] for r in dev} == {"dev"} and {r["label"] for r in dev} == {0, 1}
    assert frames_from_folder(root, "devel") == dev
    test = frames_from_folder(root, "test")
    assert {r["path"] for r in test if r["label"] == 0} == {"test/fake/still.jpg"}
    with pytest.raises(DataError, match="unknown split 'holdout'"):
        frames_from_folder(root, "holdout")


@pytest.mark.slow
def test_frames_from_manifest_after_prepare(tmp_path: Path) -> None:
    out = tmp_path / "out"
    prepare(
        "oulu",
        make_oulu(tmp_path / "raw"),
        out,
        protocol=4,
        fold=1,
        frames_per_video=2,
        size=16,
        progress=False,
    )
    test = frames_from_manifest(out, "test")
    assert len(test) == 6 * 2 and {r["label"] for r in test} == {0, 1}
    assert all((out / r["path"]).is_file() for r in test)
    dataset = FrameDataset(frames_from_manifest(out, "val"), out, image_size=16, train=False)
    assert len(dataset) == 12 * 2 and dataset[3][0].shape == (3, 16, 16)
    assert {m["attack_type"] for m in dataset.meta} == {"live", "print/1", "replay/1"}


def test_empty_and_single_class_splits_name_root_and_split(tmp_path: Path) -> None:
    rows = [
        {
            "path": f"frames/train/v{i}/0.png",
            "video": f"v{i}",
            "subject": "s",
            "label": 1,
            "attack_type": "live",
            "split": "train",
        }
        for i in range(2)
    ]
    write_manifest(tmp_path / "manifest.csv", rows)
    with pytest.raises(DataError, match=rf"'train' split of {tmp_path} holds only bona fide"):
        frames_from_manifest(tmp_path, "train")
    with pytest.raises(DataError, match=rf"'test' split of {tmp_path} has no frames"):
        frames_from_manifest(tmp_path, "test")
    with pytest.raises(DataError, match="kdkit fas prepare"):
        frames_from_manifest(tmp_path / "elsewhere", "train")
    (tmp_path / "train" / "spoof" / "v").mkdir(parents=True)
    write_image(tmp_path / "train" / "spoof" / "v" / "0.png")
    with pytest.raises(DataError, match="only attack"):
        frames_from_folder(tmp_path, "train")


def test_corrupt_image_error_names_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "live" / "0.png"
    bad.parent.mkdir()
    bad.write_bytes(b"not a png")
    record = {"path": "live/0.png", "video": "v", "subject": "s", "label": "1", "attack_type": "live"}
    dataset = FrameDataset([record], tmp_path, image_size=8)
    with pytest.raises(DataError, match=r"live/0\.png: not an image file"):
        dataset[0]
    with pytest.raises(DataError, match="label 0 or 1"):
        FrameDataset([record | {"label": "2"}], tmp_path, image_size=8)


@pytest.mark.parametrize("train", [True, False])
def test_a_frame_store_serves_the_same_items_as_the_files(tmp_path: Path, train: bool) -> None:
    root = make_folder(tmp_path)
    records = frames_from_folder(root, "train")
    files = FrameDataset(records, root, image_size=24, mean=MEAN, std=STD, train=train)
    assert run(["store", str(root)]) == 0
    stored = FrameDataset(records, root, image_size=24, mean=MEAN, std=STD, train=train, store_roots=[root])
    assert stored.served_from_store == len(stored) and files.served_from_store == 0
    assert stored.fingerprint() == files.fingerprint()  # same pixels: same teacher-cache key
    for index in range(len(files)):
        torch.manual_seed(index)
        expected = files[index]
        torch.manual_seed(index)
        got = stored[index]
        assert torch.equal(got[0], expected[0]) and got[1] == expected[1]
    report = loader_throughput(stored, items=8)  # what `kdkit bench` reports of the training data
    assert report["served_from_store"] == len(stored) and report["size"] == len(stored)
    assert report["worker_img_per_s"] > 0 and report["files_worker_img_per_s"] > 0
    assert stored.without_store().served_from_store == 0 and stored.served_from_store == len(stored)


def test_store_option_and_a_store_of_another_size(tmp_path: Path) -> None:
    root = make_folder(tmp_path)
    spec = DataSpec(dataset="fas_folder", root=str(root), image_size=24)
    assert run(["store", str(root), "--size", "16"]) == 0
    with pytest.raises(StoreError, match=r"resized to 16 px, but data.image_size is 24.*--size 24"):
        fas_folder("train", spec)
    spec.options = {"store": False}  # YAML's bare `off`
    assert fas_folder("train", spec).served_from_store == 0
    spec.options = {"store": "sometimes"}
    with pytest.raises(DataError, match="data.options.store: expected auto .* or off, got 'sometimes'"):
        fas_folder("train", spec)


def _trained(spec: DataSpec, steps: int = 3) -> tuple[torch.Tensor, dict]:
    """Mean loss terms and weights of a linear model after `steps` steps on `spec`'s training loader."""
    loader, _, _ = build_loaders(spec, seed=0, eval_splits=())
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 24 * 24, 2))
    trainer = Trainer(SupervisedTask(model), TrainSpec(epochs=1, lr=0.1, device="cpu"), loader)
    tally = EpochProgress()
    trainer.train_steps(loader, steps, tally)
    return tally.sums / tally.seen, model.state_dict()


@pytest.mark.parametrize("crop", [{}, {"crop": "resized", "crop_scale": [0.5, 1.0]}])
def test_augment_on_device_trains_exactly_as_augmenting_in_the_workers(tmp_path: Path, crop: dict) -> None:
    root = make_folder(tmp_path)
    spec = DataSpec(dataset="fas_folder", root=str(root), image_size=24, batch_size=4, num_workers=0)
    spec.options = {"augment_on": "device", **crop}
    frames, label = fas_folder("train", spec)[0]
    assert isinstance(frames, Frames) and frames.pixels.dtype == torch.uint8 and isinstance(label, int)
    on_device = _trained(spec)
    spec.options = crop  # `augment_on: workers`, the default
    in_workers = _trained(spec)
    torch.testing.assert_close(on_device, in_workers, rtol=0, atol=0)
    spec.options = {"augment_on": "gpu"}
    with pytest.raises(DataError, match="data.options.augment_on: expected workers .* or device .*got 'gpu'"):
        fas_folder("train", spec)


def test_crop_options_choose_the_crop_and_bad_values_name_the_key(tmp_path: Path) -> None:
    root = make_folder(tmp_path)
    spec = DataSpec(dataset="fas_folder", root=str(root), image_size=24)
    assert fas_folder("train", spec).transform.crop == "pad"  # the FAS default keeps the pixel scale
    spec.options = {"crop": "resized", "crop_scale": [0.25, 1]}
    transform = fas_folder("train", spec).transform
    assert (transform.crop, transform.crop_scale) == ("resized", (0.25, 1.0))
    bad = [
        ({"crop": "center"}, "data.options.crop: expected pad .* or resized .*got 'center'"),
        ({"crop_scale": [0.5, 1]}, "data.options.crop_scale: only a resized crop has a scale"),
        ({"crop": "resized", "crop_scale": [0.5]}, r"crop_scale: expected \[low, high\] .*got \[0\.5\]"),
        ({"crop": "resized", "crop_scale": [0.9, 0.5]}, "0 < low <= high <= 1"),
        ({"crop": "resized", "crop_scale": "big"}, "got 'big'"),
    ]
    for options, message in bad:
        spec.options = options
        with pytest.raises(DataError, match=message):
            fas_folder("train", spec)


def test_the_loader_benchmark_runs_at_a_tiny_size(capsys: pytest.CaptureFixture[str]) -> None:
    path = Path(__file__).resolve().parents[3] / "benchmarks" / "loader_throughput.py"
    spec = importlib.util.spec_from_file_location("loader_throughput", path)
    benchmark = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(benchmark)
    benchmark.main(["--frames", "8", "--items", "8", "--sizes", "16"])
    rates = json.loads(capsys.readouterr().out)["results"]["16px"]
    sources = {"png", "jpeg", "png_torchvision_v2", "finish_frames_one_cpu_thread", *benchmark.STORE_VARIANTS}
    assert set(rates) == sources and all(rate > 0 for rate in rates.values())


def _video_records(domains: str = "OCI", videos: int = 6) -> list[dict]:
    """Frame records of `videos` videos per domain and class, 2-4 frames each (no image files)."""
    return [
        {
            "path": f"{domain}/{label}/{v}/{k}.png",
            "video": f"{domain}:{label}_{v}",
            "subject": "",
            "label": label,
            "attack_type": "live" if label else "print",
            "domain": domain,
        }
        for domain in domains
        for label in (0, 1)
        for v in range(videos)
        for k in range(2 + v % 3)
    ]


def test_labeled_fraction_keeps_whole_videos_in_each_domain() -> None:
    if "fas_video_records" not in DATASETS:
        DATASETS.add("fas_video_records", lambda split, spec: FrameDataset(_video_records(), "/", 16))
    spec = DataSpec("fas_video_records", image_size=16, labeled_fraction=0.5, unlabeled="rest")
    data = training_set(spec, with_unlabeled=True)
    frames = FrameDataset(_video_records(), "/", 16)
    labeled_part, pool = data.datasets[0].indices, data.datasets[1].dataset.indices
    kept = {frames.meta[i]["video"] for i in labeled_part}
    left = {frames.meta[i]["video"] for i in pool}
    assert not kept & left  # no video has labelled frames and unlabelled ones
    per_group = Counter(video.split("_")[0] for video in kept)  # "O:0": domain O, label 0
    assert per_group == {f"{d}:{label}": 3 for d in "OCI" for label in (0, 1)}  # half of each one's 6 videos
    assert data.labels[: len(labeled_part)] == [frames.labels[i] for i in labeled_part]
    assert set(data.labels[len(labeled_part) :]) == {UNLABELED}
    assert training_set(spec, with_unlabeled=True).datasets[0].indices == labeled_part  # reproducible
