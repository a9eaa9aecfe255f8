"""Indexers for the on-disk layouts of public face anti-spoofing (FAS) data sets.

Each indexer walks a raw download (videos, protocol files, face-location files) and returns one
`VideoRecord` per video (or per image / frame folder for image sets). Nothing is decoded here.
The layouts, names and protocol-file formats follow docs/fas.md ("Data sets"), which also states
the choices made where a data set is ambiguous, and the sources each rule was read from.

Conventions shared by every indexer:
- `label` 1 = bona fide (live), 0 = attack (CelebA-Spoof's inverted index 43 is converted).
- `attack_type` is 'live' for bona fide, else '<species>' or '<species>/<instrument>'
  (e.g. 'print/1', 'replay/ipad'); evaluators group species by the part before '/'.
- `split` is 'train', 'dev' or 'test'; `video` is unique within the returned list.
"""

from __future__ import annotations

import json
import re
import warnings
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from kdkit.data.csvfile import read_csv, read_rows
from kdkit.data.datasets import DataError
from kdkit.deploy.inputs import IMAGE_EXTS, VIDEO_EXTS  # the files `kdkit predict` reads too
from kdkit.registry import did_you_mean
from kdkit_fas import faces

SPLIT_ALIASES = {
    "train": "train",
    "dev": "dev",
    "devel": "dev",
    "val": "dev",
    "valid": "dev",
    "validation": "dev",
    "test": "test",
}


class LayoutError(ValueError):
    """A data set tree, protocol file or argument that does not match the expected layout."""


@dataclass(frozen=True)
class VideoRecord:
    """One video (or image, or frame folder) of a data set, with its label and split.

    `face` is the data set's own face-location file for it (None: use a face detector) and
    `face_format` names how to read it: 'oulu_eyes', 'xywh', 'msu', 'siw', 'celeba_bb', 'detect'
    (no file; run a detector) or 'full' (the image already is a face crop). `upside_down` marks MSU
    videos that are stored upside down: they are turned by 180 degrees before cropping, and their
    face boxes (which refer to the frames as stored) with them. `max_frames` limits frame
    sampling to the first frames of the video (SiW protocol 1 trains on the first 60).
    """

    path: Path
    video: str
    subject: str
    label: int
    attack_type: str
    split: str
    face: Path | None = None
    face_format: str = "detect"
    upside_down: bool = False
    max_frames: int | None = None


def canonical_split(name: str) -> str:
    """Map a split name or alias ('val', 'devel', ...) to 'train', 'dev' or 'test'."""
    try:
        return SPLIT_ALIASES[name.strip().lower()]
    except KeyError:
        raise LayoutError(f"unknown split {name!r}; expected one of {', '.join(SPLIT_ALIASES)}") from None


def natural_key(text: str) -> tuple:
    """Sort key that orders '2' before '10' ('frame2.png' < 'frame10.png')."""
    return tuple(int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text))


def image_files(folder: Path) -> list[Path]:
    """The image files directly inside `folder`, in natural order."""
    files = [p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTS]
    return sorted(files, key=lambda p: natural_key(p.name))


def _read_rows(path: Path) -> list[tuple[int, list[str]]]:
    """`(line number, cells)` of the non-empty rows of a protocol or list file, however a spreadsheet
    saved it (BOM, CRLF, `,`/`;`/tab, quotes; `kdkit.data.csvfile.read_rows`)."""
    try:
        return read_rows(path)
    except DataError as exc:
        raise LayoutError(str(exc)) from None


def _require_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise LayoutError(f"{what}: expected a folder at {path}")
    return path


def _videos_in(folder: Path) -> list[Path]:
    files = [p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in VIDEO_EXTS]
    return sorted(files, key=lambda p: natural_key(p.name))


def _existing(*candidates: Path) -> Path | None:
    return next((p for p in candidates if p.is_file()), None)


def _face(candidates: Iterable[Path], fmt: str) -> dict:
    """`face`/`face_format` fields: the first existing annotation file, else the detector."""
    found = _existing(*candidates)
    return {"face": found, "face_format": fmt} if found else {"face": None, "face_format": "detect"}


def _warn_skipped(dataset: str, skipped: list[Path], why: str) -> None:
    if skipped:
        warnings.warn(
            f"{dataset}: skipped {len(skipped)} file(s) {why}, e.g. {skipped[0]}", UserWarning, stacklevel=3
        )


def _no_protocol(dataset: str, protocol: object, fold: object) -> None:
    if protocol is not None or fold is not None:
        raise LayoutError(f"{dataset} has no protocols or folds (got protocol={protocol!r}, fold={fold!r})")


def _official_or_holdout(dataset: str, protocol: object, fold: object) -> bool:
    """Parse the protocol of a data set without a dev split; True means 'holdout'."""
    if fold is not None:
        raise LayoutError(f"{dataset} has no folds (got fold={fold!r})")
    if protocol in (None, "official", "holdout"):
        return protocol == "holdout"
    raise LayoutError(f"unknown {dataset} protocol {protocol!r}; expected 'official' (default) or 'holdout'")


def carve_dev(records: list[VideoRecord]) -> list[VideoRecord]:
    """Move every 5th train subject (natural order: the 5th, 10th, ...) and its videos to 'dev'.

    The fixed, subject-disjoint rule used by the 'holdout' protocol of data sets that ship no dev
    split (CASIA-FASD, MSU-MFSD, CelebA-Spoof).
    """
    subjects = sorted({r.subject for r in records if r.split == "train"}, key=natural_key)
    dev = set(subjects[4::5])
    return [_replace_split(r, "dev") if r.split == "train" and r.subject in dev else r for r in records]


def _replace_split(record: VideoRecord, split: str) -> VideoRecord:
    return VideoRecord(**{**record.__dict__, "split": split})


# --- OULU-NPU -----------------------------------------------------------------------------------

OULU_GROUPS = {"Train": "train", "Dev": "dev", "Test": "test"}
OULU_ATTACKS = {"1": "live", "2": "print/1", "3": "print/2", "4": "replay/1", "5": "replay/2"}
_OULU_STEM = re.compile(r"^([1-6])_([1-3])_(\d{2})_([1-5])$")


def _int_choice(value: object, what: str, choices: range) -> int:
    try:
        number = int(str(value).strip())
    except ValueError:
        number = None
    if number not in choices:
        raise LayoutError(f"unknown {what} {value!r}; expected one of {', '.join(map(str, choices))}")
    return number


def _oulu_protocol_file(root: Path, group: str, protocol: int, fold: int | None) -> Path:
    name = f"{group}.txt" if fold is None else f"{group}_{fold}.txt"
    path = root / "Protocols" / f"Protocol_{protocol}" / name
    if not path.is_file():
        raise LayoutError(f"OULU-NPU protocol {protocol} file missing: expected {path}")
    return path


def _oulu_entries(path: Path) -> list[str]:
    """Video stems of a protocol file; lines look like '+1,1_1_01_1' or '-2,1_1_01_4'.

    Any token starting with '-' is an attack; the attack type comes from the file field F, and a
    token that contradicts F is an error.
    """
    entries = []
    for number, cells in _read_rows(path):
        token, stem = (cells + [""])[:2]
        if token.startswith("-"):
            label = 0
        elif token.lstrip("+") == "1":
            label = 1
        else:
            raise LayoutError(
                f"{path}:{number}: expected '+1,<video>' or '-N,<video>', got {','.join(cells)!r}"
            )
        match = _OULU_STEM.match(stem)
        if not match:
            raise LayoutError(f"{path}:{number}: video name {stem!r} is not Phone_Session_User_File")
        if (match.group(4) == "1") != (label == 1):
            raise LayoutError(
                f"{path}:{number}: label {token} contradicts file field {match.group(4)} of {stem}"
            )
        entries.append(stem)
    return entries


def index_oulu(root: Path, protocol: object = None, fold: object = None) -> list[VideoRecord]:
    """OULU-NPU: `{Train,Dev,Test}_files/<P>_<S>_<UU>_<F>.avi` (+ eye file `.txt`).

    protocol 1-4 (folds 1-6 for 3 and 4) reads `Protocols/Protocol_N/{Train,Dev,Test}[_fold].txt`;
    no protocol indexes every video, split by folder (every protocol is a subset of that).
    """
    if protocol is None:
        if fold is not None:
            raise LayoutError("OULU-NPU: a fold needs protocol 3 or 4")
        groups = {
            group: [p.stem for p in _videos_in(root / f"{group}_files")]
            for group in OULU_GROUPS
            if (root / f"{group}_files").is_dir()
        }
    else:
        number = _int_choice(protocol, "OULU-NPU protocol", range(1, 5))
        if number in (3, 4):
            if fold is None:
                raise LayoutError(f"OULU-NPU protocol {number} needs a fold (1-6)")
            fold = _int_choice(fold, "OULU-NPU fold", range(1, 7))
        elif fold is not None:
            raise LayoutError(f"OULU-NPU protocol {number} has no folds (got fold={fold!r})")
        groups = {g: _oulu_entries(_oulu_protocol_file(root, g, number, fold)) for g in OULU_GROUPS}

    records, missing = [], []
    for group, entries in groups.items():
        folder = root / f"{group}_files"
        for stem in entries:
            match = _OULU_STEM.match(stem)
            video = _existing(*(folder / f"{stem}{ext}" for ext in VIDEO_EXTS))
            if match is None or video is None:
                missing.append(folder / f"{stem}.avi")
                continue
            records.append(
                VideoRecord(
                    path=video,
                    video=stem,
                    subject=match.group(3),
                    label=int(match.group(4) == "1"),
                    attack_type=OULU_ATTACKS[match.group(4)],
                    split=OULU_GROUPS[group],
                    **_face([folder / f"{stem}.txt"], "oulu_eyes"),
                )
            )
    if missing:
        raise LayoutError(f"OULU-NPU: {len(missing)} listed video(s) missing or misnamed, e.g. {missing[0]}")
    return records


# --- CASIA-FASD ---------------------------------------------------------------------------------

CASIA_SPLITS = {"train_release": "train", "test_release": "test"}
CASIA_ATTACKS = {
    **dict.fromkeys(("1", "2", "HR_1"), "live"),
    **dict.fromkeys(("3", "4", "HR_2"), "print/warped"),
    **dict.fromkeys(("5", "6", "HR_3"), "print/cut"),
    **dict.fromkeys(("7", "8", "HR_4"), "replay"),
}


def index_casia(root: Path, protocol: object = None, fold: object = None) -> list[VideoRecord]:
    """CASIA-FASD: `{train,test}_release/<k>/{1..8,HR_1..HR_4}.avi`; subject ids are '<split>_<k>'.

    No official dev set: protocol 'official' (default) gives train/test only; 'holdout' moves
    every 5th train subject to dev (`carve_dev`). Face boxes are read from Bob's
    `face-locations/<release>/<k>/<name>.face` or a `.face` beside the video when present.
    """
    holdout = _official_or_holdout("CASIA-FASD", protocol, fold)
    records, skipped = [], []
    for release, split in CASIA_SPLITS.items():
        for subject_dir in sorted(_require_dir(root / release, "CASIA-FASD").iterdir(), key=lambda p: p.name):
            if not subject_dir.is_dir():
                continue
            subject = f"{split}_{subject_dir.name}"  # test folders restart at 1
            for video in _videos_in(subject_dir):
                if video.stem not in CASIA_ATTACKS:
                    skipped.append(video)
                    continue
                records.append(
                    VideoRecord(
                        path=video,
                        video=f"{subject}_{video.stem}",
                        subject=subject,
                        label=int(CASIA_ATTACKS[video.stem] == "live"),
                        attack_type=CASIA_ATTACKS[video.stem],
                        split=split,
                        **_face(
                            [
                                root / "face-locations" / release / subject_dir.name / f"{video.stem}.face",
                                video.with_suffix(".face"),
                            ],
                            "xywh",
                        ),
                    )
                )
    _warn_skipped("CASIA-FASD", skipped, "with names outside 1-8 / HR_1-HR_4")
    return carve_dev(records) if holdout else records


# --- Idiap Replay-Attack ------------------------------------------------------------------------

REPLAY_SPLITS = {"train": "train", "devel": "dev", "test": "test"}
_REPLAY_REAL = re.compile(r"^client(\d{3})_session\d+_webcam_authenticate_(controlled|adverse)_\d+$")
_REPLAY_ATTACK = re.compile(
    r"^attack_(print|mobile|highdef)_client(\d{3})_session\d+_(mobile|highdef)_(photo|video)_(controlled|adverse)$"
)


def _replay_split_dir(root: Path, name: str) -> Path:
    """`root/<name>`, or the `root/replayattack-<name>/<name>` of an unpacked archive."""
    for candidate in (root / name, root / f"replayattack-{name}" / name):
        if candidate.is_dir():
            return candidate
    raise LayoutError(f"Replay-Attack: expected a folder at {root / name}")


def index_replay(root: Path, protocol: object = None, fold: object = None) -> list[VideoRecord]:
    """Idiap Replay-Attack grandtest: `{train,devel,test}/{real,attack/fixed,attack/hand}/*.mov`.

    'devel' becomes 'dev'; enrollment videos are ignored. Attack ids get the support as prefix
    ('hand_attack_...') because fixed and hand attacks share file names.
    """
    _no_protocol("Replay-Attack", protocol, fold)
    records, skipped = [], []
    for name, split in REPLAY_SPLITS.items():
        split_dir = _replay_split_dir(root, name)
        folders = [("real", "")] + [(f"attack/{support}", f"{support}_") for support in ("fixed", "hand")]
        for sub, prefix in folders:
            if not (split_dir / sub).is_dir():
                continue
            for video in _videos_in(split_dir / sub):
                real = sub == "real"
                match = (_REPLAY_REAL if real else _REPLAY_ATTACK).match(video.stem)
                if match is None:
                    skipped.append(video)
                    continue
                if real:
                    client, attack_type = match.group(1), "live"
                else:
                    client = match.group(2)
                    device, kind = match.group(3), match.group(4)
                    attack_type = "print" if match.group(1) == "print" else f"replay/{device}_{kind}"
                relative = f"face-locations/{name}/{sub}/{video.stem}.face"
                records.append(
                    VideoRecord(
                        path=video,
                        video=prefix + video.stem,
                        subject=client,
                        label=int(real),
                        attack_type=attack_type,
                        split=split,
                        **_face(
                            [root / relative, split_dir.parent / relative],
                            "xywh",
                        ),
                    )
                )
    _warn_skipped("Replay-Attack", skipped, "whose names do not follow the Replay-Attack pattern")
    return records


# --- MSU-MFSD -----------------------------------------------------------------------------------

MSU_ATTACKS = {"printed_photo": "print", "ipad_video": "replay/ipad", "iphone_video": "replay/iphone"}
# Stored upside down (bob.db.msu_mfsd_mod rotated_videos/rotated_videos.txt); turned by 180 degrees on
# load, as that reader does since commit 271a28f "Correctly rotate the video files".
MSU_UPSIDE_DOWN = frozenset(f"real_client00{i}_android_SD_scene01" for i in (3, 5, 6, 7, 8, 9))
_MSU_NAME = re.compile(
    r"^(real|attack)_client(\d{3})_(android|laptop)_SD_(?:(printed_photo|ipad_video|iphone_video)_)?scene01$"
)


def _msu_subjects(path: Path) -> set[int]:
    if not path.is_file():
        raise LayoutError(f"MSU-MFSD subject list missing: expected {path}")
    try:
        return {int(cells[0]) for _, cells in _read_rows(path)}
    except ValueError:
        raise LayoutError(f"{path}: expected one subject number per line") from None


def index_msu(root: Path, protocol: object = None, fold: object = None) -> list[VideoRecord]:
    """MSU-MFSD: `scene01/{real,attack}/*.{mp4,mov}` + `.face`, split by `{train,test}_sub_list.txt`.

    No official dev set: protocol 'official' (default) or 'holdout' (see `carve_dev`).
    """
    holdout = _official_or_holdout("MSU-MFSD", protocol, fold)
    train, test = _msu_subjects(root / "train_sub_list.txt"), _msu_subjects(root / "test_sub_list.txt")
    if train & test:
        raise LayoutError(f"MSU-MFSD: subjects {sorted(train & test)} are in both train and test lists")
    scene = root / "scene01" if (root / "scene01").is_dir() else root
    records, skipped, unlisted = [], [], []
    for kind in ("real", "attack"):
        for video in _videos_in(_require_dir(scene / kind, "MSU-MFSD")):
            match = _MSU_NAME.match(video.stem)
            if match is None or match.group(1) != kind or (match.group(4) is None) != (kind == "real"):
                skipped.append(video)
                continue
            subject = int(match.group(2))
            if subject not in train | test:
                unlisted.append(video)
                continue
            records.append(
                VideoRecord(
                    path=video,
                    video=video.stem,
                    subject=f"{subject:03d}",
                    label=int(kind == "real"),
                    attack_type="live" if kind == "real" else MSU_ATTACKS[match.group(4)],
                    split="train" if subject in train else "test",
                    upside_down=video.stem in MSU_UPSIDE_DOWN,
                    **_face([video.with_suffix(".face")], "msu"),
                )
            )
    _warn_skipped("MSU-MFSD", skipped, "whose names do not follow the MSU-MFSD pattern")
    _warn_skipped("MSU-MFSD", unlisted, "of subjects in neither subject list")
    return carve_dev(records) if holdout else records


# --- SiW ----------------------------------------------------------------------------------------

SIW_GROUPS = {"Train": "train", "Test": "test"}
SIW_SPECIES = {"1": "live", "2": "print", "3": "replay"}  # the name's type field
# Bob's dev split: these 10 Train subjects (bioidiap/bob.db.siw lists/dev_files.lst); SiW has none.
SIW_DEV_SUBJECTS = frozenset(("003", "006", "007", "011", "014", "016", "017", "022", "028", "030"))
SIW_P1_TRAIN_FRAMES = 60
_SIW_NAME = re.compile(r"^(\d{3})-(\d)-([123])-(\d)-(\d)$")  # subject-sensor-type-medium-session


def read_siw_face(path: Path) -> dict[int, tuple[int, int, int, int] | None]:
    """SiW `.face` → {frame: (x, y, w, h) or None}: row i (0-based, blank lines skipped) holds
    `x1 y1 x2 y2` of frame i, corners top-left and bottom-right; `0 0 0 0` means no face.
    Commas, spaces or tabs may separate the numbers (the delimiter is not documented)."""
    boxes: dict[int, tuple[int, int, int, int] | None] = {}
    rows = [line for line in Path(path).read_text(encoding="utf-8-sig").splitlines() if line.strip()]
    for frame, line in enumerate(rows):
        try:
            x1, y1, x2, y2 = (float(v) for v in re.split(r"[,\s]+", line.strip()))
        except ValueError:
            raise ValueError(
                f"{path}: row {frame + 1}: expected 4 numbers x1 y1 x2 y2, got {line.strip()!r}"
            ) from None
        w, h = x2 - x1, y2 - y1
        boxes[frame] = (round(x1), round(y1), round(w), round(h)) if w >= 1 and h >= 1 else None
    return boxes


faces.FRAME_READERS.setdefault("siw", read_siw_face)  # `fas prepare` looks face formats up there


def _siw_protocol(protocol: object, fold: object) -> tuple[int | None, int | None]:
    if protocol is None:
        if fold is not None:
            raise LayoutError("SiW: a fold needs protocol 2 or 3")
        return None, None
    number = _int_choice(protocol, "SiW protocol", range(1, 4))
    if number == 1:
        if fold is not None:
            raise LayoutError(f"SiW protocol 1 has no folds (got fold={fold!r})")
        return 1, None
    if fold is None:
        raise LayoutError(f"SiW protocol {number} needs a fold ({'1-4' if number == 2 else '1-2'})")
    return number, _int_choice(fold, f"SiW protocol {number} fold", range(1, 5 if number == 2 else 3))


def _siw_keeps(protocol: int | None, fold: int | None, test: bool, species: str, medium: str) -> bool:
    """Whether a video of `species`/`medium` belongs to the protocol's train/dev (or test) side,
    following bioidiap/bob.db.siw `driver.py`; live videos are on every side."""
    if species == "live" or protocol in (None, 1):
        return True
    if protocol == 2:  # leave one replay medium out; prints are excluded
        return species == "replay" and (medium == str(fold)) == test
    trained = "print" if fold == 1 else "replay"  # 3_1: print -> replay, 3_2: replay -> print
    return (species == trained) != test


def index_siw(root: Path, protocol: object = None, fold: object = None) -> list[VideoRecord]:
    """SiW: `{Train,Test}/{live,spoof}/<SSS>/<SSS>-<sensor>-<type>-<medium>-<session>.mov` + `.face`.

    type 1 = live, 2 = print (medium 1-2), 3 = replay (medium 1-4). Bob's 10 dev subjects
    (SIW_DEV_SUBJECTS) of Train form the dev split. No protocol: every video. Protocol 1: every
    video, train videos sampled from their first 60 frames only. Protocol 2 fold m (1-4): live +
    replay, replay medium m held out for test. Protocol 3 fold 1: train print, test replay;
    fold 2: train replay, test print. A stem ending in `.m` (16 Test videos of sensor 2) is read
    without it.
    """
    number, fold = _siw_protocol(protocol, fold)
    records, skipped = [], []
    for group, split in SIW_GROUPS.items():
        for kind in ("live", "spoof"):
            folder = _require_dir(root / group / kind, "SiW")
            for video in (v for d in sorted(folder.iterdir()) if d.is_dir() for v in _videos_in(d)):
                stem = video.stem.removesuffix(".m")
                match = _SIW_NAME.match(stem)
                if match is None or (match.group(3) == "1") != (kind == "live"):
                    skipped.append(video)
                    continue
                subject, species, medium = match.group(1), SIW_SPECIES[match.group(3)], match.group(4)
                if not _siw_keeps(number, fold, split == "test", species, medium):
                    continue
                final = "dev" if split == "train" and subject in SIW_DEV_SUBJECTS else split
                records.append(
                    VideoRecord(
                        path=video,
                        video=stem,
                        subject=subject,
                        label=int(species == "live"),
                        attack_type=species if species == "live" else f"{species}/{medium}",
                        split=final,
                        max_frames=SIW_P1_TRAIN_FRAMES if number == 1 and final == "train" else None,
                        **_face([video.with_suffix(".face"), video.with_name(f"{stem}.face")], "siw"),
                    )
                )
    _warn_skipped("SiW", skipped, "whose names do not follow the SiW pattern or its class folder")
    return records


# --- CelebA-Spoof -------------------------------------------------------------------------------

# Index 40 of the label vector (CelebA-Spoof README), grouped into species.
CELEBA_SPOOF_TYPES = {
    1: "print/photo",
    2: "print/poster",
    3: "print/a4",
    4: "mask/face",
    5: "mask/upper_body",
    6: "mask/region",
    7: "replay/pc",
    8: "replay/pad",
    9: "replay/phone",
    10: "mask/3d",
}


def index_celeba_spoof(root: Path, protocol: object = None, fold: object = None) -> list[VideoRecord]:
    """CelebA-Spoof (an image set): `metas/<protocol>/{train,test}_label.json` → `Data/...` images.

    protocol: a folder under `metas/` (default 'intra_test'), or 'holdout' = intra_test with
    every 5th train subject moved to dev (there is no official dev set). Index 43 of the
    44-int label vector is 0 = live / 1 = spoof and is inverted here; index 40 gives the type.
    """
    if fold is not None:
        raise LayoutError(f"CelebA-Spoof has no folds (got fold={fold!r})")
    holdout = protocol == "holdout"
    folder = "intra_test" if protocol is None or holdout else str(protocol)
    metas = root / "metas" / folder
    if ".." in PurePosixPath(folder).parts or not metas.is_dir():
        raise LayoutError(f"unknown CelebA-Spoof protocol {protocol!r}: expected a folder at {metas}")
    records, conflicts = [], 0
    for split in ("train", "test"):
        label_file = metas / f"{split}_label.json"
        if not label_file.is_file():
            raise LayoutError(f"CelebA-Spoof label file missing: expected {label_file}")
        entries = json.loads(label_file.read_text(encoding="utf-8"))
        if not isinstance(entries, dict):
            raise LayoutError(f"{label_file}: expected a JSON object mapping image paths to 44-int lists")
        for key, vector in entries.items():
            if not isinstance(vector, list) or len(vector) < 44 or vector[43] not in (0, 1):
                raise LayoutError(f"{label_file}: entry {key!r} is not a 44-int list with [43] in {{0, 1}}")
            parts = PurePosixPath(key).parts
            live = vector[43] == 0
            conflicts += len(parts) >= 2 and parts[-2] in ("live", "spoof") and (parts[-2] == "live") != live
            path = root / key
            records.append(
                VideoRecord(
                    path=path,
                    video="_".join(PurePosixPath(key).with_suffix("").parts[1:]),
                    subject=parts[-3] if len(parts) >= 3 else path.stem,
                    label=int(live),
                    attack_type="live" if live else CELEBA_SPOOF_TYPES.get(vector[40], "spoof"),
                    split=split,
                    **_face([path.with_name(f"{path.stem}_BB.txt")], "celeba_bb"),
                )
            )
    if conflicts:
        warnings.warn(
            f"CelebA-Spoof: {conflicts} entries sit in a live/spoof folder that disagrees with label "
            "index 43; the label file wins",
            UserWarning,
            stacklevel=2,
        )
    return carve_dev(records) if holdout else records


# --- plain folder layout ------------------------------------------------------------------------

FOLDER_CLASSES = {
    **dict.fromkeys(("live", "real", "true", "bonafide", "bona_fide"), 1),
    **dict.fromkeys(("spoof", "attack", "fake"), 0),
}


def _folder_meta(root: Path) -> dict[str, dict[str, str]]:
    """Per-video attack_type/subject from `root/meta.csv`, keyed by the video's relative path."""
    path = root / "meta.csv"
    if not path.is_file():
        return {}
    try:
        table = read_csv(path)
    except DataError as exc:
        raise LayoutError(str(exc)) from None
    if "path" not in table.columns or "attack_type" not in table.columns:
        return {}
    meta = {}
    for row in table.rows:
        relative = PurePosixPath(row["path"].replace("\\", "/"))
        if relative.suffix.lower() in IMAGE_EXTS and len(relative.parts) > 3:
            relative = relative.parent  # a frame row names its video folder
        meta[str(relative)] = row
    return meta


def index_folder(root: Path, protocol: object = None, fold: object = None) -> list[VideoRecord]:
    """Plain layout `<split>/<live|spoof>/<video>/*.{jpg,png}` (or `<split>/<class>/<image>`).

    Split folders may be named train, dev|val|devel|valid|validation, test; class folders
    live|real|true|bonafide or spoof|attack|fake. `meta.csv` (columns path, attack_type and
    optionally video, subject) supplies attack types and ids; otherwise attacks are 'spoof' and
    the video id is '<class folder>_<name>'. The images are
    taken to be face crops already (face_format 'full').
    """
    _no_protocol("folder layout", protocol, fold)
    meta = _folder_meta(root)
    records, seen = [], {}
    for split_dir in sorted(p for p in root.iterdir() if p.is_dir() and p.name.lower() in SPLIT_ALIASES):
        split = SPLIT_ALIASES[split_dir.name.lower()]
        if seen.setdefault(split, split_dir) != split_dir:
            raise LayoutError(f"folder layout: both {seen[split]} and {split_dir} name the {split} split")
        class_dirs = [p for p in split_dir.iterdir() if p.is_dir() and p.name.lower() in FOLDER_CLASSES]
        for class_dir in sorted(class_dirs):
            label = FOLDER_CLASSES[class_dir.name.lower()]
            for entry in sorted(class_dir.iterdir(), key=lambda p: natural_key(p.name)):
                if not (entry.suffix.lower() in IMAGE_EXTS or (entry.is_dir() and image_files(entry))):
                    continue
                relative = entry.relative_to(root).as_posix()
                row = meta.get(relative, {})
                video = row.get("video") or f"{class_dir.name}_{entry.stem}"
                records.append(
                    VideoRecord(
                        path=entry,
                        video=video,
                        subject=row.get("subject") or video,
                        label=label,
                        attack_type="live" if label else (row.get("attack_type") or "spoof"),
                        split=split,
                        face_format="full",
                    )
                )
    return records


# --- registry -----------------------------------------------------------------------------------

_SAFE_ID = re.compile(r"[\w.+\- ]+")

LAYOUTS: dict[str, Callable[..., list[VideoRecord]]] = {
    "oulu": index_oulu,
    "casia": index_casia,
    "replay": index_replay,
    "msu": index_msu,
    "siw": index_siw,
    "celeba_spoof": index_celeba_spoof,
    "folder": index_folder,
}


def index_dataset(
    name: str, root: str | Path, protocol: object = None, fold: object = None
) -> list[VideoRecord]:
    """Index data set `name` (a key of `LAYOUTS`) under `root`; raises `LayoutError` on bad input."""
    key = name.strip().lower().replace("-", "_")
    if key not in LAYOUTS:
        raise LayoutError(
            f"unknown data set {name!r}.{did_you_mean(key, list(LAYOUTS))} Known: {', '.join(LAYOUTS)}"
        )
    root = Path(root).expanduser()
    if not root.is_dir():
        raise LayoutError(f"{name}: data set root {root} does not exist or is not a folder")
    records = LAYOUTS[key](root, protocol, fold)
    if not records:
        raise LayoutError(f"{name}: found no videos under {root}; see docs/fas.md 'Data sets' for the tree")
    unsafe = [r.video for r in records if not _SAFE_ID.fullmatch(r.video) or set(r.video) == {"."}]
    if unsafe:  # ids become folder names under the output folder of `fas prepare`
        raise LayoutError(
            f"{name}: video ids must be plain file names, got {', '.join(map(repr, unsafe[:5]))}"
        )
    duplicates = sorted(video for video, n in Counter(r.video for r in records).items() if n > 1)
    if duplicates:
        raise LayoutError(f"{name}: video ids are not unique under {root}: {', '.join(duplicates[:5])}")
    return records
