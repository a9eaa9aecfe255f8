"""`kdkit fas prepare`: decode a raw FAS data set once into a face-crop frame cache + manifest.

For every indexed video: decode it once with OpenCV, sample K frames (evenly, or by the SSDG or
FLIP convention: `kdkit_fas.sampling`), crop the face (from the data set's face-location file
when it ships one, else a detector; `faces.align_and_crop`, the crop `kdkit predict` makes too),
resize and write
`out/frames/<split>/<video>/<k>.png`. A finished video leaves `.done.json` beside its frames so
a re-run skips it; a video without that marker (interrupted, failed) is redone from scratch.
`out/manifest.csv` (path relative to `out`, video, subject, label, attack_type, split,
face_source, face_score) lists every finished frame and is written atomically at the end of each
run.

`out/prepare.json` records the settings the frames were made with (data set, protocol, fold,
frames per video, size, detector, scale, image format, sampling): a re-run with the same settings
continues, one with other settings is refused unless `replace` (then the earlier frames are
deleted first). One process at a time writes `out` (`kdkit.utils.lock.exclusive`). Videos are
prepared in worker processes (`kdkit.utils.workers.WorkerPool`); an interrupted run keeps every
finished video.
"""

from __future__ import annotations

import contextlib
import csv
import functools
import io
import json
import os
import shutil
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

from kdkit.data.csvfile import read_csv
from kdkit.data.datasets import DataError
from kdkit.data.images import read_rgb
from kdkit.deploy.inputs import InputError, iter_video_frames
from kdkit.utils.checkpoint import atomic_write_text
from kdkit.utils.lock import exclusive
from kdkit.utils.runlog import progress as report_progress
from kdkit.utils.workers import Interrupted, WorkerPool
from kdkit_fas import faces
from kdkit_fas.layouts import IMAGE_EXTS, VideoRecord, image_files, index_dataset
from kdkit_fas.sampling import frame_indices, resolve_frames

MANIFEST_COLUMNS = ("path", "video", "subject", "label", "attack_type", "split")
# written after MANIFEST_COLUMNS, optional when read (manifests of earlier versions lack them):
# where each frame's face came from (an annotation format or a detector's name) and the detector's
# confidence (empty when it gives none); docs/fas.md, "Face detection"
FACE_COLUMNS = ("face_source", "face_score")
FaceOf = Callable[[int, np.ndarray], "faces.Face | None"]
MARKER = ".done.json"
SETTINGS_FILE = "prepare.json"
NO_FACE = "no face in any sampled frame"  # the failure of a video that was read
# settings recorded since 0.2.0, with the value frames made before then were made with
SINCE_0_2 = {"sampling": "uniform"}


class PrepareError(DataError):
    """Bad arguments, or a data set that cannot be prepared as asked (exit status 2)."""


@dataclass(frozen=True)
class _Settings:
    """What a video's frames depend on; a marker written with other settings is stale."""

    frames_per_video: int
    size: int
    detector: str
    scale: float
    image_format: str
    sampling: str = "uniform"  # a `kdkit_fas.sampling` convention


@dataclass
class PrepareReport:
    """Outcome of `prepare`: counts over the whole cache and the videos that failed, by id."""

    out: Path
    manifest: Path
    videos: int = 0
    processed: int = 0  # finished in this run
    skipped: int = 0  # already finished by an earlier run
    frames: int = 0  # rows in the manifest
    no_face_frames: int = 0  # sampled frames dropped because no face was found
    failed: dict[str, str] = field(default_factory=dict)  # video id -> reason
    faceless: dict[str, str] = field(default_factory=dict)  # failed for no face: video id -> face source

    def summary(self) -> str:
        """A few human-readable lines."""
        lines = [
            f"{self.videos} videos: {self.processed} prepared, {self.skipped} already done, "
            f"{len(self.failed)} failed; {self.frames} frames in {self.manifest}",
            f"{self.no_face_frames} sampled frames had no face and were dropped",
        ]
        lines += [f"failed: {video}: {reason}" for video, reason in sorted(self.failed.items())]
        unreadable = len(self.failed) - len(self.faceless)
        if unreadable:
            lines.append(
                f"{unreadable} video(s) could not be read (named above); the others are prepared. "
                "Fix or remove them and run the same command again: prepared videos are skipped."
            )
        if self.faceless:
            lines.append(self._faceless_advice())
        return "\n".join(lines)

    def _faceless_advice(self) -> str:
        """Why videos that were read have no frame, and what to try (another detector)."""
        sources = sorted(set(self.faceless.values()))
        text = (
            f"{len(self.faceless)} video(s) were read, but no face was found in any of their sampled "
            f"frames (named above; faces from: {', '.join(sources)})."
        )
        if set(sources) & faces.DETECTOR_NAMES:  # annotation files win over any --detector
            text += (
                " Try another face detector: --detector mtcnn, a YuNet .onnx path, or full for frames "
                "already cropped to the face (into a new --out, or with --replace)."
            )
        return text


@dataclass
class _Outcome:
    video: str
    frames: list[str] = field(default_factory=list)
    no_face: int = 0
    error: str | None = None
    face_source: str = ""
    face_scores: list[float | None] = field(default_factory=list)  # one per frame


def read_video_frames(path: Path, pick: Callable[[int], list[int]]) -> Iterator[tuple[int, np.ndarray]]:
    """Yield `(index, BGR frame)` for the frames `pick(frame count)` names, decoded as
    `kdkit.deploy.inputs.iter_video_frames` decodes them for `kdkit predict` (with 'uniform'
    sampling both yield the same frames); unreadable videos raise OSError."""
    try:
        for index, rgb in iter_video_frames(path, 0, pick):
            yield index, cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)
    except InputError as exc:
        raise OSError(str(exc)) from None


@functools.cache
def _detector(spec: str) -> faces.Detector | None:
    return faces.make_detector(spec)


def _read_image(path: Path) -> np.ndarray:
    """A BGR frame of an image file, decoded by kdkit's image reader (every mode, EXIF-upright)."""
    return cv2.cvtColor(read_rgb(path), cv2.COLOR_RGB2BGR)


def _annotated(box: faces.Box | None) -> faces.Face | None:
    return None if box is None else faces.Face(box)  # a data set's file gives no confidence


def _face_source(record: VideoRecord, detector_spec: str) -> tuple[str, FaceOf]:
    """`(source, (frame index, frame) -> Face or None)` for a record: its annotation file (source:
    the file's format, or 'full' for data cropped already), else the detector (source: its name)."""
    if record.face_format == "full":
        return "full", lambda index, frame: faces.Face(faces.full_frame(frame))
    if record.face is not None and record.face_format in faces.FRAME_READERS:
        track = faces.read_face_track(record.face, record.face_format)
        if record.upside_down:  # the file's boxes refer to the frames as stored; these are turned
            return record.face_format, lambda index, frame: _annotated(
                faces.turn_box_180(track.get(index), frame.shape)
            )
        # frames missing from the file have no face
        return record.face_format, lambda index, frame: _annotated(track.get(index))
    if record.face is not None and record.face_format == "celeba_bb":
        return "celeba_bb", lambda index, frame: _annotated(
            faces.read_celeba_bb(record.face, frame.shape[1], frame.shape[0])
        )
    detector = _detector(detector_spec)
    if detector is None:
        raise OSError("no face-location file and no face detector")
    return detector.name, lambda index, frame: detector(frame)


def _sampled_frames(record: VideoRecord, k: int, convention: str) -> Iterator[tuple[int, np.ndarray]]:
    """`(index, BGR frame)` pairs of a video, a folder of frames or a single image, the frames
    chosen by `convention` (`kdkit_fas.sampling`) among the record's first `max_frames`."""

    def pick(count: int) -> list[int]:
        return frame_indices(count, k, convention, limit=record.max_frames)

    if record.path.is_dir():
        files = image_files(record.path)
        return ((i, _read_image(files[i])) for i in pick(len(files)))
    if record.path.suffix.lower() in IMAGE_EXTS:
        return iter([(0, _read_image(record.path))])
    return read_video_frames(record.path, pick)


def _frame_dir(out: Path, record: VideoRecord) -> Path:
    return out / "frames" / record.split / record.video


def _process(record: VideoRecord, out: Path, settings: _Settings) -> _Outcome:
    """Prepare one record; never raises for bad media, it returns the reason instead."""
    folder = _frame_dir(out, record)
    shutil.rmtree(folder, ignore_errors=True)  # leftovers of an interrupted run
    folder.mkdir(parents=True)
    outcome = _Outcome(record.video)
    try:
        outcome.face_source, face_of = _face_source(record, settings.detector)
        frames = _sampled_frames(record, settings.frames_per_video, settings.sampling)
        for k, (index, frame) in enumerate(frames):
            if record.upside_down:
                frame = cv2.rotate(frame, cv2.ROTATE_180)  # as bob.db.msu_mfsd_mod since 271a28f
            face = face_of(index, frame)
            if face is None:
                outcome.no_face += 1
                continue
            name = f"{k}.{settings.image_format}"
            crop = faces.align_and_crop(frame, face, settings.scale, settings.size)
            if not cv2.imwrite(str(folder / name), crop):
                raise OSError(f"cannot write {folder / name}")
            outcome.frames.append(name)
            outcome.face_scores.append(face.confidence)
    except (OSError, ValueError, cv2.error) as exc:
        return _Outcome(record.video, error=str(exc) or type(exc).__name__)
    if not outcome.frames:
        return _Outcome(record.video, no_face=outcome.no_face, error=NO_FACE, face_source=outcome.face_source)
    atomic_write_text(json.dumps({"settings": asdict(settings), **asdict(outcome)}), folder / MARKER)
    return outcome


def _init_worker() -> None:
    cv2.setNumThreads(1)  # one process per core already
    torch.set_num_threads(1)  # the same for a CNN face detector


def _finished(out: Path, record: VideoRecord, settings: _Settings) -> _Outcome | None:
    """The outcome stored by an earlier run with the same settings, or None."""
    marker = _frame_dir(out, record) / MARKER
    try:
        stored = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if {**SINCE_0_2, **stored.get("settings", {})} != asdict(settings):
        return None
    frames = stored["frames"]
    return _Outcome(
        record.video,
        frames=frames,
        no_face=stored["no_face"],
        face_source=stored.get("face_source", ""),
        face_scores=stored.get("face_scores", [None] * len(frames)),
    )


def write_manifest(path: Path, rows: list[dict]) -> None:
    """Write manifest rows (MANIFEST_COLUMNS, then FACE_COLUMNS, empty where a row has none) to
    `path` atomically."""
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=MANIFEST_COLUMNS + FACE_COLUMNS)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(text.getvalue(), path)


def _check_settings(frames_per_video: int, size: int, workers: int, scale: float, image_format: str) -> None:
    for name, value in (("frames_per_video", frames_per_video), ("size", size), ("workers", workers)):
        if not isinstance(value, int) or value < 1:
            raise PrepareError(f"{name} must be a positive integer, got {value!r}")
    if not scale >= 1:
        raise PrepareError(f"scale must be >= 1, got {scale!r}")
    if image_format not in ("png", "jpg"):
        raise PrepareError(f"image_format must be 'png' or 'jpg', got {image_format!r}")


def _run(
    todo: list[VideoRecord], out: Path, settings: _Settings, workers: int, progress: bool
) -> Iterator[_Outcome]:
    """Process records in worker processes (in this one for one worker), reporting progress
    (`kdkit.utils.runlog.progress`: a bar on a terminal, plain lines in a log)."""
    with report_progress(len(todo), "fas prepare", unit="videos", show=progress) as advance:
        if workers == 1 or len(todo) <= 1:
            for record in todo:
                yield _process(record, out, settings)
                advance()
            return
        work = functools.partial(_process, out=out, settings=settings)
        with WorkerPool(
            work, workers, initializer=_init_worker, describe=lambda r: f"video {r.video}"
        ) as pool:
            for outcome in pool.run(todo):
                yield outcome
                advance()


def cropping_detector(root: Path, settings: dict[str, Any]) -> str | None:
    """The detector that cropped the frames under `root`: the most frequent detector in its
    manifest's `face_source` column (for YuNet, the model file `settings` name), not the detector
    `settings` name, which frames cropped from a data set's annotation files, or taken whole
    ('full'), never used. None when annotation files cropped every frame."""
    counts = Counter(row.get("face_source") for row in read_csv(root / "manifest.csv").rows)
    detectors = [name for name, _ in counts.most_common() if name in faces.DETECTOR_NAMES]
    if not detectors:
        return None
    return settings.get("detector") if detectors[0] == "yunet" else detectors[0]


def read_settings(folder: Path) -> dict[str, Any] | None:
    """The settings `kdkit fas prepare` recorded in `folder/prepare.json`; None when there are none
    (a folder prepared before they were recorded, or not by it). An unreadable file is a
    ValueError naming it."""
    path = folder / SETTINGS_FILE
    try:
        settings = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except ValueError as exc:
        settings = exc
    if not isinstance(settings, dict):
        raise ValueError(f"{path}: not a readable settings file of `kdkit fas prepare` ({settings})")
    return settings


def _record_settings(out: Path, settings: dict[str, object], replace: bool) -> None:
    """Write `settings` to `out/prepare.json`; refuse (or with `replace`, delete) frames made with others."""
    path = out / SETTINGS_FILE
    try:
        found = read_settings(out)
    except ValueError:
        found = {}  # unreadable: every setting counts as changed
    # None: a new folder, or one prepared before settings were recorded
    found = settings if found is None else {**SINCE_0_2, **found}
    if found != settings:
        if not replace:
            changed = [
                f"{key} {found.get(key)!r} -> {settings[key]!r}"
                for key in settings
                if found.get(key) != settings[key]
            ]
            raise PrepareError(
                f"--out {out}: holds frames prepared with other settings "
                f"({'; '.join(changed)}, recorded in {path}); pass --replace to delete "
                "them and prepare again, or choose another --out"
            )
        shutil.rmtree(out / "frames", ignore_errors=True)
        (out / "manifest.csv").unlink(missing_ok=True)
    atomic_write_text(json.dumps(settings, indent=2) + "\n", path)


def prepare(
    dataset: str,
    root: str | Path,
    out: str | Path,
    protocol: object = None,
    fold: object = None,
    frames_per_video: int | None = None,
    sampling: str = "uniform",
    size: int = 224,
    workers: int | None = None,
    progress: bool = True,
    detector: str = "auto",
    scale: float = 1.2,
    image_format: str = "png",
    replace: bool = False,
) -> PrepareReport:
    """Build (or resume) the frame cache of `dataset` under `out`; see the module docstring.

    `sampling` ('uniform', 'ssdg', 'flip'; `kdkit_fas.sampling`) picks the frames, K =
    `frames_per_video` of them (default 8; 'flip' takes exactly 2).
    `detector` is used for records without a face-location file ('auto', 'mtcnn', 'haar', 'full'
    or a YuNet .onnx path; see `faces.make_detector`); 'auto' is recorded as the detector it
    chose, so a re-run where it would choose another is refused like any other change of
    settings. `scale` is the crop's side over the face box's longer side. Raises `PrepareError`
    / `LayoutError` on bad input, `PrepareError` when `out` holds frames made with other
    settings (unless `replace`), `kdkit.utils.lock.OutputLocked` while another process writes `out`,
    and `kdkit.utils.workers.Interrupted` when stopped by a signal; unreadable videos are listed in the
    report, not raised.
    """
    workers = (os.cpu_count() or 1) if workers is None else workers
    try:  # K: 8 by default, 2 (and only 2) for 'flip'
        frames_per_video = resolve_frames(frames_per_video, sampling)
    except ValueError as exc:
        raise PrepareError(str(exc)) from None
    _check_settings(frames_per_video, size, workers, scale, image_format)
    records = index_dataset(dataset, root, protocol, fold)
    detector = _chosen_detector(detector, records)
    out = Path(out).expanduser()
    settings = _Settings(frames_per_video, size, detector, scale, image_format, sampling=sampling)
    named = {
        "dataset": dataset,
        **{k: None if v is None else str(v) for k, v in (("protocol", protocol), ("fold", fold))},
    }
    with exclusive(out):
        out.mkdir(parents=True, exist_ok=True)
        _record_settings(out, {**named, **asdict(settings)}, replace)
        outcomes = {r.video: _finished(out, r, settings) for r in records}
        todo = [r for r in records if outcomes[r.video] is None]
        report = PrepareReport(
            out, out / "manifest.csv", videos=len(records), skipped=len(records) - len(todo)
        )
        _prepare_videos(todo, settings, workers, progress, report, outcomes)
        rows = _manifest_rows(records, outcomes, out)
        write_manifest(report.manifest, rows)
    report.frames = len(rows)
    report.no_face_frames += sum(o.no_face for o in outcomes.values() if o is not None and not o.error)
    return report


def _chosen_detector(detector: str, records: list[VideoRecord]) -> str:
    """The detector for records without a face-location file ('auto' resolved to MTCNN or Haar);
    a PrepareError when such records need one that is not available."""
    try:
        available = _detector(detector)
    except ValueError as exc:
        raise PrepareError(str(exc)) from None
    needs_detector = [r for r in records if r.face_format == "detect"]
    if needs_detector and available is None:
        raise PrepareError(
            f"{len(needs_detector)} video(s) (e.g. {needs_detector[0].path}) have no face-location "
            f"file and {faces.NO_DETECTOR}"
        )
    return available.name if detector == "auto" and available is not None else detector


def _prepare_videos(
    todo: list[VideoRecord],
    settings: _Settings,
    workers: int,
    progress: bool,
    report: PrepareReport,
    outcomes: dict[str, _Outcome | None],
) -> None:
    """Prepare the videos of `todo` in worker processes, recording each outcome in `outcomes` and
    `report`; an interruption says what was kept."""
    out = report.out
    try:
        with contextlib.closing(_run(todo, out, settings, workers, progress)) as results:
            for outcome in results:
                if outcome.error:
                    report.failed[outcome.video] = outcome.error
                    if outcome.error == NO_FACE:
                        report.faceless[outcome.video] = outcome.face_source
                    report.no_face_frames += outcome.no_face
                else:
                    report.processed += 1
                    outcomes[outcome.video] = outcome
    except Interrupted as exc:
        kept = report.skipped + report.processed
        raise Interrupted(
            f"{exc}; {kept} of {report.videos} videos are prepared in {out / 'frames'} and kept "
            "(the manifest is written when every video is done)",
            exc.signum,
        ) from None


def _manifest_rows(records: list[VideoRecord], outcomes: dict[str, _Outcome | None], out: Path) -> list[dict]:
    """Manifest rows (MANIFEST_COLUMNS and FACE_COLUMNS) of every prepared video, in index order."""
    rows = []
    for record in records:
        outcome = outcomes[record.video]
        if outcome is None or outcome.error:
            continue
        folder = _frame_dir(out, record).relative_to(out).as_posix()
        rows += [
            {
                "path": f"{folder}/{name}",
                "video": record.video,
                "subject": record.subject,
                "label": record.label,
                "attack_type": record.attack_type,
                "split": record.split,
                "face_source": outcome.face_source,
                "face_score": "" if score is None else f"{score:.6g}",
            }
            for name, score in zip(outcome.frames, outcome.face_scores, strict=True)
        ]
    return rows
