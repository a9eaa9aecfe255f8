"""Images/s one loader worker makes from PNG files, JPEG files and a frame store, at 64 and 224 px.

Writes N face-like frames of each size as PNG and as JPEG (quality 95) in the plain FAS layout,
a frame store of the PNGs (`kdkit store`), and times the FAS training data set on each
(`kdkit.data.throughput.worker_throughput`: `dataset[i]` in one thread, as in a DataLoader worker):
decoding, the training augmentation (reflect-padded crop, flip, brightness/contrast jitter) and
normalisation. For comparison it also times the torchvision v2 pipeline the augmentation
replaces (`kdkit.data.augment.FrameTransform` computes the same pixels), on decoded PNG frames, and
the store with `data.options.augment_on: device`: the worker hands over uint8 frames, and
`finish_frames` (timed here on one CPU thread, batches of 128) crops, flips, jitters and normalises
them on the training device; and the store with `data.options.crop: resized` (a random resized
crop, resized in the worker), in the workers and on the device.

    python benchmarks/loader_throughput.py --frames 512

prints one JSON object: per size and source, images/s per worker, with the machine. Results are
in docs/performance.md, "Data path".
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import torch
from kdkit_fas.data import Augmentation, FrameDataset, frames_from_folder
from torch.utils.data import default_collate
from torchvision.transforms import v2

from kdkit.data.augment import finish_frames
from kdkit.data.frame_store import STORE_DIR, image_files, write_store
from kdkit.data.images import read_rgb
from kdkit.data.throughput import worker_throughput

MEAN, STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)


def write_frames(root: Path, size: int, count: int, suffix: str) -> None:
    """`count` frames in train/{live,spoof}/<video>/NNN<suffix>: a smooth face-like ellipse on
    noise, so that neither codec compresses them unrealistically well."""
    rng = np.random.default_rng(size)
    for i in range(count):
        label = ("live", "spoof")[i % 2]
        path = root / "train" / label / f"s{i // 16:03d}_{label}0" / f"{i % 16:03d}{suffix}"
        path.parent.mkdir(parents=True, exist_ok=True)
        frame = rng.normal(128, 30, (size, size, 3)).clip(0, 255).astype(np.uint8)
        centre, axes = (size // 2, size // 2), (size // 3, size // 2 - 2)
        cv2.ellipse(frame, centre, axes, 0, 0, 360, (90, 140, 200), -1)
        params = [cv2.IMWRITE_JPEG_QUALITY, 95] if suffix == ".jpg" else []
        assert cv2.imwrite(str(path), frame, params)


class V2Frames(torch.utils.data.Dataset):
    """The same frames through the torchvision v2 pipeline FrameTransform stands for."""

    def __init__(self, paths: list[Path], size: int) -> None:
        self.paths = paths
        self.transform = v2.Compose(
            [
                v2.ToImage(),
                v2.Resize((size, size), antialias=True),
                v2.RandomCrop(size, padding=max(1, size // 16), padding_mode="reflect"),
                v2.RandomHorizontalFlip(),
                v2.ColorJitter(brightness=0.1, contrast=0.1),
                v2.ToDtype(torch.float32, scale=True),
                v2.Normalize(list(MEAN), list(STD)),
            ]
        )

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.transform(read_rgb(self.paths[index]))


# The store, read with each augmentation setting (`data.options` augment_on and crop).
STORE_VARIANTS = {
    "store": Augmentation(),
    "store_augment_on_device": Augmentation(on_device=True),
    "store_resized_crop": Augmentation(crop="resized"),
    "store_resized_crop_augment_on_device": Augmentation(on_device=True, crop="resized"),
}


def measure(size: int, frames: int, items: int, work: Path) -> dict[str, float]:
    """images/s per worker for each source at `size` px."""
    rates = {}
    for suffix, name in ((".png", "png"), (".jpg", "jpeg")):
        root = work / f"{name}-{size}"
        write_frames(root, size, frames, suffix)
        records = frames_from_folder(root, "train")
        files = FrameDataset(records, root, size, MEAN, STD, train=True)
        rates[name] = worker_throughput(files, items)
        if name == "png":
            rates["png_torchvision_v2"] = worker_throughput(V2Frames(files.paths, size), items)
            write_store(image_files(root), root / STORE_DIR, root, show=False)
            for label, augment in STORE_VARIANTS.items():
                stored = FrameDataset(
                    records, root, size, MEAN, STD, train=True, store_roots=[root], augment=augment
                )
                assert stored.served_from_store == len(stored)
                rates[label] = worker_throughput(stored, items)
                if label == "store_augment_on_device":
                    rates["finish_frames_one_cpu_thread"] = finish_rate(stored, items)
    return rates


def finish_rate(dataset: FrameDataset, items: int, batch: int = 128) -> float:
    """images/s of `finish_frames` (jitter and normalisation of handed-over uint8 frames) on one
    CPU thread: what `augment_on: device` costs the training process when the device is a CPU."""
    frames = default_collate([dataset[i % len(dataset)][0] for i in range(batch)])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        finish_frames(frames)  # warm-up
        start, done = time.perf_counter(), 0
        while done < items:
            finish_frames(frames)
            done += batch
        return done / (time.perf_counter() - start)
    finally:
        torch.set_num_threads(threads)


def main(argv: list[str] | None = None) -> dict:
    """Run the measurement and print its JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, default=512, help="frames written per size and format")
    parser.add_argument("--items", type=int, default=1024, help="items timed per source")
    parser.add_argument("--sizes", default="64,224", help="frame sizes in px (default 64,224)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="kdkit-loader-") as tmp:
        results = {
            f"{size}px": measure(size, args.frames, args.items, Path(tmp))
            for size in map(int, args.sizes.split(","))
        }
    report = {
        "unit": "images/s per loader worker (one thread)",
        "frames": args.frames,
        "items": args.items,
        "results": results,
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(),
            "torch": torch.__version__,
        },
    }
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
