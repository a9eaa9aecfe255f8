"""`kdkit store FOLDER`: decode a folder of same-size images once into a frame store."""

from __future__ import annotations

import argparse
from pathlib import Path

from kdkit.errors import UsageError
from kdkit.frame_store import STORE_DIR, FrameStore, StoreError, image_files, write_store
from kdkit.runlog import console, output


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register `kdkit store`."""
    p = sub.add_parser(
        "store",
        help="decode the images under a folder once into a memory-mapped frame store (no decoding per epoch)",
        description=(
            "Write every image under FOLDER as one uint8 array (FOLDER/frames.kdstore by default), "
            "which the image data sets read instead of decoding files on every epoch (docs/performance.md)."
        ),
    )
    p.add_argument("folder", type=Path, help="the folder of images, e.g. a data set's root")
    p.add_argument(
        "--out", type=Path, help=f"the store's folder (default: FOLDER/{STORE_DIR}, where data sets find it)"
    )
    p.add_argument(
        "--size", type=int, help="resize every image to SIZE × SIZE (the recipe's data.image_size)"
    )
    p.add_argument("--force", action="store_true", help="rewrite a store that is up to date")
    p.set_defaults(func=cmd_store)


def cmd_store(args: argparse.Namespace) -> int:
    """`kdkit store FOLDER`: write (or refresh) the folder's frame store."""
    if not args.folder.is_dir():
        raise UsageError(f"FOLDER: {args.folder} is not a folder")
    if args.size is not None and args.size < 1:
        raise UsageError(f"--size: expected a positive integer, got {args.size}")
    out = args.out or args.folder / STORE_DIR
    paths = image_files(args.folder, exclude=out)
    if not args.force and _up_to_date(out, args.folder, paths, args.size):
        output.print(f"{out}: up to date ({len(paths)} frames); --force rewrites it")
        return 0
    store = write_store(paths, out, args.folder, size=args.size)
    height, width = store.shape[1:3]
    gib = store.shape[0] * height * width * 3 / 2**30
    output.print(f"{out}: {len(store)} frames of {width}×{height} px, {gib:.2f} GiB")
    return 0


def _up_to_date(out: Path, root: Path, paths: list[Path], size: int | None) -> bool:
    """Whether the store at `out` holds exactly `paths`, unchanged, at `size`."""
    try:
        store = FrameStore(out)
    except StoreError as exc:
        if out.exists():
            console.print(f"[yellow]{exc}: writing it again[/yellow]")
        return False
    same_files = sorted(store.rows) == sorted(path.relative_to(root).as_posix() for path in paths)
    return same_files and store.size == size and not store.stale(root)
