"""Frame-sampling conventions (uniform, SSDG, FLIP): their frame indices, what prepare decodes,
and how prepare records the convention."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from fixtures import write_siw_video
from kdkit_fas import prepare as prepare_module
from kdkit_fas.prepare import PrepareError, prepare, read_video_frames
from kdkit_fas.sampling import frame_indices, resolve_frames

from kdkit.cli import main
from kdkit.deploy.inputs import iter_video_frames, sample_indices


@pytest.mark.parametrize("n", [0, 1, 3, 8, 9, 60, 151, 300])
@pytest.mark.parametrize("k", [1, 2, 8])
def test_uniform_is_kdkits_even_sampling(n: int, k: int) -> None:
    assert frame_indices(n, k, "uniform") == sample_indices(n, k)


def test_ssdg_takes_frame_6_plus_j_times_floor_n_over_k() -> None:
    assert frame_indices(100, 4, "ssdg") == [6, 31, 56, 81]
    assert frame_indices(151, 1, "ssdg") == [6]  # SSDG's one frame per source video
    assert frame_indices(151, 2, "ssdg") == [6, 81]  # and two per target video


def test_flip_takes_frames_6_and_6_plus_half() -> None:
    assert frame_indices(151, 2, "flip") == [6, 81]
    assert frame_indices(300, 2, "flip") == [6, 156]
    assert resolve_frames(None, "flip") == 2 and resolve_frames(None, "ssdg") == 8
    with pytest.raises(ValueError, match="frames_per_video must be 2"):
        frame_indices(300, 8, "flip")


def test_short_videos_clamp_to_the_last_frame_and_drop_repeats() -> None:
    assert frame_indices(10, 2, "ssdg") == [6, 9]  # 6 + 5 = 11 is past the end
    assert frame_indices(20, 8, "ssdg") == [6, 8, 10, 12, 14, 16, 18, 19]
    assert frame_indices(5, 2, "flip") == [4]  # n <= 6: only the last frame
    assert frame_indices(3, 8, "ssdg") == [2]
    assert frame_indices(0, 1, "ssdg") == []


def test_a_limit_samples_the_first_frames_only() -> None:
    assert frame_indices(300, 8, "uniform", limit=60) == sample_indices(60, 8)
    assert frame_indices(300, 2, "flip", limit=60) == [6, 36]
    assert frame_indices(40, 2, "flip", limit=60) == [6, 26]  # a shorter video: its own length


def test_unknown_convention_is_named() -> None:
    with pytest.raises(ValueError, match="unknown frame sampling 'random'; expected one of uniform, ssdg"):
        frame_indices(10, 2, "random")


_VideoCapture = cv2.VideoCapture


class _CountingCapture:
    """cv2.VideoCapture that counts grab() and retrieve() calls."""

    calls = {"grab": 0, "retrieve": 0}

    def __init__(self, path: str) -> None:
        self._capture = _VideoCapture(path)

    def grab(self) -> bool:
        self.calls["grab"] += 1
        return self._capture.grab()

    def retrieve(self):
        self.calls["retrieve"] += 1
        return self._capture.retrieve()

    def __getattr__(self, name: str):
        return getattr(self._capture, name)


def test_prepare_decodes_only_up_to_the_last_wanted_frame_and_retrieves_only_those(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    video = write_siw_video(tmp_path / "v.mov", frames=70)
    monkeypatch.setattr(prepare_module.cv2, "VideoCapture", _CountingCapture)
    _CountingCapture.calls.update(grab=0, retrieve=0)
    indices = [index for index, _ in read_video_frames(video, lambda n: frame_indices(n, 2, "flip"))]
    assert indices == [6, 41] and _CountingCapture.calls == {"grab": 42, "retrieve": 2}


def test_uniform_reading_gives_the_frames_kdkit_predict_scores(tmp_path: Path) -> None:
    video = write_siw_video(tmp_path / "v.mov", frames=30)
    ours = list(read_video_frames(video, lambda n: frame_indices(n, 4, "uniform")))
    theirs = list(iter_video_frames(video, 4))
    assert [i for i, _ in ours] == [i for i, _ in theirs] == sample_indices(30, 4)
    for (_, bgr), (_, rgb) in zip(ours, theirs, strict=True):
        assert np.array_equal(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), rgb)


def _shaded_frame_folder(root: Path, count: int) -> Path:
    """folder layout, one live video whose frame i is a flat image of value 10·i."""
    folder = root / "train" / "live" / "v1"
    folder.mkdir(parents=True)
    for i in range(count):
        assert cv2.imwrite(str(folder / f"{i}.png"), np.full((12, 12, 3), 10 * i, np.uint8))
    return root


def test_frame_folders_follow_the_convention(tmp_path: Path) -> None:
    root = _shaded_frame_folder(tmp_path / "raw", count=20)
    prepare("folder", root, tmp_path / "out", sampling="flip", size=8, workers=1, progress=False)
    crops = [cv2.imread(str(tmp_path / "out" / "frames" / "train" / "live_v1" / f"{k}.png")) for k in (0, 1)]
    assert [int(crop.mean()) for crop in crops] == [60, 160]  # files 6 and 6 + 10 (natural order)


def test_the_convention_is_recorded_and_another_one_is_refused(tmp_path: Path) -> None:
    root, out = _shaded_frame_folder(tmp_path / "raw", count=20), tmp_path / "out"
    prepare("folder", root, out, sampling="ssdg", frames_per_video=3, size=8, workers=1, progress=False)
    assert json.loads((out / "prepare.json").read_text())["sampling"] == "ssdg"
    marker = json.loads((out / "frames" / "train" / "live_v1" / ".done.json").read_text())
    assert marker["settings"]["sampling"] == "ssdg" and len(marker["frames"]) == 3
    with pytest.raises(PrepareError, match="sampling 'ssdg' -> 'uniform'"):
        prepare("folder", root, out, frames_per_video=3, size=8, workers=1, progress=False)


def test_flip_with_another_frame_count_is_refused_on_the_command_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = _shaded_frame_folder(tmp_path / "raw", count=20)
    argv = ["fas", "prepare", "folder", "--root", str(root), "--out", str(tmp_path / "out")]
    assert main([*argv, "--sampling", "flip", "--frames-per-video", "8", "--no-progress"]) == 2
    assert "frames_per_video must be 2" in capsys.readouterr().err
    assert main([*argv, "--sampling", "flip", "--size", "8", "--workers", "1", "--no-progress"]) == 0
    assert json.loads((tmp_path / "out" / "prepare.json").read_text())["frames_per_video"] == 2


def test_the_throughput_benchmark_runs_at_a_tiny_size(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = Path(__file__).resolve().parents[3] / "benchmarks" / "prepare_throughput.py"
    spec = importlib.util.spec_from_file_location("prepare_throughput", path)
    benchmark = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(benchmark)
    argv = ["--videos", "2", "--seconds", "0.2", "--resolution", "64", "48", "--size", "16"]
    assert benchmark.main([*argv, "--detectors", "full", "--workers", "1", "--work", str(tmp_path)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["settings"]["frames_per_source_video"] == 6
    assert [(r["set"], r["resolution"], r["failed"]) for r in report["results"]] == [
        ("oulu", "64x48", 0),
        ("replay", "64x48", 0),
    ]
    assert all(r["videos_per_s"] > 0 and r["crops_per_s"] > 0 for r in report["results"])
    assert len(list((tmp_path / "oulu" / "Train_files").glob("*.avi"))) == 2
