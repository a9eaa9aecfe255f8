"""`kdkit fas prepare DATASET --root RAW --out DIR [...]`: arguments and entry point."""

from __future__ import annotations

import argparse
from pathlib import Path

from kdkit.data.datasets import DataError
from kdkit.data.frame_store import store_summary, update_store
from kdkit.utils.workers import Interrupted
from kdkit_fas.layouts import LAYOUTS, LayoutError
from kdkit_fas.prepare import prepare
from kdkit_fas.sampling import CONVENTIONS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the `fas prepare` arguments to `parser`."""
    parser.add_argument("dataset", help=f"data set layout: {', '.join(LAYOUTS)}")
    parser.add_argument("--root", type=Path, required=True, help="the raw data set folder")
    parser.add_argument("--out", type=Path, required=True, help="output folder (frames/ and manifest.csv)")
    parser.add_argument(
        "--protocol", help="OULU-NPU 1-4; 'holdout' (dev from train) for casia/msu/celeba_spoof"
    )
    parser.add_argument("--fold", type=int, help="OULU-NPU protocol 3/4 fold, 1-6")
    parser.add_argument(
        "--frames-per-video", type=int, default=None, help="frames sampled per video (default 8; flip: 2)"
    )
    parser.add_argument(
        "--sampling",
        choices=CONVENTIONS,
        default="uniform",
        help="which frames: uniform (evenly spread), ssdg (6 + j*floor(n/K)), flip (6 and 6 + floor(n/2))",
    )
    parser.add_argument("--size", type=int, default=224, help="side of the square face crops in pixels")
    parser.add_argument("--workers", type=int, default=None, help="processes (default: all CPU cores)")
    parser.add_argument(
        "--detector",
        default="auto",
        help="for videos without face-location files: auto (MTCNN when installed, else Haar), mtcnn, "
        "haar, full (whole frame) or a YuNet .onnx path",
    )
    parser.add_argument(
        "--scale",
        type=float,
        default=1.2,
        help="side of the square crop over the face box's longer side (default 1.2)",
    )
    parser.add_argument(
        "--replace",
        action="store_true",
        help="--out holds frames prepared with other settings: delete them and prepare again",
    )
    parser.add_argument(
        "--store",
        action="store_true",
        help="also write the frames into OUT/frames.kdstore, which training reads with no decoding "
        "(as `kdkit store OUT`; an up-to-date store is kept)",
    )
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def run(args: argparse.Namespace) -> int:
    """Prepare the data set (and with `--store` its frame store): 0 when every video was prepared,
    1 when some could not be read or gave no face (the report names them; the others are prepared
    and stored).
    Bad input raises kdkit's errors (exit status 2) and an interruption `Interrupted` (128 +
    signal); `kdkit.cli.main` reports them."""
    try:
        report = prepare(
            args.dataset,
            args.root,
            args.out,
            protocol=args.protocol,
            fold=args.fold,
            frames_per_video=args.frames_per_video,
            sampling=args.sampling,
            size=args.size,
            workers=args.workers,
            progress=not args.no_progress,
            detector=args.detector,
            scale=args.scale,
            replace=args.replace,
        )
    except LayoutError as exc:
        raise DataError(str(exc)) from None
    except Interrupted as exc:
        raise Interrupted(f"{exc}; continue with: {args.command_line}", exc.signum) from None
    print(report.summary())
    if args.store:
        store, written = update_store(args.out, show=not args.no_progress)
        print(store_summary(store, written))
    return 1 if report.failed else 0
