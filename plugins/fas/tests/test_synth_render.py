"""Tests of the synthetic-face renderer on its own: frames drawn in memory from the generators it is
given, with the colour statistics of their live source, and no dependency on files or on kdkit."""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest
from kdkit_fas import synth_render

SIZE, FRAMES = 16, 2


def _session(seed: int) -> synth_render.Session:
    idt = synth_render.draw_identity(np.random.default_rng([seed, 1]))
    return synth_render.film_session(idt, np.random.default_rng([seed, 2]), FRAMES, SIZE)


def _replay(session: synth_render.Session) -> list[np.ndarray]:
    return list(synth_render.attack_frames(session, np.random.default_rng(4), "replay", SIZE))


def _stats(frame: np.ndarray) -> np.ndarray:
    pixels = frame.astype(np.float64)
    return np.concatenate([pixels.mean((0, 1)), pixels.std((0, 1))])


@pytest.fixture(scope="module")
def videos() -> dict[str, list[np.ndarray]]:
    """One subject's session as live, print and replay video."""
    session = _session(0)
    return {
        "live": synth_render.live_frames(session, np.random.default_rng(3)),
        "print": list(synth_render.attack_frames(session, np.random.default_rng(5), "print", SIZE)),
        "replay": _replay(session),
    }


def test_frames_are_uint8_rgb_of_the_output_size(videos: dict[str, list[np.ndarray]]) -> None:
    for kind, frames in videos.items():
        assert len(frames) == FRAMES, kind
        assert all(f.shape == (SIZE, SIZE, 3) and f.dtype == np.uint8 for f in frames), kind
    assert not np.array_equal(videos["live"][0], videos["replay"][0])
    assert not np.array_equal(videos["print"][0], videos["replay"][0])


def test_the_same_generators_draw_the_same_frames(videos: dict[str, list[np.ndarray]]) -> None:
    again = _replay(_session(0))
    assert all(np.array_equal(a, b) for a, b in zip(videos["replay"], again, strict=True))
    assert not np.array_equal(_replay(_session(1))[0], again[0])


def test_attacks_carry_the_colour_statistics_of_their_live_source(videos) -> None:
    live = [_stats(f) for f in videos["live"]]
    for f, frame in enumerate(videos["replay"]):  # the replayed video, frame by frame
        assert np.abs(_stats(frame) - live[f]).max() < 0.5
    for frame in videos["print"]:  # a photo of the first frame, under the recapture's flicker
        assert np.abs(_stats(frame) - live[0]).max() < 3


def test_the_renderer_needs_no_files_nor_kdkit() -> None:
    source = Path(synth_render.__file__).read_text(encoding="utf-8")
    tree = ast.parse(source)
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    roots = {name.split(".")[0] for name in imported}
    assert not roots & {"kdkit", "kdkit_fas", "os", "pathlib", "shutil", "io", "json", "csv"}, roots
    assert "imwrite" not in source and "open(" not in source
