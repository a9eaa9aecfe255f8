"""Tiny fake trees of the real FAS data set layouts (names and file formats as in the originals).

Videos are 8 frames of 64x48 with a drawn face-like blob: MJPG in .avi, 'jpeg' in .mov and
'mp4v' in .mp4 (the fourccs this OpenCV build writes into those containers and reads back).
Robustness cases from docs/fas.md ("Data sets") are built in and named in each docstring.
"""

from __future__ import annotations

import json
from itertools import product
from pathlib import Path

import cv2
import numpy as np

FRAMES, WIDTH, HEIGHT = 8, 64, 48
FOURCC = {".avi": "MJPG", ".mov": "jpeg", ".mp4": "mp4v"}
FACE_XYWH = (20, 8, 24, 30)  # where the blob is drawn
EYES = (26, 18, 38, 18)  # eye centres inside the blob


def face_image(width: int = WIDTH, height: int = HEIGHT, shade: int = 0) -> np.ndarray:
    """A grey background with a skin-coloured ellipse and two dark eyes (BGR)."""
    image = np.full((height, width, 3), 90 + shade, np.uint8)
    x, y, w, h = (round(v * width / WIDTH) for v in FACE_XYWH)
    cv2.ellipse(image, (x + w // 2, y + h // 2), (w // 2, h // 2), 0, 0, 360, (120, 160, 210), -1)
    for ex in (EYES[0], EYES[2]):
        cv2.circle(image, (round(ex * width / WIDTH), round(EYES[1] * height / HEIGHT)), 2, (30, 30, 30), -1)
    return image


def write_video(path: Path, frames: int = FRAMES) -> Path:
    """Write a tiny video whose container follows the file extension."""
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*FOURCC[path.suffix]), 25, (WIDTH, HEIGHT))
    assert writer.isOpened(), f"OpenCV cannot write {path}"
    for i in range(frames):
        writer.write(face_image(shade=3 * i))
    writer.release()
    return path


def write_image(path: Path, width: int = WIDTH, height: int = HEIGHT) -> Path:
    """Write a face-like still image (.jpg or .png)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), face_image(width, height))
    return path


def corrupt(path: Path) -> Path:
    """Overwrite a file with bytes no decoder accepts."""
    path.write_bytes(b"this is not a video\x00" * 16)
    return path


def _write_text(path: Path, lines: list[str], newline: str = "\n", final: bool = True) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes((newline.join(lines) + (newline if final else "")).encode())
    return path


def _xywh_lines(zero_frame: int | None = 3, separator: str = " ") -> list[str]:
    return [
        separator.join(map(str, (i, *((0, 0, 0, 0) if i == zero_frame else FACE_XYWH))))
        for i in range(FRAMES)
    ]


# --- OULU-NPU -----------------------------------------------------------------------------------

OULU_PHONES, OULU_SESSIONS = (1, 2), (1, 2, 3)
OULU_USERS = {"Train": ("01", "02"), "Dev": ("21", "22"), "Test": ("36", "37")}


def _oulu_protocol_stems(group: str, protocol: int, fold: int | None) -> list[str]:
    """The stems a protocol file lists (docs/fas.md, OULU-NPU protocols), restricted to the fixture."""
    phones = [p for p in OULU_PHONES if fold is None or (p == fold) == (group == "Test")]
    sessions = (3,) if protocol in (1, 4) and group == "Test" else (1, 2) if protocol in (1, 4) else (1, 2, 3)
    files = (1, 2, 3, 4, 5) if protocol in (1, 3) else (1, 3, 5) if group == "Test" else (1, 2, 4)
    return [f"{p}_{s}_{u}_{f}" for p, s, u, f in product(phones, sessions, OULU_USERS[group], files)]


def make_oulu(root: Path) -> Path:
    """OULU-NPU: phones 1-2, sessions 1-3, 2 users per split (60 videos each), protocols 1-4.

    Robustness: every eye file has an all-zero row at frame 3; Protocol_1/Test.txt writes replay
    attacks as '-2' (and prints as '-1'); Protocol_2/Train.txt has CRLF line endings and a blank line.
    """
    for group, users in OULU_USERS.items():
        for p, s, u, f in product(OULU_PHONES, OULU_SESSIONS, users, range(1, 6)):
            stem = f"{p}_{s}_{u}_{f}"
            write_video(root / f"{group}_files" / f"{stem}.avi")
            eyes = [f"{i},{','.join(map(str, (0, 0, 0, 0) if i == 3 else EYES))}" for i in range(FRAMES)]
            _write_text(root / f"{group}_files" / f"{stem}.txt", eyes)
    for protocol, group in product((1, 2, 3, 4), ("Train", "Dev", "Test")):
        for fold in (None,) if protocol < 3 else range(1, 7):
            lines = []
            for stem in _oulu_protocol_stems(group, protocol, fold):
                kind = int(stem[-1])
                token = (
                    "+1" if kind == 1 else "-2" if protocol == 1 and group == "Test" and kind > 3 else "-1"
                )
                lines.append(f"{token},{stem}")
            name = f"{group}.txt" if fold is None else f"{group}_{fold}.txt"
            crlf = (protocol, group) == (2, "Train")
            _write_text(
                root / "Protocols" / f"Protocol_{protocol}" / name,
                lines + [""] * crlf,
                "\r\n" if crlf else "\n",
            )
    return root


# --- CASIA-FASD ---------------------------------------------------------------------------------

CASIA_NAMES = ("1", "2", "3", "4", "5", "6", "7", "8", "HR_1", "HR_2", "HR_3", "HR_4")


def make_casia(root: Path, train_subjects: int = 5, face_locations: bool = True) -> Path:
    """CASIA-FASD: train_release/1..N and test_release/1 (reusing id '1'), 12 videos each.

    With `face_locations`, Bob's `face-locations/<release>/<k>/<name>.face` files are written
    (all-zero row at frame 3) for the train videos only; test videos then need a detector.
    """
    folders = [("train_release", str(k)) for k in range(1, train_subjects + 1)] + [("test_release", "1")]
    for (release, subject), name in product(folders, CASIA_NAMES):
        write_video(root / release / subject / f"{name}.avi")
        if face_locations and release == "train_release":
            _write_text(root / "face-locations" / release / subject / f"{name}.face", _xywh_lines())
    return root


# --- Replay-Attack ------------------------------------------------------------------------------

REPLAY_CLIENTS = {"train": "001", "devel": "003", "test": "009"}


def replay_names(client: str) -> list[str]:
    """Relative paths (under a split folder, no extension) of one client's 24 videos."""
    names = [
        f"real/client{client}_session01_webcam_authenticate_{light}_{take}"
        for light in ("controlled", "adverse")
        for take in (1, 2)
    ]
    for support, light in product(("fixed", "hand"), ("controlled", "adverse")):
        for device, kind in product(("highdef", "mobile"), ("photo", "video")):
            names.append(f"attack/{support}/attack_{device}_client{client}_session01_{device}_{kind}_{light}")
        names.append(f"attack/{support}/attack_print_client{client}_session01_highdef_photo_{light}")
    return names


def make_replay(root: Path) -> Path:
    """Replay-Attack: one client per split (24 videos each) + `face-locations/` (zero row at 3)."""
    for split, client in REPLAY_CLIENTS.items():
        for name in replay_names(client):
            write_video(root / split / f"{name}.mov")
            _write_text(root / "face-locations" / split / f"{name}.face", _xywh_lines())
    return root


# --- MSU-MFSD -----------------------------------------------------------------------------------

MSU_TRAIN, MSU_TEST, MSU_UNLISTED = ("002", "003"), ("001",), "099"


def make_msu(root: Path) -> Path:
    """MSU-MFSD: train clients 002 and 003 (003's android real video is stored upside down), test
    client 001, and client 099 listed nowhere; 8 videos each.

    Robustness: the subject lists have CRLF endings and no final newline; `.face` rows are
    comma-separated floats with the bottom-right corner, frame 3 all zeros.
    """
    x, y, w, h = FACE_XYWH
    for client in (*MSU_TRAIN, *MSU_TEST, MSU_UNLISTED):
        for camera, ext in (("android", ".mp4"), ("laptop", ".mov")):
            stems = [("real", f"real_client{client}_{camera}_SD_scene01")]
            stems += [
                ("attack", f"attack_client{client}_{camera}_SD_{pai}_scene01")
                for pai in ("ipad_video", "iphone_video", "printed_photo")
            ]
            for kind, stem in stems:
                video = write_video(root / "scene01" / kind / f"{stem}{ext}")
                rows = [
                    f"{i}, 0, 0, 0, 0, 0, 0, 0, 0"
                    if i == 3
                    else f"{i}, {x}.0, {y}, {x + w}.5, {y + h}, 30.5, 18.2, 40.1, 18.0"
                    for i in range(FRAMES)
                ]
                _write_text(video.with_suffix(".face"), rows)
    _write_text(root / "train_sub_list.txt", [c[1:] for c in MSU_TRAIN], "\r\n", final=False)
    _write_text(root / "test_sub_list.txt", [c[1:] for c in MSU_TEST], "\r\n", final=False)
    return root


CORNER_BOX = (0, 0, 24, 24)  # x, y, w, h of the face box in the frame as stored


def write_corner_video(path: Path) -> Path:
    """A black video with one white block (rows 0-11, columns 0-15) in the top-left corner of
    `CORNER_BOX`: where it lands in a crop tells a turn by 180 degrees from a mirror image."""
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*FOURCC[path.suffix]), 25, (WIDTH, HEIGHT))
    frame = np.zeros((HEIGHT, WIDTH, 3), np.uint8)
    frame[:12, :16] = 255
    for _ in range(FRAMES):
        writer.write(frame)
    writer.release()
    return path


# --- SiW ----------------------------------------------------------------------------------------

SIW_FRAMES = 70  # more than protocol 1's 60 training frames
SIW_SUBJECTS = {"Train": ("003", "008"), "Test": ("001", "153")}  # 003 is one of Bob's dev subjects
# name fields: sensor-type-medium-session; type 1 live, 2 print (medium 1-2), 3 replay (medium 1-4)
SIW_VIDEOS = ("1-1-1-1", "2-1-1-1", "1-2-1-1", "1-2-2-2", "1-3-1-1", "1-3-2-1", "1-3-3-2", "1-3-4-2")


def write_siw_video(path: Path, frames: int = SIW_FRAMES) -> Path:
    """A `.mov` of `frames` face-like frames (the shade cycles, so any length fits in uint8)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*FOURCC[".mov"]), 30, (WIDTH, HEIGHT))
    assert writer.isOpened(), f"OpenCV cannot write {path}"
    for i in range(frames):
        writer.write(face_image(shade=i % 32))
    writer.release()
    return path


def make_siw(root: Path) -> Path:
    """SiW: Train subjects 003 (Bob's dev) and 008, Test subjects 001 and 153; 8 videos each
    (2 live, 2 print, 4 replay, one per replay medium) of SIW_FRAMES frames, `.face` beside each.

    The `.face` rows are `x1 y1 x2 y2` with `0 0 0 0` from frame 60 on, so a sampled frame past
    protocol 1's 60 training frames shows up as "no face". Quirks: subject 153's sensor-2 live
    video is `153-2-1-1-1.m.mov` (16 real Test stems end in `.m`); Train/live/008 also holds a
    print video (a name that contradicts its folder: skipped with a warning).
    """
    x, y, w, h = FACE_XYWH
    rows = [f"{x} {y} {x + w} {y + h}" if i < 60 else "0 0 0 0" for i in range(SIW_FRAMES)]
    for group, subjects in SIW_SUBJECTS.items():
        for subject, name in product(subjects, SIW_VIDEOS):
            kind = "live" if name.split("-")[1] == "1" else "spoof"
            stem = f"{subject}-{name}" + (".m" if f"{subject}-{name}" == "153-2-1-1-1" else "")
            video = write_siw_video(root / group / kind / subject / f"{stem}.mov")
            _write_text(video.with_suffix(".face"), rows)
    write_siw_video(root / "Train" / "live" / "008" / "008-1-2-1-2.mov", frames=2)
    return root


# --- CelebA-Spoof -------------------------------------------------------------------------------

CELEBA_TRAIN = {  # relative path -> (spoof type [40], live/spoof [43])
    **{f"Data/train/{s}/live/{s}0001.jpg": (0, 0) for s in (10, 11, 12, 13, 14)},
    **{
        f"Data/train/{s}/spoof/{s}0002.png": (t, 1) for s, t in ((10, 1), (11, 4), (12, 7), (13, 9), (14, 10))
    },
}
CELEBA_TEST = {"Data/test/20/live/000003.png": (0, 0), "Data/test/20/spoof/000004.jpg": (3, 1)}


def _celeba_vector(spoof_type: int, spoof: int) -> list[int]:
    vector = [0] * 44
    vector[5] = 1 - spoof  # a CelebA attribute bit on live entries
    vector[40:44] = [spoof_type, 1 if spoof else 0, 1 if spoof else 0, spoof]
    return vector


def make_celeba_spoof(root: Path) -> Path:
    """CelebA-Spoof: 5 train subjects (1 live + 1 spoof image each) and 1 test subject.

    Images are 128x96; `_BB.txt` boxes are in 224x224 coordinates (float-formatted), one of them
    (train/12 live) is too small (w < 3) and counts as no face. Also writes `train_label.txt`.
    """
    for split, entries in (("train", CELEBA_TRAIN), ("test", CELEBA_TEST)):
        for key in entries:
            image = write_image(root / key, width=128, height=96)
            x, y, w, h = (v * 224 / 64 if i % 2 == 0 else v * 224 / 48 for i, v in enumerate(FACE_XYWH))
            if key == "Data/train/12/live/120001.jpg":
                w = 2.0
            _write_text(image.with_name(f"{image.stem}_BB.txt"), [f"{x:.1f} {y:.1f} {w:.1f} {h:.1f} 0.998"])
        labels = {key: _celeba_vector(*value) for key, value in entries.items()}
        _write_text(root / "metas" / "intra_test" / f"{split}_label.json", [json.dumps(labels)])
        _write_text(
            root / "metas" / "intra_test" / f"{split}_label.txt", [f"{k} {v[1]}" for k, v in entries.items()]
        )
    return root


# --- plain folder layout ------------------------------------------------------------------------


def make_folder(root: Path, frames: int = 3) -> Path:
    """Plain layout with aliases: train/{live,spoof}, val/{real,attack}, test/{bonafide,fake}.

    train/spoof has a print and a replay video (types in meta.csv, as `kdkit fas synth` writes);
    test/fake holds a bare image instead of a frame folder; a stray `notes/` folder is ignored.
    """
    videos = {
        "train/live/s001_live0": "live",
        "train/live/s002_live0": "live",
        "train/spoof/s001_print0": "print",
        "train/spoof/s002_replay0": "replay",
        "val/real/s003_live0": "live",
        "val/attack/s003_print0": "print",
        "test/bonafide/s004_live0": "live",
    }
    meta = ["path,split,video,subject,label,attack_type"]
    for relative, attack_type in videos.items():
        split, _, video = relative.split("/")
        for k in range(frames):
            write_image(root / relative / f"{k:03d}.png")
            subject = video.split("_")[0]
            meta.append(
                f"{relative}/{k:03d}.png,{split},{video},{subject},{int(attack_type == 'live')},{attack_type}"
            )
    write_image(root / "test" / "fake" / "still.jpg")
    (root / "notes").mkdir()
    _write_text(root / "meta.csv", meta)
    return root
