"""Writer of the synthetic face anti-spoofing data set: folders, frames, meta.csv and synth.json.

Layout (the plain folder layout): ``OUT/<split>/<live|spoof>/<video>/<frame>.png`` with subject-disjoint
splits train/dev/test (60/20/20 % of the subjects, or the dev and test counts asked for),
``OUT/meta.csv`` (path, split, video, subject, label, attack_type; label 1 = live) and
``OUT/synth.json`` (parameters and counts). Each subject has 2 live, 1 print and 1 replay video, so
half of the frames are live. Subjects are drawn from the seed: sets with different seeds share none.
The frames themselves are drawn by ``kdkit_fas.synth_render``; this module chooses their seeds.
"""

from __future__ import annotations

import csv
import functools
import json
import math
import os
import shutil
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from kdkit.data.csvfile import read_csv
from kdkit.utils.checkpoint import atomic_open, atomic_write_text
from kdkit.utils.lock import exclusive
from kdkit.utils.runlog import progress as report_progress
from kdkit.utils.workers import Interrupted, WorkerPool
from kdkit_fas import synth_render as render

FORMAT = "kdkit-fas-synth"
VERSION = 1
VIDEOS_PER_SUBJECT: dict[str, int] = {"live": 2, "print": 1, "replay": 1}
SPLITS = ("train", "dev", "test")
META_COLUMNS = ("path", "split", "video", "subject", "label", "attack_type")
_PROGRESS = "progress.jsonl"  # in the partial folder: the meta rows of every finished video, a line each
_MINIMUM = {"n_subjects": 3, "frames": 1, "size": 16, "seed": 0, "workers": 1}  # of `generate`'s integers


@dataclass(frozen=True)
class SynthSummary:
    """What a synth run produced (or found): frame and video counts per split and attack type."""

    out: Path
    frames: dict[str, dict[str, int]]
    videos: dict[str, dict[str, int]]
    subjects: dict[str, int]
    reused: bool
    seconds: float

    @property
    def total_frames(self) -> int:
        """Number of frames over all splits."""
        return sum(sum(per_type.values()) for per_type in self.frames.values())


def _split_sizes(n_subjects: int, dev: int | None, test: int | None) -> tuple[int, int]:
    """(dev, test) subject counts: as given, else about 20 % each (at least 1)."""
    default = max(1, round(0.2 * n_subjects))
    return default if dev is None else dev, default if test is None else test


def _subject_splits(n_subjects: int, seed: int, n_dev: int, n_test: int) -> dict[int, str]:
    """Subject -> split, disjoint by construction."""
    order = np.random.default_rng([seed, 0]).permutation(n_subjects)
    names = ["test"] * n_test + ["dev"] * n_dev + ["train"] * (n_subjects - n_dev - n_test)
    return {int(s): names[i] for i, s in enumerate(order)}


def _jobs(params: dict) -> Iterator[tuple[int, int, str, str]]:
    """(subject, video index, attack type, split) of every video."""
    n_subjects, seed = params["n_subjects"], params["seed"]
    n_dev, n_test = _split_sizes(n_subjects, params.get("dev_subjects"), params.get("test_subjects"))
    splits = _subject_splits(n_subjects, seed, n_dev, n_test)
    for subject in range(n_subjects):
        index = 0
        for kind, count in VIDEOS_PER_SUBJECT.items():
            for _ in range(count):
                yield subject, index, kind, splits[subject]
                index += 1


def _video_name(subject: int, index: int, kind: str) -> str:
    """Video folder name, e.g. ``s007_live1``."""
    live_index = index if kind == "live" else 0
    return f"s{subject:03d}_{kind}{live_index}"


def _video_folder(job: tuple[int, int, str, str]) -> Path:
    """Where a video's frames go, relative to the data set: ``<split>/<live|spoof>/<video>``."""
    subject, index, kind, split = job
    return Path(split) / ("live" if kind == "live" else "spoof") / _video_name(subject, index, kind)


def _video(seed: int, subject: int, index: int, kind: str, frames: int, size: int) -> list[np.ndarray]:
    """All frames (uint8 RGB) of one video; depends only on its arguments.

    Attacks re-use the subject's live sessions as their source (print and replay of the first and
    second live video, as real data sets record them), so their colour statistics pair with live ones.
    """
    n_live = VIDEOS_PER_SUBJECT["live"]
    session_index = index if kind == "live" else (index - n_live) % n_live
    idt = render.draw_identity(np.random.default_rng([seed, 1, subject]))
    session = render.film_session(idt, np.random.default_rng([seed, 2, subject, session_index]), frames, size)
    rng = np.random.default_rng([seed, 3, subject, index])
    if kind == "live":
        return render.live_frames(session, rng)
    return list(render.attack_frames(session, rng, kind, size))


def _write_video(root: str, params: dict, job: tuple[int, int, str, str]) -> list[dict[str, str]]:
    """Render one video, write its PNG frames under ``root`` and return its meta.csv rows."""
    subject, index, kind, split = job
    video = _video_name(subject, index, kind)
    rel = _video_folder(job)
    (Path(root) / rel).mkdir(parents=True)
    rows = []
    for f, img in enumerate(_video(params["seed"], subject, index, kind, params["frames"], params["size"])):
        path = rel / f"{f:03d}.png"
        if not cv2.imwrite(str(Path(root) / path), img[..., ::-1]):
            raise OSError(f"could not write {Path(root) / path}")
        label = "1" if kind == "live" else "0"
        rows.append(
            {
                "path": path.as_posix(),
                "split": split,
                "video": video,
                "subject": f"s{subject:03d}",
                "label": label,
                "attack_type": kind,
            }
        )
    return rows


def _init_worker() -> None:
    """Worker processes draw single-threaded so that W workers use W cores."""
    cv2.setNumThreads(1)


def _counts(rows: list[dict[str, str]]) -> dict:
    """Frames, videos and subjects per split (and per attack type)."""
    frames = {s: dict.fromkeys(VIDEOS_PER_SUBJECT, 0) for s in SPLITS}  # splits without subjects stay 0
    videos = {s: {k: set() for k in VIDEOS_PER_SUBJECT} for s in SPLITS}
    subjects = {s: set() for s in SPLITS}
    for r in rows:
        frames[r["split"]][r["attack_type"]] += 1
        videos[r["split"]][r["attack_type"]].add(r["video"])
        subjects[r["split"]].add(r["subject"])
    return {
        "frames": frames,
        "videos": {s: {k: len(v) for k, v in per.items()} for s, per in videos.items()},
        "subjects": {s: len(v) for s, v in subjects.items()},
    }


def _existing(out: Path, info: dict, started: float) -> SynthSummary | None:
    """Summary of a complete identical set already in ``out``; None if ``out`` is absent or empty."""
    if not out.exists():
        return None
    if not out.is_dir():
        raise NotADirectoryError(f"--out {out}: exists and is not a folder")
    if not any(out.iterdir()):
        return None
    try:
        found = json.loads((out / "synth.json").read_text())
    except (OSError, ValueError):
        raise FileExistsError(
            f"--out {out}: folder is not empty and holds no readable synth.json; refusing to write into it "
            "(choose a new or empty folder)"
        ) from None
    keys = ("format", "version", "params")
    if any(found.get(k) != info[k] for k in keys):
        raise FileExistsError(
            f"--out {out}: holds a synth data set with other parameters "
            f"({ {k: found.get(k) for k in keys} } != { {k: info[k] for k in keys} }); "
            "choose another folder or delete it"
        )
    rows = read_csv(out / "meta.csv", required=META_COLUMNS).rows  # also as a spreadsheet saves it
    missing = [r["path"] for r in rows if not (out / r["path"]).is_file()]
    if not rows or missing or _counts(rows)["frames"] != found["counts"]["frames"]:
        raise FileExistsError(
            f"--out {out}: synth data set is incomplete ({len(missing)} listed files missing)"
        )
    c = found["counts"]
    return SynthSummary(out, c["frames"], c["videos"], c["subjects"], True, time.perf_counter() - started)


def _partial_folder(out: Path) -> Path:
    """Where the set is written until it is complete (then renamed to ``out``); kept when interrupted."""
    return out.parent / f".{out.name}.synth-partial"


def _check_resources(out: Path, params: dict, workers: int) -> None:
    """Refuse, before any work, a set whose drawing would not fit in memory or whose frames not on disk."""
    _check_memory(params["size"], workers)
    _check_disk(out, params)


def _check_memory(size: int, workers: int) -> None:
    """Refuse a size whose drawing canvases (one per worker) would not fit in this machine's memory."""
    canvas = render.SUPERSAMPLE * size
    plane_bytes = 4 * render.SUPERSAMPLE**2  # per output pixel: float32 on the supersampled canvas
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    need = workers * render.PEAK_PLANES * plane_bytes * size**2
    if need > memory:
        largest = math.isqrt(memory // (workers * render.PEAK_PLANES * plane_bytes))
        raise ValueError(
            f"synth: size {size} needs about {_gib(need)} of memory to draw ({workers} worker(s), canvas "
            f"{canvas}² px each), more than this machine's {_gib(memory)}; the largest size that fits "
            f"is {largest} (fewer --workers allow more)"
        )


def _check_disk(out: Path, params: dict) -> None:
    """Refuse a set whose frames would not fit on the disk that holds ``out``."""
    size = params["size"]
    frames = params["n_subjects"] * sum(VIDEOS_PER_SUBJECT.values()) * params["frames"]
    disk = frames * size * size * 3  # PNG frames of these images are about 3/4 of their raw size
    existing = out.parent
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    free = shutil.disk_usage(existing).free
    if disk > free:
        raise ValueError(
            f"synth: {frames} frames of {size}×{size} px need up to {_gib(disk)} of disk, {existing} has "
            f"{_gib(free)} free; choose a smaller size, fewer frames or subjects, or another folder"
        )


def _gib(n: float) -> str:
    """``n`` bytes in GiB, for messages."""
    return f"{n / 2**30:,.1f} GiB"


def _finished_videos(partial: Path) -> dict[str, list[dict[str, str]]]:
    """Video folder -> meta rows of every video an earlier, interrupted run finished in ``partial``
    (a line torn by a kill is dropped, and its video redone)."""
    done = {}
    path = partial / _PROGRESS
    text = path.read_text(encoding="utf-8") if path.exists() else ""
    for line in text.splitlines():
        try:
            rows = json.loads(line)
            done[str(Path(rows[0]["path"]).parent)] = rows
        except (ValueError, LookupError, TypeError):
            continue
    atomic_write_text("".join(json.dumps(rows) + "\n" for rows in done.values()), path)
    return done


def _write_videos(root: Path, params: dict, workers: int, progress: bool) -> list[dict[str, str]]:
    """Write every video under ``root`` that an earlier run did not finish (in worker processes when
    workers > 1), noting each in ``root/progress.jsonl``; all meta rows sorted by path."""
    done = _finished_videos(root)
    jobs = [job for job in _jobs(params) if str(_video_folder(job)) not in done]
    for job in jobs:  # frames an interrupted run left of a video it did not finish
        shutil.rmtree(root / _video_folder(job), ignore_errors=True)
    rows = [row for video in done.values() for row in video]
    write = functools.partial(_write_video, str(root), params)
    total = len(jobs) + len(done)

    def describe(job: tuple) -> str:
        return f"video {_video_folder(job)}"

    with (
        report_progress(total, "fas synth", unit="videos", completed=len(done), show=progress) as advance,
        (root / _PROGRESS).open("a") as log,
        WorkerPool(write, workers, initializer=_init_worker, describe=describe) as pool,
    ):
        for video in pool.run(jobs) if workers > 1 else map(write, jobs):
            log.write(json.dumps(video) + "\n")
            log.flush()
            rows += video
            advance()
    return sorted(rows, key=lambda r: r["path"])


def generate(
    out: Path,
    n_subjects: int = 30,
    frames: int = 4,
    size: int = 64,
    seed: int = 0,
    workers: int = 1,
    progress: bool = True,
    dev_subjects: int | None = None,
    test_subjects: int | None = None,
) -> SynthSummary:
    """Write the synthetic FAS data set to ``out`` (see the module docstring) and summarise it.

    ``dev_subjects`` / ``test_subjects`` set the size of those splits (default about 20 % of
    ``n_subjects`` each; 0 leaves a split empty, e.g. for a pool that only trains a teacher); the
    remaining subjects are the training split.
    The set is generated in the sibling folder ``.<out name>.synth-partial`` and renamed into place,
    so ``out`` is either absent/empty or complete. Interrupted (``kdkit.utils.workers.Interrupted``, or a
    KeyboardInterrupt), that folder keeps every finished video and the same call continues from
    there; any other failure removes it. If ``out`` already holds a complete set with the same
    parameters nothing is written (``reused`` is True); if it holds anything else, FileExistsError is
    raised. A set that would not fit in memory or on disk is refused (ValueError) before any work,
    and while one process writes ``out`` another gets ``kdkit.utils.lock.OutputLocked``.
    Output depends only on the parameters (n_subjects, frames, size, seed, split sizes), never on
    ``workers``.
    """
    _check_integers(n_subjects=n_subjects, frames=frames, size=size, seed=seed, workers=workers)
    _check_split_sizes(n_subjects, dev_subjects, test_subjects)
    started = time.perf_counter()
    out = Path(out)
    params = {"n_subjects": n_subjects, "frames": frames, "size": size, "seed": seed}
    # Only when asked for, so sets written before these options existed keep their parameters.
    params |= {
        k: v for k, v in (("dev_subjects", dev_subjects), ("test_subjects", test_subjects)) if v is not None
    }
    info = {"format": FORMAT, "version": VERSION, "params": params, "videos_per_subject": VIDEOS_PER_SUBJECT}
    with exclusive(out):
        found = _existing(out, info, started)
        if found is not None:
            return found
        _check_resources(out, params, workers)
        counts = _write_set(out, info, workers, progress)
    return SynthSummary(
        out, counts["frames"], counts["videos"], counts["subjects"], False, time.perf_counter() - started
    )


def _check_integers(**values: int) -> None:
    """Refuse a parameter of `generate` that is not an integer of at least its `_MINIMUM`."""
    for name, value in values.items():
        low = _MINIMUM[name]
        if not isinstance(value, int) or value < low:
            raise ValueError(f"synth: {name} must be an integer >= {low}, got {value!r}")


def _check_split_sizes(n_subjects: int, dev_subjects: int | None, test_subjects: int | None) -> None:
    """Refuse split sizes that are not counts, or that leave no subject for training."""
    for name, value in (("dev_subjects", dev_subjects), ("test_subjects", test_subjects)):
        if value is not None and (not isinstance(value, int) or value < 0):
            raise ValueError(f"synth: {name} must be an integer >= 0 (or unset), got {value!r}")
    n_dev, n_test = _split_sizes(n_subjects, dev_subjects, test_subjects)
    if n_subjects - n_dev - n_test < 1:
        raise ValueError(
            f"synth: {n_dev} dev + {n_test} test subjects leave none of the {n_subjects} for training"
        )


def _write_set(out: Path, info: dict, workers: int, progress: bool) -> dict:
    """Write the set of ``info`` into its partial folder, continuing one an interrupted run left, then
    move it to ``out``; its counts. Interrupted, the folder is kept; any other failure removes it."""
    partial = _partial_folder(out)
    if partial.exists() and _read_json(partial / "synth.json") != info:
        shutil.rmtree(partial)  # an interrupted set of other parameters
    partial.mkdir(exist_ok=True)
    atomic_write_text(json.dumps(info, indent=2) + "\n", partial / "synth.json")
    try:
        rows = _write_videos(partial, info["params"], workers, progress)
    except KeyboardInterrupt as exc:  # kept: the same call continues it
        total = info["params"]["n_subjects"] * sum(VIDEOS_PER_SUBJECT.values())
        raise Interrupted(
            f"{exc or 'interrupted'}; {len(_finished_videos(partial))} of {total} videos are written "
            f"and kept in {partial}",
            getattr(exc, "signum", signal.SIGINT),
        ) from None
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return _publish(partial, out, info, rows)


def _publish(partial: Path, out: Path, info: dict, rows: list[dict[str, str]]) -> dict:
    """Complete the set in ``partial`` (counts into synth.json, then meta.csv) and rename it to ``out``;
    its counts."""
    counts = _counts(rows)
    atomic_write_text(json.dumps({**info, "counts": counts}, indent=2) + "\n", partial / "synth.json")
    (partial / _PROGRESS).unlink()
    with atomic_open(partial / "meta.csv", "w") as fh:  # last: its presence marks a complete set
        writer = csv.DictWriter(fh, fieldnames=META_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    if out.exists():
        out.rmdir()  # empty (checked by `_existing`); rename needs the name free
    partial.rename(out)
    return counts


def _read_json(path: Path) -> object:
    """The JSON in `path`, or None when it is missing or unreadable."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
