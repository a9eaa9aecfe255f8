"""Which frames of a video `kdkit fas prepare` keeps: the frame-sampling conventions.

- 'uniform' (kdkit's default): K frames spread evenly, frame `(2i+1)·n / 2K` for i < K, all
  frames when n <= K (`kdkit.deploy.inputs.sample_indices`, the frames `kdkit predict` scores).
- 'ssdg': frames `6 + j·floor(n/K)` for j < K, as SSDG's `sample_frames` picks them from the
  sorted frame numbers of a video (Jia et al., "Single-Side Domain Generalization for Face
  Anti-Spoofing", CVPR 2020; github.com/taylover-pei/SSDG-CVPR2020, `utils/utils.py`).
- 'flip': frames 6 and `6 + floor(n/2)`, "only sample two frames: frame[6] and
  frame[6+floor(total_frames/2)]" (Srivatsan et al., "FLIP: Cross-domain Face Anti-spoofing with
  Language Guidance", ICCV 2023; github.com/koushiksrivats/FLIP, `docs/datasets.md`). It is
  'ssdg' with K = 2, and K is 2 by definition.

Short videos: SSDG's and FLIP's code index past the end (an IndexError) when `6 + j·floor(n/K)`
>= n. kdkit clamps such a position to the last frame and drops repeats, so a video with at least
one frame always gives at least one, and never more than K distinct ones (n <= 6: only the
last frame).
"""

from __future__ import annotations

from kdkit.deploy.inputs import sample_indices

CONVENTIONS = ("uniform", "ssdg", "flip")
DEFAULT_FRAMES = 8  # K of 'uniform' and 'ssdg' when none is given
FLIP_FRAMES = 2
FIRST_FRAME = 6  # SSDG's and FLIP's offset: the first frames are skipped


def check_convention(convention: str) -> str:
    """`convention` if it is one of CONVENTIONS, else a ValueError naming the choices."""
    if convention not in CONVENTIONS:
        raise ValueError(f"unknown frame sampling {convention!r}; expected one of {', '.join(CONVENTIONS)}")
    return convention


def resolve_frames(k: int | None, convention: str) -> int:
    """K for `convention`: `k`, or its default when None (2 for 'flip', else DEFAULT_FRAMES).

    'flip' takes exactly two frames; another `k` is refused rather than silently ignored.
    """
    check_convention(convention)
    if convention == "flip":
        if k not in (None, FLIP_FRAMES):
            raise ValueError(
                f"frame sampling 'flip' takes frames 6 and 6 + n/2, so frames_per_video must be "
                f"{FLIP_FRAMES} (or left out), got {k!r}"
            )
        return FLIP_FRAMES
    return DEFAULT_FRAMES if k is None else k


def frame_indices(n: int, k: int, convention: str = "uniform", limit: int | None = None) -> list[int]:
    """Sorted positions (0-based) of the frames to keep out of `n`, by `convention`.

    `limit` restricts sampling to the first `limit` frames (SiW protocol 1 trains on the first
    60 frames of each video). Positions index the frames in order: frame numbers of a video, or
    the naturally sorted files of a frame folder.
    """
    check_convention(convention)
    n = max(0, n if limit is None else min(n, limit))
    if convention == "uniform":
        return sample_indices(n, k)
    if n == 0:
        return []
    k = resolve_frames(k, convention)
    step = n // k
    return sorted({min(FIRST_FRAME + j * step, n - 1) for j in range(k)})
