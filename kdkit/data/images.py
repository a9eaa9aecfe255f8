"""Image files → 8-bit RGB arrays, whatever mode the writing tool chose.

`read_rgb` is the one place kdkit and its plugins decode an image file (data sets, `kdkit predict`,
data preparation). Pillow's own `convert("RGB")` clips 16- and 32-bit pixels to 255 (a 16-bit PNG
turns white), ignores transparency and the EXIF orientation; here every mode Pillow reads is mapped
to what a viewer shows:

- 1, L, P, RGB, RGBX, CMYK, YCbCr: Pillow's conversion to RGB (a CMYK JPEG included);
- I;16, I;16L, I;16B, I;16N (16-bit) and I (32-bit integer): scaled from the format's range to
  0–255 (rounded), keeping the order of the values. The range is 0 … 2^bits − 1 with the bits of a
  TIFF's BitsPerSample tag, else 16 bits (Pillow stores 16-bit PNG and PGM pixels in I and I;16);
  a value outside that range is an error;
- F (32-bit float): read as 0–1 (the usual float-image convention) and scaled to 0–255; a value
  that does not round into 0–255, or is not finite, is an error;
- with an alpha channel (LA, La, PA, RGBA, RGBa) or a transparent colour (a PNG/GIF `transparency`):
  composited onto black, so a transparent pixel reads 0 whatever colour is stored under it;
- the EXIF orientation tag is applied (a phone photo stored sideways comes out upright).

Other modes (LAB, HSV) and files that are missing, truncated or not images raise `ImageError`
naming the file and what was expected.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from kdkit.data.datasets import DataError

_PILLOW_RGB = ("1", "L", "P", "RGB", "RGBX", "CMYK", "YCbCr")
_ALPHA = ("LA", "La", "PA", "RGBA", "RGBa")
_INTEGER = ("I", "I;16", "I;16L", "I;16B", "I;16N")
MODES = (*_PILLOW_RGB, *_ALPHA, *_INTEGER, "F")  # the modes `read_rgb` accepts
_TIFF_BITS_PER_SAMPLE = 258
EXPECTED = "an image file Pillow reads (PNG, JPEG, BMP, TIFF, WebP, GIF, PPM, ...)"


class ImageError(DataError):
    """An image file that cannot be read as RGB; `reason` is the message without the file name."""

    def __init__(self, message: str, reason: str = "") -> None:
        super().__init__(message)
        self.reason = reason or message


IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")  # the image files kdkit reads


def read_rgb(path: str | Path) -> np.ndarray:
    """The image at `path` as a uint8 (H, W, 3) RGB array, upright (see the module docstring)."""
    try:
        with Image.open(path) as image:
            image.load()  # decode now, so that a truncated file fails here
            ImageOps.exif_transpose(image, in_place=True)  # in place: keeps a TIFF's tags for to_rgb
            return to_rgb(image)
    except FileNotFoundError:
        raise ImageError(f"{path}: no such file", "no such file") from None
    except ImageError as exc:
        raise ImageError(f"{path}: {exc.reason}", exc.reason) from None
    except UnidentifiedImageError:
        reason = f"not an image file; expected {EXPECTED}"
        raise ImageError(f"{path}: {reason}", reason) from None
    # Pillow's decoders signal bad data with all of these (SyntaxError: a broken PNG chunk).
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as exc:
        reason = f"not a readable image ({exc}); expected {EXPECTED}"
        raise ImageError(f"{path}: {reason}", reason) from None


def to_rgb(image: Image.Image) -> np.ndarray:
    """A decoded Pillow image of any supported mode as a uint8 (H, W, 3) RGB array."""
    if image.mode == "La":  # premultiplied grey: Pillow converts it to RGBA only through LA
        image = image.convert("LA")
    mode = image.mode
    if mode in _ALPHA or (mode in _PILLOW_RGB and "transparency" in image.info):
        rgba = np.asarray(image.convert("RGBA"), dtype=np.uint16)
        composited = (rgba[..., :3] * rgba[..., 3:] + 127) // 255  # onto black
        return composited.astype(np.uint8)
    if mode in _PILLOW_RGB:
        return np.array(image.convert("RGB"))  # a copy: Pillow's buffer is read-only
    if mode in _INTEGER:
        bits = getattr(image, "tag_v2", {}).get(_TIFF_BITS_PER_SAMPLE, 16)
        bits = bits[0] if isinstance(bits, tuple) else bits
        return _grey(_scaled(np.asarray(image, dtype=np.float64), 2.0**bits - 1, f"{bits}-bit {mode}"))
    if mode == "F":
        return _grey(_scaled(np.asarray(image, dtype=np.float64), 1.0, "float (F)"))
    raise ImageError(f"image mode {mode!r} is not supported; expected one of {', '.join(MODES)}")


def _scaled(values: np.ndarray, top: float, what: str) -> np.ndarray:
    """`values` in 0 … `top` mapped to 0–255 (rounded); anything outside is an error."""
    scaled = np.rint(values * (255.0 / top))
    if not np.isfinite(scaled).all() or scaled.min(initial=0) < 0 or scaled.max(initial=0) > 255:
        low, high = np.nanmin(values), np.nanmax(values)
        raise ImageError(
            f"{what} pixels range over {low:g} … {high:g}, outside the format's 0 … {top:g} "
            "(or not finite); save the image as 8-bit RGB"
        )
    return scaled.astype(np.uint8)


def _grey(channel: np.ndarray) -> np.ndarray:
    return np.repeat(channel[..., None], 3, axis=2)
