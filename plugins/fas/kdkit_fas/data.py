"""The torch dataset that training reads: face-crop frames with labels and per-frame metadata.

Frames come either from the manifest of `kdkit fas prepare` (`frames_from_manifest`) or from
the plain folder layout, e.g. `kdkit fas synth` output (`frames_from_folder`). A record is a
dict with keys path (relative to the root, or absolute), video, subject, label (1 live / 0
attack), attack_type and split.
"""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import torch
from torch.utils.data import Dataset

from kdkit.data.augment import CROP_SCALE, CROPS, Frames, FrameTransform
from kdkit.data.csvfile import CsvTable, read_csv
from kdkit.data.datasets import DataError
from kdkit.data.frame_store import STORE_DIR, FrameStore, StoreError, open_store
from kdkit.data.images import read_rgb
from kdkit_fas.layouts import LayoutError, canonical_split, image_files, index_dataset
from kdkit_fas.prepare import MANIFEST_COLUMNS, SETTINGS_FILE

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
META_KEYS = ("video", "subject", "label", "attack_type")


class Augmentation(NamedTuple):
    """How training frames are augmented (`data.options` `augment_on`, `crop`, `crop_scale`)."""

    on_device: bool = False  # hand uint8 frames over; crop, jitter and normalise on the training device
    crop: str = "pad"  # pad: reflect-padded random crop; resized: random resized crop
    crop_scale: tuple[float, float] = CROP_SCALE  # the resized crop's share of the frame's area


DEFAULT_AUGMENTATION = Augmentation()


def build_transform(
    image_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    train: bool,
    augment: Augmentation = DEFAULT_AUGMENTATION,
) -> FrameTransform:
    """Train: reflect-padded random crop, horizontal flip, mild brightness/contrast jitter. Eval: resize.

    Spoof cues are high-frequency textures (halftone dots, moiré, screen sub-pixels); random
    *resized* crops resample them differently at every step and blur them, so by default training
    crops keep the pixel scale of evaluation (`augment.crop: resized` is there to measure that
    choice). `kdkit.data.augment.FrameTransform` computes exactly what the torchvision v2 pipeline of
    these steps computes, at a third of its cost. `augment.on_device`: the loader hands over uint8
    `Frames`; the crop, jitter and normalisation run on the training device.
    """
    padding = max(1, image_size // 16)
    return FrameTransform(
        image_size,
        mean,
        std,
        train,
        padding=padding,
        brightness=0.1,
        contrast=0.1,
        on_device=augment.on_device,
        crop=augment.crop,
        crop_scale=augment.crop_scale,
    )


class FrameDataset(Dataset):
    """Face-crop frames → `(image: float tensor (3, S, S) normalised, label: int)`; with
    `augment.on_device`, `(kdkit.data.augment.Frames, label)`, finished on the device by the trainer.

    `meta[i]` holds video, subject, label and attack_type of item i, for video-level and
    per-attack-type evaluation, and its `domain` (the data set it came from) when the records give
    one. `groups` (domain, label) per item is what `data.balanced` balances (and what
    `data.labeled_fraction` draws from equally, keeping `units`, the videos, whole); `origin` says which
    data the split holds (the evaluator records it as the source of its threshold).

    `store_roots`: folders whose frame store (`<folder>/frames.kdstore`, written by `kdkit store`)
    serves the frames under them with no image decoding; it must be up to date (a StoreError says
    how to rewrite it) and hold the frames at `image_size` or unresized, so that its pixels are the
    decoded files' pixels and nothing else changes: same images, same fingerprint, same cache keys.
    """

    def __init__(
        self,
        records: list[dict],
        root: str | Path,
        image_size: int,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        train: bool = False,
        origin: str = "",
        store_roots: Sequence[str | Path] = (),
        augment: Augmentation = DEFAULT_AUGMENTATION,
    ) -> None:
        self.root, self.origin = Path(root), origin
        self.paths: list[Path] = []
        self.labels: list[int] = []
        self.meta: list[dict] = []
        for number, record in enumerate(records):
            missing = [key for key in ("path", *META_KEYS) if key not in record]
            label = str(record.get("label", "")).strip()
            if missing or label not in ("0", "1"):
                raise DataError(
                    f"frame record {number} under {self.root}: expected keys path, {', '.join(META_KEYS)} "
                    f"and label 0 or 1, got {record!r}"
                )
            self.paths.append(self.root / record["path"])  # an absolute path stays absolute
            self.labels.append(int(label))
            domain = {"domain": record["domain"]} if "domain" in record else {}
            self.meta.append({key: record[key] for key in META_KEYS} | {"label": int(label)} | domain)
        self.transform = build_transform(image_size, mean, std, train, augment)
        self.stored: list[tuple[FrameStore, int] | None] = [None] * len(self.paths)
        for folder in store_roots:
            self._use_store(Path(folder), image_size)

    def _use_store(self, folder: Path, image_size: int) -> None:
        """Serve the frames under `folder` from its store, when it has one."""
        if not (folder / STORE_DIR).is_dir():
            return
        under = {
            i: path.relative_to(folder).as_posix()
            for i, path in enumerate(self.paths)
            if path.is_relative_to(folder)
        }
        store = open_store(folder / STORE_DIR, folder, list(under.values()))
        if store.size not in (None, image_size):
            raise StoreError(
                f"{folder / STORE_DIR}: holds frames resized to {store.size} px, but data.image_size is "
                f"{image_size}: rewrite it with `kdkit store {folder} --size {image_size}` "
                "(or without --size)"
            )
        for i, relative in under.items():
            self.stored[i] = (store, store.row(relative))

    def without_store(self) -> FrameDataset:
        """The same data set decoding every frame from its file (what a store saves, measured)."""
        files = copy.copy(self)
        files.stored = [None] * len(self.paths)
        return files

    @property
    def served_from_store(self) -> int:
        """How many of the frames a frame store serves (the rest are decoded from their files)."""
        return sum(source is not None for source in self.stored)

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def groups(self) -> list[tuple[str | None, int]]:
        """(domain or None, label) of every item: the groups `data.balanced` draws equally from."""
        return [(m.get("domain"), m["label"]) for m in self.meta]

    @property
    def units(self) -> list[str]:
        """The video of every item: `data.labeled_fraction` keeps or drops a video's labels whole."""
        return [m["video"] for m in self.meta]

    def fingerprint(self) -> str:
        """SHA-256 of every frame's path, label, size and modification time: the data part of the
        teacher-output cache's key (a changed or re-prepared frame gives a new key)."""
        digest = hashlib.sha256()
        for path, label in zip(self.paths, self.labels, strict=True):
            stat = path.stat()
            digest.update(f"{path}|{label}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
        return digest.hexdigest()

    def __getitem__(self, index: int) -> tuple[torch.Tensor | Frames, int]:
        source = self.stored[index]
        rgb = read_rgb(self.paths[index]) if source is None else source[0].image(source[1])
        return self.transform(rgb), self.labels[index]


def store_roots(options: dict, roots: Sequence[Path]) -> list[Path]:
    """The folders whose frame stores a data set reads: `roots`, unless `data.options.store` is off.

    `store: auto` (the default) reads `<root>/frames.kdstore` wherever `kdkit store` wrote one;
    `store: off` decodes the image files (YAML reads a bare `off` as false, so false works too).
    """
    value = options.get("store", "auto")
    if value in ("auto", True):
        return list(roots)
    if value in ("off", False):
        return []
    raise DataError(
        f"data.options.store: expected auto (read a folder's {STORE_DIR} when it has one) or off, "
        f"got {value!r}"
    )


AUGMENT_OPTIONS = {"augment_on", "crop", "crop_scale"}


def augmentation(options: dict) -> Augmentation:
    """The `Augmentation` that `data.options` ask for, checked: `augment_on` is `workers` (the
    default) or `device` (same augmentation; pays off when a GPU trains), `crop` is `pad` (the
    default) or `resized`, and `crop_scale` [low, high] with 0 < low <= high <= 1 (resized only)."""
    on = options.get("augment_on", "workers")
    if on not in ("workers", "device"):
        raise DataError(
            "data.options.augment_on: expected workers (augment in the loader workers) or device "
            f"(hand over uint8 frames, crop, jitter and normalise on the training device), got {on!r}"
        )
    crop = options.get("crop", "pad")
    if crop not in CROPS:
        raise DataError(
            "data.options.crop: expected pad (a reflect-padded random crop, the pixel scale kept) or "
            f"resized (a random resized crop), got {crop!r}"
        )
    scale = options.get("crop_scale", DEFAULT_AUGMENTATION.crop_scale)
    if "crop_scale" in options and crop != "resized":
        raise DataError(
            "data.options.crop_scale: only a resized crop has a scale; set data.options.crop: resized"
        )
    numbers = isinstance(scale, list | tuple) and all(
        isinstance(x, int | float) and not isinstance(x, bool) for x in scale
    )
    if not (numbers and len(scale) == 2 and 0 < scale[0] <= scale[1] <= 1):
        raise DataError(
            f"data.options.crop_scale: expected [low, high] with 0 < low <= high <= 1 (the share of "
            f"the frame's area a resized crop keeps), got {scale!r}"
        )
    return Augmentation(on == "device", crop, (float(scale[0]), float(scale[1])))


def _split_rows(rows: list[dict], root: Path, split: str) -> list[dict]:
    """The rows of `split`, checked to be non-empty and to hold both classes."""
    chosen = [row for row in rows if canonical_split(row["split"]) == split]
    if not chosen:
        raise DataError(f"the {split!r} split of {root} has no frames")
    labels = {str(row["label"]).strip() for row in chosen}
    if not labels <= {"0", "1"}:
        raise DataError(f"the {split!r} split of {root} has labels {sorted(labels)}; expected 0 and 1")
    if len(labels) < 2:
        kind = "bona fide (label 1)" if labels == {"1"} else "attack (label 0)"
        raise DataError(f"the {split!r} split of {root} holds only {kind} frames; both classes are needed")
    return [row | {"label": int(row["label"])} for row in chosen]


def _canonical(split: str) -> str:
    try:
        return canonical_split(split)
    except LayoutError as exc:
        raise DataError(str(exc)) from None


def missing_manifest(root: Path, dataset: str = "DATASET", key: str = "") -> str:
    """Why `root` has no `manifest.csv`, and the `kdkit fas prepare` command that makes one: into
    `root` when it does not exist or holds an unfinished preparation, else (a raw tree, most
    likely) from `root` into a folder beside it. `key`: the recipe key to point at that folder."""
    command = f"kdkit fas prepare {dataset}"
    if not root.exists():
        return f"{root} does not exist; create it with `{command} --root RAW --out {root}`"
    if (root / SETTINGS_FILE).is_file():  # written first: a preparation into it did not finish
        return (
            f"{root} has no manifest.csv: preparing it did not finish; run `{command} --root RAW "
            f"--out {root}` again (finished videos are skipped)"
        )
    out = root.with_name(f"{root.name}-prepared")
    then = f"--set {key}={out}" if key else f"use {out}"
    return (
        f"{root} has no manifest.csv, so it is not a folder made by `kdkit fas prepare`; if it is the "
        f"raw data set, prepare it with `{command} --root {root} --out {out}`, then {then}"
    )


def frames_from_manifest(root: str | Path, split: str) -> list[dict]:
    """Frame records of `split` ('train', 'dev'/'val', 'test') from `root/manifest.csv`."""
    root, split = Path(root), _canonical(split)
    manifest = root / "manifest.csv"
    if not manifest.is_file():
        raise DataError(missing_manifest(root))
    table = read_csv(manifest, required=MANIFEST_COLUMNS)
    try:
        records = _split_rows(table.rows, root, split)
    except LayoutError as exc:
        raise DataError(f"{manifest}: {exc}") from None
    _check_files_exist(table, root, split)
    return records


def _check_files_exist(table: CsvTable, root: Path, split: str, shown: int = 5) -> None:
    """Refuse a manifest whose `split` rows name missing files, listing the first `shown` by line
    (one stat per row, so training never meets one mid-epoch)."""
    missing = [
        f"line {line}: {row['path']}"
        for line, row in zip(table.lines, table.rows, strict=True)
        if canonical_split(row["split"]) == split and not (root / row["path"]).is_file()
    ]
    if missing:
        more = f"; and {len(missing) - shown} more" if len(missing) > shown else ""
        raise DataError(
            f"{table.path}: {len(missing)} row(s) of the {split!r} split name files that do not exist "
            f"under {root} ({'; '.join(missing[:shown])}{more}); restore them, remove those rows, or "
            "prepare the data set again into a new --out"
        )


def frames_from_folder(root: str | Path, split: str) -> list[dict]:
    """Frame records of `split` from the plain layout `<split>/<live|spoof>/<video>/*.png`."""
    root, split = Path(root), _canonical(split)
    try:
        records = index_dataset("folder", root)
    except LayoutError as exc:
        raise DataError(str(exc)) from None
    rows = []
    for record in records:
        if record.split != split:
            continue
        frames = image_files(record.path) if record.path.is_dir() else [record.path]
        rows += [
            {
                "path": frame.relative_to(root).as_posix(),
                "video": record.video,
                "subject": record.subject,
                "label": record.label,
                "attack_type": record.attack_type,
                "split": record.split,
            }
            for frame in frames
        ]
    return _split_rows(rows, root, split)
