"""Rendering of the synthetic FAS data: live faces, print and replay attacks, drawn from random generators.

Pure image work: numpy arrays and ``np.random.Generator`` in, uint8 RGB frames out, no files (the data-set
writer, ``kdkit_fas.synth``, chooses the seeds and writes the frames).

Every image, live or attack, is renormalised to the per-channel mean/std of a clean live-style
rendering drawn from the same scene distribution, so global colour statistics carry no class
information; the attack cues (halftone dots, paper texture, sub-pixel grid, moiré, glare, bezels,
hands) are drawn at a pitch of a few output pixels so that they stay visible at 32-64 px.
Everything is drawn on a canvas twice the output size and downscaled with area interpolation.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import cv2
import numpy as np

SUPERSAMPLE = 2  # supersampling factor of the drawing canvas
# Peak memory of drawing one video, in float32 planes of the drawing canvas (SUPERSAMPLE·size)²:
# measured 280 MiB at size 512 (canvas 1024², 4 MiB a plane).
PEAK_PLANES = 70

_SHIFT = 4  # fixed-point bits for sub-pixel cv2 drawing
_FP = 1 << _SHIFT
_SKIN_LIGHT = np.array([0.96, 0.80, 0.68])
_SKIN_DARK = np.array([0.33, 0.20, 0.13])


# ----------------------------------------------------------------------------------------------- drawing


class _Layer:
    """An RGB layer with coverage (alpha), drawn with sub-pixel cv2 primitives."""

    def __init__(self, side: int) -> None:
        self.rgb = np.zeros((side, side, 3), np.float32)
        self.alpha = np.zeros((side, side), np.float32)

    def ellipse(self, c, axes, color, angle=0.0, start=0.0, end=360.0, thickness=-1) -> None:
        """Filled (thickness -1) or outlined ellipse arc; centre and axes in canvas pixels."""
        cc = (round(c[0] * _FP), round(c[1] * _FP))
        aa = (max(1, round(axes[0] * _FP)), max(1, round(axes[1] * _FP)))
        for img, col in ((self.rgb, tuple(map(float, color))), (self.alpha, 1.0)):
            cv2.ellipse(img, cc, aa, angle, start, end, col, thickness, cv2.LINE_8, _SHIFT)

    def polyline(self, pts, color, thickness: int) -> None:
        """Open polyline through ``pts`` (canvas pixels)."""
        p = [np.round(np.asarray(pts) * _FP).astype(np.int32)]
        for img, col in ((self.rgb, tuple(map(float, color))), (self.alpha, 1.0)):
            cv2.polylines(img, p, False, col, thickness, cv2.LINE_8, _SHIFT)

    def paint(self, mask: np.ndarray, rgb: np.ndarray) -> None:
        """Paint ``rgb`` (colour or per-pixel field) where the boolean ``mask`` holds."""
        self.rgb[mask] = (np.broadcast_to(rgb, self.rgb.shape))[mask]
        self.alpha[mask] = 1.0


def _grid(side: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates (x, y) of a square canvas."""
    ax = np.arange(side, dtype=np.float32) + 0.5
    return np.meshgrid(ax, ax)


def _smooth_noise(rng: np.random.Generator, side: int, blur: tuple[int, int]) -> np.ndarray:
    """Zero-mean, unit-std noise smoothed with a box kernel (texture for walls, hair, paper)."""
    n = cv2.blur(rng.standard_normal((side, side)).astype(np.float32), blur)
    return (n - n.mean()) / (n.std() + 1e-6)


def _random_colour(rng: np.random.Generator, lo: float = 0.08, hi: float = 0.92) -> np.ndarray:
    """A random, partly desaturated colour."""
    c = rng.uniform(lo, hi, 3)
    return c + (c.mean() - c) * rng.uniform(0.1, 0.7)


def _background(rng: np.random.Generator, side: int) -> np.ndarray:
    """A wall: flat, linear or radial gradient between two colours, sometimes blotchy or striped."""
    x, y = _grid(side)
    c1, c2 = _random_colour(rng), _random_colour(rng)
    kind = rng.integers(3)
    if kind == 0:
        t = np.zeros_like(x)
    elif kind == 1:
        a = rng.uniform(0, 2 * np.pi)
        t = (np.cos(a) * x + np.sin(a) * y) / side
        t = (t - t.min()) / (t.max() - t.min())
    else:
        px, py = rng.uniform(0, side, 2)
        t = np.clip(np.hypot(x - px, y - py) / side, 0, 1)
    img = c1 * (1 - t[..., None]) + c2 * t[..., None]
    if rng.random() < 0.5:
        k = int(rng.integers(3, 16))
        img *= 1 + rng.uniform(0.04, 0.18) * _smooth_noise(rng, side, (k, k))[..., None]
    if rng.random() < 0.2:  # wallpaper stripes, coarse enough not to mimic screen artefacts
        a, period = rng.uniform(0, np.pi), rng.uniform(6, 16) * SUPERSAMPLE
        img *= (
            1
            + rng.uniform(0.04, 0.12)
            * np.sin(2 * np.pi * (np.cos(a) * x + np.sin(a) * y) / period)[..., None]
        )
    return img.astype(np.float32)


# ----------------------------------------------------------------------------------------- live faces


@dataclass(frozen=True)
class Identity:
    """Appearance fixed per subject (proportions relative to the face half-width/half-height)."""

    skin: np.ndarray
    aspect: float
    jaw: float
    eye_dx: float
    eye_y: float
    eye_w: float
    iris: np.ndarray
    brow: float
    brow_tilt: float
    nose_w: float
    mouth_w: float
    mouth_y: float
    lip: np.ndarray
    smile: float
    hair: np.ndarray
    hair_style: int  # 0 short, 1 long, 2 bald, 3 fringe
    hairline: float
    glasses: bool
    shirt: np.ndarray
    texture_seed: int


def draw_identity(rng: np.random.Generator) -> Identity:
    """Draw a subject's appearance."""
    t = rng.beta(1.3, 1.3)
    skin = _SKIN_LIGHT * (1 - t) + _SKIN_DARK * t + rng.normal(0, 0.025, 3)
    hair_dark = rng.uniform(0.05, 0.45)
    hair = (
        np.array([1.0, 0.75, 0.5]) * hair_dark if rng.random() < 0.8 else rng.uniform(0.3, 0.8) * np.ones(3)
    )
    return Identity(
        skin=np.clip(skin, 0.05, 1),
        aspect=rng.uniform(1.18, 1.45),
        jaw=rng.uniform(0.6, 0.9),
        eye_dx=rng.uniform(0.36, 0.46),
        eye_y=rng.uniform(-0.12, 0.0),
        eye_w=rng.uniform(0.14, 0.2),
        iris=_random_colour(rng, 0.05, 0.55),
        brow=rng.uniform(0.035, 0.08),
        brow_tilt=rng.uniform(-0.06, 0.06),
        nose_w=rng.uniform(0.12, 0.2),
        mouth_w=rng.uniform(0.28, 0.42),
        mouth_y=rng.uniform(0.48, 0.6),
        lip=np.clip(skin * np.array([0.95, 0.6, 0.6]) + rng.normal(0, 0.03, 3), 0, 1),
        smile=rng.uniform(-0.02, 0.1),
        hair=hair,
        hair_style=int(rng.choice(4, p=[0.4, 0.3, 0.1, 0.2])),
        hairline=rng.uniform(0.38, 0.6),
        glasses=bool(rng.random() < 0.2),
        shirt=_random_colour(rng),
        texture_seed=int(rng.integers(2**31)),
    )


@dataclass(frozen=True)
class _Scene:
    """Per-video setting: framing, pose, lighting, camera and the wall behind."""

    cx: float
    cy: float
    scale: float
    roll: float
    yaw: float
    light: np.ndarray
    ambient: float
    diffuse: float
    white: np.ndarray
    noise: float
    blur: float
    wall: np.ndarray


def _scene(rng: np.random.Generator, side: int) -> _Scene:
    """Draw a video's setting on a canvas of ``side`` pixels."""
    az, el = rng.uniform(0, 2 * np.pi), rng.uniform(0.2, 1.1)
    return _Scene(
        cx=side * rng.uniform(0.42, 0.58),
        cy=side * rng.uniform(0.4, 0.52),
        scale=side * rng.uniform(0.17, 0.23),
        roll=rng.uniform(-12, 12),
        yaw=rng.uniform(-0.5, 0.5),
        light=np.array([np.cos(az) * np.sin(el), np.sin(az) * np.sin(el), np.cos(el)], np.float32),
        ambient=rng.uniform(0.25, 0.55),
        diffuse=rng.uniform(0.45, 0.8),
        white=np.clip(1 + rng.normal(0, 0.06, 3), 0.8, 1.2).astype(np.float32),
        noise=rng.uniform(0.004, 0.03),
        blur=rng.uniform(0.0, 0.6),
        wall=_background(rng, side),
    )


@dataclass(frozen=True)
class _Motion:
    """Small per-frame change: head shift/rotation, blink, gaze, lighting flicker."""

    dx: float
    dy: float
    droll: float
    dyaw: float
    blink: bool
    gaze: float
    gain: float


def _motion(rng: np.random.Generator, side: int) -> _Motion:
    """Draw one frame's small motion."""
    return _Motion(
        dx=rng.normal(0, 0.012) * side,
        dy=rng.normal(0, 0.01) * side,
        droll=rng.normal(0, 1.5),
        dyaw=rng.normal(0, 0.05),
        blink=bool(rng.random() < 0.15),
        gaze=rng.uniform(-1, 1),
        gain=float(1 + rng.normal(0, 0.025)),
    )


def _hair_masks(idt: Identity, x, y, cx, cy, fw, fh) -> tuple[np.ndarray, np.ndarray]:
    """Boolean masks of hair behind the head (long hair) and hair over the head (cap)."""
    u, v = (x - cx) / fw, (y - cy) / fh
    back = (idt.hair_style == 1) & ((u / 1.25) ** 2 + ((v - 0.3) / 1.3) ** 2 < 1)
    if idt.hair_style == 2:
        return back, np.zeros_like(back)
    line = -idt.hairline + 0.5 * u**2
    if idt.hair_style == 3:  # fringe: low, wavy hairline
        line = -0.3 + 0.05 * np.sin(u * 9) + 0.6 * u**2
    cap = ((u / 1.08) ** 2 + ((v + 0.04) / 1.08) ** 2 < 1) & (v < line)
    return back, cap


def _draw_eye(layer: _Layer, idt: Identity, ex, ey, ew, skin, m: _Motion, lw: int) -> None:
    """One eye (open or closed) with its eyebrow."""
    eh = ew * 0.5
    dark = skin * 0.35
    if m.blink:
        layer.ellipse((ex, ey), (ew, eh), skin * 0.92)
        layer.ellipse((ex, ey), (ew, eh * 0.5), dark, start=0, end=180, thickness=lw)
    else:
        layer.ellipse((ex, ey), (ew, eh), (0.93, 0.92, 0.9))
        ix = ex + m.gaze * ew * 0.3
        layer.ellipse((ix, ey), (eh * 0.9, eh * 0.9), idt.iris)
        layer.ellipse((ix, ey), (eh * 0.42, eh * 0.42), (0.04, 0.03, 0.03))
        layer.ellipse((ix + eh * 0.3, ey - eh * 0.3), (eh * 0.18, eh * 0.18), (1.0, 1.0, 1.0))
        layer.ellipse((ex, ey), (ew, eh), dark, start=180, end=360, thickness=lw)
    by = ey - ew * 1.1
    pts = [
        (ex - ew * 1.1, by + idt.brow_tilt * ew * 8),
        (ex, by - ew * 0.2),
        (ex + ew * 1.15, by + ew * 0.15),
    ]
    layer.polyline(pts, idt.hair * 0.85, max(1, round(idt.brow * ew * 6)))


def _face_layer(idt: Identity, sc: _Scene, m: _Motion, side: int) -> _Layer:
    """Draw the head, neck and shoulders (unrotated) on a transparent layer."""
    x, y = _grid(side)
    cx, cy = sc.cx + m.dx, sc.cy + m.dy
    yaw = sc.yaw + m.dyaw
    fw, fh = sc.scale * (1 - 0.08 * abs(yaw)), sc.scale * idt.aspect
    shift = yaw * fw * 0.25  # features move towards the side the head turns to
    lw = max(1, round(side / 90))
    skin = idt.skin
    layer = _Layer(side)
    back, cap = _hair_masks(idt, x, y, cx, cy, fw, fh)
    strands = _smooth_noise(np.random.default_rng(idt.texture_seed), side, (1, 7))
    hair_field = idt.hair * (1 + 0.25 * strands)[..., None]
    layer.paint(back, hair_field)
    layer.ellipse((cx, cy + 1.8 * fh), (2.2 * fw, 0.8 * fh), idt.shirt)
    layer.paint((np.abs(x - cx) < 0.42 * fw) & (y > cy + 0.4 * fh) & (y < cy + 1.3 * fh), skin * 0.8)
    for s in (-1, 1):
        layer.ellipse((cx + s * fw * 0.97 - shift * 0.3, cy - 0.02 * fh), (0.14 * fw, 0.24 * fh), skin * 0.92)
    layer.ellipse((cx, cy), (fw, fh * 0.9), skin)
    layer.ellipse((cx + shift * 0.2, cy + 0.2 * fh), (fw * idt.jaw, fh * 0.78), skin)
    layer.paint(cap, hair_field)
    ew, ey = idt.eye_w * fw, cy + (idt.eye_y - 0.08) * fh
    for s in (-1, 1):
        _draw_eye(layer, idt, cx + s * idt.eye_dx * fw + shift, ey, ew, skin, m, lw)
        if idt.glasses:
            layer.ellipse(
                (cx + s * idt.eye_dx * fw + shift, ey), (ew * 1.45, ew * 1.2), (0.08,) * 3, thickness=lw
            )
    if idt.glasses:
        layer.polyline([(cx + shift - 0.15 * fw, ey), (cx + shift + 0.15 * fw, ey)], (0.08,) * 3, lw)
    nx, ny = cx + shift * 1.3, cy + 0.3 * fh
    side_sign = 1 if sc.light[0] < 0 else -1  # nose shadow opposite the light
    layer.polyline(
        [(nx + side_sign * 0.05 * fw, ey + 0.1 * fh), (nx + side_sign * 0.1 * fw, ny)], skin * 0.75, lw
    )
    layer.ellipse((nx, ny), (idt.nose_w * fw, 0.06 * fh), skin * 0.88)
    for s in (-1, 1):
        layer.ellipse((nx + s * idt.nose_w * fw * 0.45, ny + 0.02 * fh), (0.04 * fw, 0.025 * fh), skin * 0.4)
    mx, my, mw = cx + shift, cy + idt.mouth_y * fh, idt.mouth_w * fw
    layer.ellipse((mx, my), (mw, 0.08 * fh), idt.lip)
    layer.ellipse((mx, my - idt.smile * fh), (mw, max(idt.smile, 0.01) * fh), skin * 0.3, 0, 0, 180, lw)
    return layer


def _shading(sc: _Scene, m: _Motion, side: int) -> np.ndarray:
    """Lambertian shading of an ellipsoid around the head, under the scene's light."""
    x, y = _grid(side)
    u = (x - sc.cx - m.dx) / (sc.scale * 1.2)
    v = (y - sc.cy - m.dy) / (sc.scale * 1.5)
    nz = np.sqrt(np.clip(1 - u**2 - v**2, 0.03, 1))
    n = np.stack([u, v, nz], -1) / np.sqrt(u**2 + v**2 + nz**2)[..., None]
    return sc.ambient + sc.diffuse * np.clip(n @ sc.light, 0, 1)


def _render_person(idt: Identity, sc: _Scene, m: _Motion, side: int) -> np.ndarray:
    """A clean live-style image (float RGB, canvas size): the shaded, rolled face over the wall."""
    layer = _face_layer(idt, sc, m, side)
    rgb = layer.rgb * _shading(sc, m, side)[..., None]
    rot = cv2.getRotationMatrix2D((sc.cx + m.dx, sc.cy + m.dy), sc.roll + m.droll, 1.0)
    rgb = cv2.warpAffine(rgb, rot, (side, side), flags=cv2.INTER_LINEAR)
    alpha = cv2.warpAffine(layer.alpha, rot, (side, side), flags=cv2.INTER_LINEAR)[..., None]
    wall = sc.wall * (0.55 + 0.45 * (sc.ambient + sc.diffuse * sc.light[2]))
    return rgb * alpha + wall * (1 - alpha)


# -------------------------------------------------------------------------------------- attacks


def _paste(canvas: np.ndarray, obj: np.ndarray, center, scale: float, angle: float) -> np.ndarray:
    """Composite ``obj`` (float RGB) onto ``canvas``, scaled, rotated and centred at ``center``."""
    h, w = obj.shape[:2]
    rot = cv2.getRotationMatrix2D((w / 2, h / 2), angle, scale)
    rot[:, 2] += np.asarray(center) - np.array([w / 2, h / 2])
    size = canvas.shape[1], canvas.shape[0]
    placed = cv2.warpAffine(obj, rot, size, flags=cv2.INTER_LINEAR)
    cover = cv2.warpAffine(np.ones((h, w), np.float32), rot, size, flags=cv2.INTER_LINEAR)[..., None]
    return placed + canvas * (1 - cover)


def _hand(rng: np.random.Generator, img: np.ndarray) -> np.ndarray:
    """A hand holding the medium: a palm outside the frame edge and a thumb reaching in."""
    side = img.shape[0]
    layer = _Layer(side)
    t = rng.uniform()
    skin = _SKIN_LIGHT * (1 - t) + _SKIN_DARK * t
    edge, pos = int(rng.integers(3)), rng.uniform(0.2, 0.8) * side  # bottom, left, right
    cx, cy, ang = [(pos, side, 90), (0, pos, 0), (side, pos, 180)][edge]
    ux, uy = np.cos(np.radians(ang)), -np.sin(np.radians(ang))
    layer.ellipse((cx - ux * 0.1 * side, cy - uy * 0.1 * side), (0.22 * side, 0.16 * side), skin * 0.9, -ang)
    layer.ellipse((cx + ux * 0.1 * side, cy + uy * 0.1 * side), (0.13 * side, 0.045 * side), skin, -ang + 20)
    a = cv2.GaussianBlur(layer.alpha, (0, 0), 0.7)[..., None]
    shade = 1 + 0.2 * _smooth_noise(rng, side, (9, 9))[..., None]
    return layer.rgb * shade * a + img * (1 - a)


def _halftone(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Amplitude-modulated halftone: one rotated dot screen per channel (pitch 2.4-4 output px)."""
    x, y = _grid(img.shape[0])
    pitch = rng.uniform(2.4, 4.0) * SUPERSAMPLE
    base = rng.uniform(0, np.pi / 2)
    sharp = rng.uniform(6, 14)
    out = np.empty_like(img)
    for c, offset in enumerate((np.radians(15), np.radians(75), 0.0)):
        a = base + offset
        u, v = np.cos(a) * x + np.sin(a) * y, -np.sin(a) * x + np.cos(a) * y
        screen = 0.5 + 0.25 * (np.cos(2 * np.pi * u / pitch) + np.cos(2 * np.pi * v / pitch))
        out[..., c] = 1 / (1 + np.exp(-sharp * (img[..., c] - screen)))
    strength = rng.uniform(0.3, 0.7)
    return img * (1 - strength) + out * strength


def _bend(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Smoothly warp the paper and shade it like a bent sheet."""
    side = img.shape[0]
    x, y = _grid(side)
    amp = rng.uniform(0.01, 0.035) * side
    field = [
        cv2.resize(rng.normal(0, 1, (3, 3)).astype(np.float32), (side, side), cv2.INTER_CUBIC) for _ in (0, 1)
    ]
    bent = cv2.remap(
        img, x + amp * field[0] - 0.5, y + amp * field[1] - 0.5, cv2.INTER_LINEAR, None, cv2.BORDER_REFLECT
    )
    return bent * (1 + 0.06 * field[0])[..., None]


def _print_attack(photo: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The printed sheet (paper margin included) before it is placed in the capture scene."""
    side = photo.shape[0]
    img = cv2.GaussianBlur(photo, (0, 0), rng.uniform(0.3, 1.0))
    grey = img.mean(-1, keepdims=True)
    img = grey + (img - grey) * rng.uniform(0.4, 0.8)  # narrow gamut
    contrast = rng.uniform(0.65, 0.9)
    img = 0.5 + (img - 0.5) * contrast
    img = _halftone(np.clip(img, 0, 1), rng)
    paper = np.array([1.0, 0.98, 0.93]) * rng.uniform(0.88, 1.0)
    margin = int(rng.integers(1, round(0.08 * side) + 1))
    sheet = np.empty((side + 2 * margin, side + 2 * margin, 3), np.float32)
    sheet[:] = paper
    sheet[margin:-margin, margin:-margin] = img * paper
    sheet = cv2.resize(sheet, (side, side), interpolation=cv2.INTER_AREA)
    fibres = _smooth_noise(rng, side, (int(rng.integers(1, 4)), int(rng.integers(3, 9))))
    sheet *= 1 + rng.uniform(0.02, 0.06) * fibres[..., None]
    return _bend(sheet, rng)


def _screen_params(rng: np.random.Generator, side: int) -> dict:
    """Per-video display properties (fixed across the video's frames)."""
    return {
        "gamma": rng.choice([rng.uniform(0.6, 0.85), rng.uniform(1.2, 1.6)]),
        "tint": np.array([rng.uniform(0.9, 1), rng.uniform(0.96, 1.03), rng.uniform(1, 1.12)], np.float32),
        "angle": rng.uniform(-0.08, 0.08),
        "pitch": rng.uniform(2.0, 3.6) * SUPERSAMPLE,
        "gap": rng.uniform(0.1, 0.5),
        "grid": rng.uniform(0.2, 0.55),
        "mfreq": rng.uniform(1 / 9, 1 / 3.5) / SUPERSAMPLE,
        "curv": rng.uniform(-3, 3) / side**2,
        "mx": rng.uniform(0, side),
        "mphase": rng.uniform(0, 2 * np.pi),
        "moire": rng.uniform(0.02, 0.09),
        "band": rng.uniform(0.0, 0.05),
        "band_period": rng.uniform(0.2, 0.6) * side,
        "glare": rng.uniform(0.05, 0.45),
        "glare_at": rng.uniform(0, side, 2),
        "glare_rot": rng.uniform(0, np.pi),
        "glare_axes": rng.uniform([0.1, 0.04], [0.35, 0.2]) * side,
    }


def _glare(x: np.ndarray, y: np.ndarray, at: np.ndarray, rot: float, axes: np.ndarray) -> np.ndarray:
    """A rotated elliptical Gaussian highlight (reflection on the screen's glass)."""
    c, s = np.cos(rot), np.sin(rot)
    u, v = (x - at[0]) * c + (y - at[1]) * s, (y - at[1]) * c - (x - at[0]) * s
    return np.exp(-0.5 * ((u / axes[0]) ** 2 + (v / axes[1]) ** 2))


def _screen_content(frame: np.ndarray, rng: np.random.Generator, p: dict) -> np.ndarray:
    """A displayed frame seen up close: gamma, sub-pixel RGB grid, moiré, refresh banding, glare."""
    x, y = _grid(frame.shape[0])
    img = np.clip(frame, 0, 1) ** p["gamma"] * p["tint"]
    u = np.cos(p["angle"]) * x + np.sin(p["angle"]) * y
    v = np.cos(p["angle"]) * y - np.sin(p["angle"]) * x
    rows = 1 - p["gap"] * (0.5 + 0.5 * np.cos(2 * np.pi * v / p["pitch"])) ** 6
    phase = 2 * np.pi * (u * p["mfreq"] + p["curv"] * ((x - p["mx"]) ** 2 + v**2)) + p["mphase"]
    for c in range(3):
        sub = (0.5 + 0.5 * np.cos(2 * np.pi * (u / p["pitch"] - c / 3))) ** 2 / 0.375  # mean 1
        img[..., c] *= (1 - p["grid"] + p["grid"] * sub) * rows
        img[..., c] += p["moire"] * np.sin(phase + 2 * np.pi * c / 3)
    band = 1 + p["band"] * np.sin(2 * np.pi * y / p["band_period"] + rng.uniform(0, 2 * np.pi))
    glare = _glare(x, y, p["glare_at"] + rng.normal(0, 0.01 * x.shape[0], 2), p["glare_rot"], p["glare_axes"])
    return img * band[..., None] + p["glare"] * glare[..., None]


def _bezel(screen: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Surround the screen with a device frame (dark or silver) with rounded corners."""
    side = screen.shape[0]
    b = int(rng.integers(round(0.04 * side), round(0.12 * side) + 1))
    colour = rng.uniform(0.02, 0.2) if rng.random() < 0.75 else rng.uniform(0.55, 0.75)
    dev = np.pad(screen, ((b, b), (b, b), (0, 0)), constant_values=colour)
    dev += rng.uniform(0.0, 0.04) * _smooth_noise(rng, dev.shape[0], (5, 5))[..., None]
    return dev


# ------------------------------------------------------------------------------------ camera, videos


def _stats(img: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and std."""
    return img.mean((0, 1)), img.std((0, 1))


def _downscale(img: np.ndarray, cam: _Scene, gain: float, size: int) -> np.ndarray:
    """White balance and exposure, then area-downscale the canvas to the output size."""
    return cv2.resize((img * cam.white * gain).astype(np.float32), (size, size), interpolation=cv2.INTER_AREA)


def _capture(img: np.ndarray, cam: _Scene, rng: np.random.Generator, clean: np.ndarray) -> np.ndarray:
    """Camera (defocus, sensor noise on the downscaled ``img``), then per-channel stats set to ``clean``'s.

    ``clean`` is a noise-free live-style frame, for live and attack frames alike, so colour statistics
    follow one distribution whatever the class.
    """
    if cam.blur > 0.05:
        img = cv2.GaussianBlur(img, (0, 0), cam.blur)
    img = img + rng.normal(0, cam.noise, img.shape) + rng.normal(0, cam.noise / 2, (*img.shape[:2], 1))
    mean, std = _stats(np.clip(clean, 0, 1))
    for _ in range(2):  # a second pass corrects what clipping moved
        m, s = _stats(img)
        img = np.clip((img - m) / np.maximum(s, 1e-6) * std + mean, 0, 1)
    return (img * 255 + 0.5).astype(np.uint8)


@dataclass(frozen=True)
class Session:
    """A live recording of a subject: its scene, and per frame the canvas and the clean output frame."""

    scene: _Scene
    shown: list[np.ndarray]
    clean: list[np.ndarray]


def film_session(idt: Identity, rng: np.random.Generator, frames: int, size: int) -> Session:
    """Film the subject: the scene and per-frame motion come from ``rng``."""
    side = size * SUPERSAMPLE
    scene = _scene(rng, side)
    motions = [_motion(rng, side) for _ in range(frames)]
    shown = [_render_person(idt, scene, m, side) for m in motions]
    clean = [_downscale(s, scene, m.gain, size) for s, m in zip(shown, motions, strict=True)]
    return Session(scene, shown, clean)


def live_frames(session: Session, rng: np.random.Generator) -> list[np.ndarray]:
    """The session's frames as its own camera records them (uint8 RGB, output size); noise from ``rng``."""
    return [_capture(clean, session.scene, rng, clean) for clean in session.clean]


def attack_frames(session: Session, rng: np.random.Generator, kind: str, size: int) -> Iterator[np.ndarray]:
    """Frames (uint8 RGB, output size) of a print (a photo of the session's first frame) or replay (the
    session's video) attack, held in front of another camera and wall; randomness from ``rng``. Each
    frame gets the colour statistics of its source."""
    side = size * SUPERSAMPLE
    cam = _scene(rng, side)  # the recapture: its wall, white balance and camera
    framed = rng.random() < 0.45  # medium smaller than the frame: paper edges or bezel visible
    scale = rng.uniform(0.7, 0.9) if framed else rng.uniform(1.0, 1.12)
    angle, centre = rng.uniform(-6, 6), side * (0.5 + rng.uniform(-0.06, 0.06, 2) * framed)
    hand_seed = int(rng.integers(2**62)) if rng.random() < 0.35 else None  # same hand in every frame
    bezel_seed = int(rng.integers(2**62))
    if kind == "print":
        sheet = _print_attack(session.shown[0], rng)
    else:
        screen = _screen_params(rng, side)
    for f, shown in enumerate(session.shown):
        m = _motion(rng, side)  # hand shake and light flicker of the recapture
        if kind == "print":
            medium, clean = sheet, session.clean[0] * m.gain
        else:
            medium = _screen_content(shown, rng, screen)
            medium = _bezel(medium, np.random.default_rng(bezel_seed)) if framed else medium
            clean = session.clean[f]
        jitter = rng.normal(0, 0.004 * side, 2)
        img = _paste(cam.wall, medium, centre + jitter, scale * side / medium.shape[0], angle + m.droll * 0.3)
        if hand_seed is not None:
            img = _hand(np.random.default_rng(hand_seed), img)
        yield _capture(_downscale(img, cam, m.gain, size), cam, rng, clean)
