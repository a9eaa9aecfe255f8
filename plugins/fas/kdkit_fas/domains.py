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
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from kdkit.data import DataError
from kdkit.recipe import DataSpec
from kdkit_fas.data import AUGMENT_OPTIONS, FrameDataset, augmentation, frames_from_manifest, store_roots
from kdkit_fas.prepare import SETTINGS_FILE

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
OPTIONS = {"protocol", "roots", "store", *AUGMENT_OPTIONS}


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


def _roots(spec: DataSpec, protocol: str) -> dict[str, Path]:
    """The prepared folder of every set the protocol uses, checked to exist and match its letter."""
    roots = spec.options.get("roots") or {}
    if not isinstance(roots, dict) or set(roots) - set(SETS):
        raise DataError(
            f"data.options.roots: expected a mapping of the letters {', '.join(SETS)} to folders made by "
            f"`kdkit fas prepare`, got {roots!r}"
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
    for letter, root in found.items():
        _check_prepared(letter, root)
    return found


def _check_prepared(letter: str, root: Path) -> None:
    """`root` exists and, where `kdkit fas prepare` recorded its settings, holds set `letter`
    prepared with the default protocol (every video in its official splits)."""
    key, (layout, name, _) = f"data.options.roots.{letter}", SETS[letter]
    if not root.is_dir():
        raise DataError(
            f"{key}: {root} does not exist (expected {name} prepared by `kdkit fas prepare {layout}`)"
        )
    settings_file = root / SETTINGS_FILE
    if not settings_file.is_file():
        return  # prepared before settings were recorded: the manifest is all there is to check
    try:
        settings = json.loads(settings_file.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise DataError(
            f"{key}: {settings_file} is not a readable `kdkit fas prepare` settings file ({exc})"
        ) from None
    if settings.get("dataset") != layout or settings.get("protocol") not in (None, "official"):
        raise DataError(
            f"{key}: {root} holds {settings.get('dataset')!r} prepared with protocol "
            f"{settings.get('protocol')!r} ({settings_file}); the letter {letter} needs {name} prepared "
            f"with its default protocol: `kdkit fas prepare {layout} --root RAW --out DIR`"
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
