"""`fas_domains`: several prepared data sets in one recipe, by the cross-domain protocols (OCIM).

Letters: O = OULU-NPU, C = CASIA-FASD, I = Idiap Replay-Attack, M = MSU-MFSD. A protocol trains on
its source sets and tests on the left-out target (`O_C_I_to_M`: train on O, C and I, test on M;
SSAN's names, `data_merge.py`; also written `O&C&I->M`). Each set is a folder made by
`kdkit fas prepare` with its default protocol (every video, official splits), given in
`data.options.roots`.

Which data each side uses follows SSDG (Jia et al., CVPR 2020, `generate_label.py`), which FLIP
follows too: a source trains on its official train and test splits, never its dev split; the
target is tested on its train and test splits (SSDG's `all_label.json`). One deviation: SSDG
picks its checkpoint and threshold on the target's test scores; here 'val', which fixes both, is
held-out source data, the sources' official dev splits (OULU-NPU Dev, Replay-Attack devel), so no
target data is seen before the test. Every protocol has O or I among its sources, so a dev split
always exists (CASIA-FASD and MSU-MFSD ship none). The target-EER HTER published code reports
is kept apart, in the evaluator's optimistic section.

Every record gets its `domain` (the letter); video and subject ids are prefixed with it
(`O:1_1_01_1`), so ids of different sets never merge.

Every set the protocol uses must be prepared alike (`FRAME_SETTINGS` of its `prepare.json`: frame
sampling, frames per video, crop size, scale, image format; the detector that cropped its frames,
`prepare.cropping_detector`): otherwise the domains differ
by how kdkit made their frames as well as by their data, and a set tested at another crop size or
frame count than the sources trained on measures that too. Sets prepared differently are refused,
naming each one's settings, unless `data.options.mixed_preparation: true`.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from kdkit.config.schema import DataSpec
from kdkit.data.datasets import DataError
from kdkit_fas.data import (
    AUGMENT_OPTIONS,
    FrameDataset,
    augmentation,
    frames_from_manifest,
    missing_manifest,
    store_roots,
)
from kdkit_fas.prepare import SETTINGS_FILE, SINCE_0_2, cropping_detector, read_settings

# letter -> (`kdkit fas prepare` layout, data set name, has an official dev split)
SETS = {
    "O": ("oulu", "OULU-NPU", True),
    "C": ("casia", "CASIA-FASD", False),
    "I": ("replay", "Replay-Attack", True),
    "M": ("msu", "MSU-MFSD", False),
}
# name -> (source letters, target letter)
PROTOCOLS = {
    "O_C_I_to_M": ("OCI", "M"),
    "O_M_I_to_C": ("OMI", "C"),
    "O_C_M_to_I": ("OCM", "I"),
    "I_C_M_to_O": ("ICM", "O"),
    "M_I_to_C": ("MI", "C"),
    "M_I_to_O": ("MI", "O"),
}
# split -> which official splits of whose sets (SSDG convention; 'val' is this module's deviation)
SPLIT_TABLE = {
    "train": ("sources", ("train", "test")),
    "val": ("sources", ("dev",)),
    "test": ("target", ("train", "test")),
}
OPTIONS = {"protocol", "roots", "store", "mixed_preparation", *AUGMENT_OPTIONS}
# the `kdkit fas prepare` settings that decide what a set's frames look like and how many a video gives
FRAME_SETTINGS = ("sampling", "frames_per_video", "size", "scale", "image_format", "detector")


def parse_protocol(name: Any) -> str:
    """The canonical name of a protocol given as `O_C_I_to_M`, `O&C&I->M` or `O&C&I→M` (any order
    and case of the source letters); a DataError naming the valid ones otherwise."""
    text = str(name).strip().upper().replace("→", "->").replace("_TO_", "->")
    sources, arrow, target = text.partition("->")
    letters = re.sub(r"[\s&_,+]", "", sources)
    for canonical, (want, want_target) in PROTOCOLS.items():
        if arrow and sorted(letters) == sorted(want) and target.strip() == want_target:
            return canonical
    raise DataError(
        f"data.options.protocol: unknown protocol {name!r}; expected one of {', '.join(PROTOCOLS)} "
        "(or written like 'O&C&I->M')"
    )


def split_sets(protocol: str, split: str) -> list[tuple[str, tuple[str, ...]]]:
    """`(letter, official splits)` that `split` ('train', 'val', 'test') of `protocol` reads."""
    sources, target = PROTOCOLS[protocol]
    side, official = SPLIT_TABLE[split]
    if side == "target":
        return [(target, official)]
    return [(letter, official) for letter in sources if SETS[letter][2] or "dev" not in official]


def _letters() -> str:
    """The letters and their data sets, for messages: 'O (OULU-NPU), C (CASIA-FASD), ...'."""
    return ", ".join(f"{letter} ({name})" for letter, (_, name, _) in SETS.items())


def _roots(spec: DataSpec, protocol: str) -> dict[str, Path]:
    """The prepared folder of every set the protocol uses, checked to exist, match its letter and,
    unless `data.options.mixed_preparation`, to be prepared alike."""
    roots = spec.options.get("roots") or {}
    if not isinstance(roots, dict):
        raise DataError(
            f"data.options.roots: expected a mapping of the letters {_letters()} to folders made by "
            f"`kdkit fas prepare`, got {roots!r}"
        )
    for letter in roots:
        if letter not in SETS:
            raise DataError(
                f"data.options.roots.{letter}: unknown letter {letter!r}; expected one of {_letters()}"
            )
    needed = "".join(PROTOCOLS[protocol])
    missing = [letter for letter in needed if not roots.get(letter)]
    if missing:
        lines = " ".join(f"--set data.options.roots.{k}=DIR" for k in missing)
        layouts = "|".join(SETS[k][0] for k in missing)
        raise DataError(
            f"data.options.roots: protocol {protocol} needs the prepared folders of "
            f"{', '.join(f'{k} ({SETS[k][1]})' for k in missing)}; give them with {lines}, each DIR "
            f"made by `kdkit fas prepare {layouts} --root RAW --out DIR`"
        )
    found = {letter: Path(str(roots[letter])).expanduser() for letter in needed}
    settings = {letter: _check_prepared(letter, root) for letter, root in found.items()}
    if not _mixed_preparation(spec.options):
        _check_prepared_alike(protocol, found, settings)
    return found


def _check_prepared(letter: str, root: Path) -> dict | None:
    """`root` exists, holds a manifest and, where `kdkit fas prepare` recorded its settings, set
    `letter` prepared with the default protocol (every video in its official splits); returns
    those settings (None for a folder prepared before they were recorded)."""
    key, (layout, name, _) = f"data.options.roots.{letter}", SETS[letter]
    if not root.is_dir():
        raise DataError(
            f"{key}: {root} does not exist (expected {name} prepared by `kdkit fas prepare {layout}`)"
        )
    if not (root / "manifest.csv").is_file():
        raise DataError(f"{key}: {missing_manifest(root, layout, key)} ({letter} is {name})")
    try:
        settings = read_settings(root)
    except ValueError as exc:
        raise DataError(f"{key}: {exc}") from None
    if settings is None:
        return None  # prepared before settings were recorded: the manifest is all there is to check
    if settings.get("dataset") != layout or settings.get("protocol") not in (None, "official"):
        raise DataError(
            f"{key}: {root} holds {settings.get('dataset')!r} prepared with protocol "
            f"{settings.get('protocol')!r} ({root / SETTINGS_FILE}); the letter {letter} needs {name} "
            f"prepared with its default protocol: `kdkit fas prepare {layout} --root RAW --out DIR`"
        )
    # compare the detector that cropped the frames, not the one named for videos it never cropped
    return {**SINCE_0_2, **settings, "detector": cropping_detector(root, settings)}


def _mixed_preparation(options: dict) -> bool:
    """`data.options.mixed_preparation`, checked to be true or false (the default)."""
    value = options.get("mixed_preparation", False)
    if not isinstance(value, bool):
        raise DataError(
            "data.options.mixed_preparation: expected true (use sets prepared with different settings "
            f"side by side) or false (the default: refuse them), got {value!r}"
        )
    return value


def _check_prepared_alike(protocol: str, roots: dict[str, Path], settings: dict[str, dict | None]) -> None:
    """Refuse sets whose recorded FRAME_SETTINGS differ, listing each set's differing settings (a
    set cropped from its annotation files alone, detector None, agrees with any detector)."""
    known = {letter: found for letter, found in settings.items() if found is not None}
    differ = [
        key
        for key in FRAME_SETTINGS
        if len({found.get(key) for found in known.values()} - ({None} if key == "detector" else set())) > 1
    ]
    if not differ:
        return
    each = "; ".join(
        f"{letter} ({roots[letter]}): " + ", ".join(f"{key} {found.get(key)!r}" for key in differ)
        for letter, found in known.items()
    )
    raise DataError(
        f"data.options.roots: the sets of {protocol} were prepared with different {', '.join(differ)}: "
        f"{each}. Domains should differ by their data, not by how their frames were made: prepare "
        "every set with the same `kdkit fas prepare` settings (--sampling, --frames-per-video, --size, "
        "--scale, --detector), or set data.options.mixed_preparation: true to use them as they are"
    )


def _records(letter: str, root: Path, official: tuple[str, ...]) -> list[dict]:
    """The frames of `official` splits of one set, tagged with their domain (absolute paths)."""
    rows = [row for split in official for row in frames_from_manifest(root, split)]
    return [
        row
        | {
            "path": str(root / row["path"]),
            "video": f"{letter}:{row['video']}",
            "subject": f"{letter}:{row['subject']}" if row["subject"] else "",
            "domain": letter,
        }
        for row in rows
    ]


def fas_domains(split: str, spec: DataSpec) -> FrameDataset:
    """One split of a cross-domain protocol (`data.options.protocol`, `data.options.roots`); see
    the module docstring for which data each split holds."""
    unknown = sorted(set(spec.options) - OPTIONS)
    if unknown:
        raise DataError(
            f"data.options: unknown option(s) {unknown} for 'fas_domains'; valid: {sorted(OPTIONS)}"
        )
    if spec.root:
        raise DataError(
            "data.root: fas_domains reads data.options.roots (one folder per set); set data.root: null"
        )
    if "protocol" not in spec.options:
        raise DataError(f"data.options.protocol: missing; expected one of {', '.join(PROTOCOLS)}")
    protocol = parse_protocol(spec.options["protocol"])
    split = {"dev": "val"}.get(split, split)
    if split not in SPLIT_TABLE:
        raise DataError(f"fas_domains: unknown split {split!r}; expected one of {', '.join(SPLIT_TABLE)}")
    roots = _roots(spec, protocol)
    sets = split_sets(protocol, split)
    records = [record for letter, official in sets for record in _records(letter, roots[letter], official)]
    side = "target" if split == "test" else "source"
    origin = f"{side} {'+'.join(sets[0][1])}: {', '.join(letter for letter, _ in sets)}"
    common = Path(os.path.commonpath([str(roots[letter]) for letter, _ in sets]))
    stores = store_roots(spec.options, [roots[letter] for letter, _ in sets])
    return FrameDataset(
        records,
        common,
        spec.image_size,
        spec.mean,
        spec.std,
        split == "train",
        origin,
        store_roots=stores,
        augment=augmentation(spec.options),
    )
