"""`kdkit store FOLDER`: decode a folder of same-size images once into a frame store, or verify one."""

from __future__ import annotations

import argparse
from pathlib import Path

from kdkit.data.frame_store import STORE_DIR, store_summary, update_store, verify_store
from kdkit.errors import UsageError
from kdkit.utils.runlog import output
from kdkit.utils.workers import Interrupted


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
    p.add_argument(
        "--verify",
        action="store_true",
        help="write nothing; read the whole store against the checksums written with it, and check "
        "the images under FOLDER against its index (exit status 2 when it is damaged or out of date)",
    )
    p.set_defaults(func=cmd_store)


def cmd_store(args: argparse.Namespace) -> int:
    """`kdkit store FOLDER`: write (or refresh) the folder's frame store, or with --verify check it."""
    if not args.folder.is_dir():
        raise UsageError(f"FOLDER: {args.folder} is not a folder")
    if args.size is not None and args.size < 1:
        raise UsageError(f"--size: expected a positive integer, got {args.size}")
    if args.verify:
        if args.force or args.size is not None:
            raise UsageError(
                "--verify only reads the store: give it FOLDER (and --out), not --force or --size"
            )
        output.print(verify_store(args.folder, args.out), soft_wrap=True)
        return 0
    try:
        store, written = update_store(args.folder, args.out, size=args.size, force=args.force)
    except Interrupted as exc:
        out = args.out or args.folder / STORE_DIR
        raise Interrupted(
            f"{exc}; {out} is as it was (no half-written store); write it with: {args.command_line}",
            exc.signum,
        ) from None
    output.print(store_summary(store, written) + ("" if written else "; --force rewrites it"), soft_wrap=True)
    return 0
