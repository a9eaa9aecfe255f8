"""How fast `kdkit fas prepare` turns raw videos into face crops: videos/s and frames/s.

Writes N synthetic videos of the real sets' size and codec, laid out as the data sets store
them, and times `prepare` on them with each face detector asked for:

- 'oulu':   1920x1080 H.264 in `.avi`, OULU-NPU's tree (`Train_files/<P>_<S>_<UU>_<F>.avi`,
            no eye files, so the detector runs);
- 'replay': 1280x720 H.264 in `.mov`, Replay-Attack's tree (`train/real/client<NNN>_...mov`).

H.264 is written by OpenCV when its build has an encoder (fourcc 'avc1'/'H264'), else by the
`ffmpeg` command with libx264 when it is installed, else OpenCV's 'mp4v' (MPEG-4 Part 2, cheaper
to decode than H.264); the JSON names the codec used. Each frame is a noisy background with a
moving face-like ellipse, so the encoder cannot collapse the frames.

    python benchmarks/prepare_throughput.py --videos 8 --seconds 10 --workers 2

prints one JSON object: per set and detector, videos/s, source frames/s (frames in the videos /
wall time), crops/s and the CPU seconds spent, with the machine and settings. Results are in
docs/fas.md, "prepare throughput".
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
from kdkit_fas.prepare import prepare

SETS = {"oulu": ((1920, 1080), ".avi"), "replay": ((1280, 720), ".mov")}


def frame(width: int, height: int, index: int, background: np.ndarray) -> np.ndarray:
    """BGR frame `index`: the background shifted, a skin-coloured ellipse with two eyes."""
    image = np.roll(background, 3 * index, axis=1)
    cx, cy = width // 2 + (index % 40), height // 2
    axes = (max(1, width // 10), max(1, height // 5))
    cv2.ellipse(image, (cx, cy), axes, 0, 0, 360, (120, 160, 210), -1)
    for dx in (-axes[0] // 2, axes[0] // 2):
        cv2.circle(image, (cx + dx, cy - axes[1] // 4), max(1, axes[0] // 8), (30, 30, 30), -1)
    return image


def _opencv_h264(path: Path, fps: int, size: tuple[int, int]) -> cv2.VideoWriter | None:
    for fourcc in ("avc1", "H264"):
        writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*fourcc), fps, size)
        if writer.isOpened():
            return writer
    return None


def choose_codec(folder: Path, fps: int) -> str:
    """'h264 (opencv)', 'h264 (ffmpeg libx264)' or 'mp4v (opencv)': the first that writes here."""
    probe = folder / "probe.avi"
    writer = _opencv_h264(probe, fps, (64, 48))
    if writer is not None:
        writer.release()
        probe.unlink(missing_ok=True)
        return "h264 (opencv)"
    ffmpeg = shutil.which("ffmpeg")
    if (
        ffmpeg
        and "libx264"
        in subprocess.run([ffmpeg, "-hide_banner", "-encoders"], capture_output=True, text=True).stdout
    ):
        return "h264 (ffmpeg libx264)"
    return "mp4v (opencv)"


def write_video(path: Path, size: tuple[int, int], frames: int, fps: int, codec: str) -> None:
    """Write `frames` synthetic frames of `size` to `path` with `codec` (see `choose_codec`)."""
    width, height = size
    background = cv2.resize(
        np.random.default_rng(len(path.name)).integers(
            0, 255, (height // 8 + 1, width // 8 + 1, 3), np.uint8
        ),
        size,
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    if codec.startswith("h264 (ffmpeg"):
        command = ["ffmpeg", "-y", "-loglevel", "error", "-f", "rawvideo", "-pix_fmt", "bgr24"]
        command += ["-s", f"{width}x{height}", "-r", str(fps), "-i", "-", "-c:v", "libx264"]
        command += ["-preset", "veryfast", "-pix_fmt", "yuv420p", str(path)]
        encoder = subprocess.Popen(command, stdin=subprocess.PIPE)
        for i in range(frames):
            encoder.stdin.write(frame(width, height, i, background).tobytes())
        encoder.stdin.close()
        if encoder.wait() != 0:
            raise OSError(f"ffmpeg could not write {path}")
        return
    writer = _opencv_h264(path, fps, size) if codec.startswith("h264") else None
    writer = writer or cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, size)
    for i in range(frames):
        writer.write(frame(width, height, i, background))
    writer.release()


def video_paths(name: str, root: Path, count: int) -> list[Path]:
    """`count` video paths in data set `name`'s tree (real file names, `SETS` extension)."""
    ext = SETS[name][1]
    if name == "oulu":  # phone, session, user, file (1 = live)
        return [
            root / "Train_files" / f"{1 + i % 6}_{1 + i // 6 % 3}_{1 + i // 18:02d}_1{ext}"
            for i in range(count)
        ]
    return [
        root / "train" / "real" / f"client{1 + i // 4:03d}_session01_webcam_authenticate_"
        f"{('controlled', 'adverse')[i % 2]}_{1 + i // 2 % 2}{ext}"
        for i in range(count)
    ]


def _cpu_seconds() -> float:
    """CPU time of this process and its finished worker processes (user + system): unlike wall
    time, it does not grow when other programs share the cores."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def run(args: argparse.Namespace) -> dict:
    """Generate the sets and time `prepare` on each with each detector; the JSON report."""
    work = Path(args.work or tempfile.mkdtemp(prefix="prepare-throughput-"))
    work.mkdir(parents=True, exist_ok=True)
    codec = choose_codec(work, args.fps)
    frames = max(1, round(args.seconds * args.fps))
    report = {
        "machine": {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine()},
        "opencv": cv2.__version__,
        "codec": codec,
        "settings": {
            "videos": args.videos,
            "frames_per_source_video": frames,
            "fps": args.fps,
            "workers": args.workers,
            "frames_per_video": args.frames_per_video,
            "sampling": args.sampling,
            "size": args.size,
        },
        "results": [],
    }
    for name in args.sets:
        size = tuple(args.resolution) if args.resolution else SETS[name][0]
        root = work / name
        for split in ("devel", "test") if name == "replay" else ():
            (root / split / "real").mkdir(parents=True, exist_ok=True)  # the tree has all three splits
        for path in video_paths(name, root, args.videos):
            if not path.is_file():
                write_video(path, size, frames, args.fps, codec)
        for detector in args.detectors:
            out = work / f"out-{name}-{detector}"
            shutil.rmtree(out, ignore_errors=True)
            start, cpu = time.perf_counter(), _cpu_seconds()
            result = prepare(
                name,
                root,
                out,
                frames_per_video=args.frames_per_video,
                sampling=args.sampling,
                size=args.size,
                workers=args.workers,
                progress=False,
                detector=detector,
            )
            seconds, cpu = time.perf_counter() - start, _cpu_seconds() - cpu
            report["results"].append(
                {
                    "set": name,
                    "resolution": f"{size[0]}x{size[1]}",
                    "detector": detector,
                    "seconds": round(seconds, 2),
                    "cpu_seconds": round(cpu, 2),
                    "videos_per_s": round(args.videos / seconds, 3),
                    "source_frames_per_s": round(args.videos * frames / seconds, 1),
                    "crops_per_s": round(result.frames / seconds, 2),
                    "no_face_frames": result.no_face_frames,
                    "failed": len(result.failed),
                }
            )
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)
    return report


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--videos", type=int, default=8, help="videos per set")
    parser.add_argument("--seconds", type=float, default=10.0, help="length of each video")
    parser.add_argument("--fps", type=int, default=30)
    parser.add_argument("--sets", nargs="+", choices=SETS, default=list(SETS))
    parser.add_argument(
        "--resolution", type=int, nargs=2, metavar=("W", "H"), help="override every set's size"
    )
    parser.add_argument(
        "--detectors", nargs="+", default=["full", "auto"], help="`prepare --detector` values"
    )
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--frames-per-video", type=int, default=None)
    parser.add_argument("--sampling", default="uniform")
    parser.add_argument("--size", type=int, default=224, help="crop side")
    parser.add_argument(
        "--work", help="keep the videos and outputs in this folder (default: a temporary one)"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print its JSON report."""
    print(json.dumps(run(parse_args(argv)), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
