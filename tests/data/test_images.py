"""`kdkit.data.images.read_rgb`: every image mode Pillow reads arrives as the 8-bit RGB a viewer shows."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from kdkit.data.datasets import DataError
from kdkit.data.images import ImageError, read_rgb, to_rgb
from kdkit.deploy.inputs import InputError, read_frames

RED, GREEN = (255, 0, 0), (0, 255, 0)


def _saved(image: Image.Image, path: Path, **options: object) -> Path:
    image.save(path, **options)
    with Image.open(path) as reread:
        assert reread.mode == image.mode or image.mode == "YCbCr"  # the mode the test is about
    return path


def _gradient16() -> np.ndarray:
    return (np.arange(64, dtype=np.uint32) * 1040).clip(0, 65535).astype(np.uint16).reshape(4, 16)


def test_a_16_bit_png_keeps_its_gradient_instead_of_turning_white(tmp_path: Path) -> None:
    values = _gradient16()
    rgb = read_rgb(_saved(Image.fromarray(values), tmp_path / "g16.png"))  # mode I;16
    assert rgb.dtype == np.uint8 and rgb.shape == (4, 16, 3)
    assert (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 0] == rgb[..., 2]).all()
    assert (rgb[..., 0] == np.rint(values / 257)).all()  # 0 … 65535 scaled to 0 … 255
    flat = rgb[..., 0].ravel()
    assert (np.diff(flat.astype(int)) >= 0).all() and flat[0] == 0 and flat[-1] == 255


def test_16_bit_big_endian_and_32_bit_integer_tiffs_scale_by_their_bit_depth(tmp_path: Path) -> None:
    values = _gradient16()
    big = Image.frombytes("I;16B", (16, 4), values.astype(">u2").tobytes())
    assert (read_rgb(_saved(big, tmp_path / "big.tif"))[..., 0] == np.rint(values / 257)).all()
    wide = np.array([[0, 2**31 - 1]], np.int32)  # BitsPerSample 32: 0 … 2^32 - 1
    assert read_rgb(_saved(Image.fromarray(wide), tmp_path / "i32.tif"))[0, :, 0].tolist() == [0, 127]


def test_a_16_bit_pgm_read_as_mode_i_scales_by_16_bits(tmp_path: Path) -> None:
    path = tmp_path / "g16.pgm"
    path.write_bytes(b"P5\n3 1\n65535\n" + np.array([0, 32896, 65535], ">u2").tobytes())
    with Image.open(path) as image:
        assert image.mode == "I"
    assert read_rgb(path)[0, :, 0].tolist() == [0, 128, 255]


def test_float_images_are_read_as_0_to_1(tmp_path: Path) -> None:
    values = np.array([[0.0, 0.5, 1.0]], np.float32)
    assert read_rgb(_saved(Image.fromarray(values), tmp_path / "f.tif"))[0, :, 1].tolist() == [0, 128, 255]
    bright = _saved(Image.fromarray(values * 255), tmp_path / "f255.tif")
    with pytest.raises(ImageError, match=r"f255\.tif: float \(F\) pixels range over 0 … 255, outside"):
        read_rgb(bright)


@pytest.mark.parametrize(
    ("mode", "value", "want"),
    [
        ("1", 1, (255, 255, 255)),
        ("L", 77, (77, 77, 77)),
        ("RGB", (10, 20, 30), (10, 20, 30)),
        ("LA", (200, 255), (200, 200, 200)),
        ("LA", (200, 128), (100, 100, 100)),  # composited onto black
        ("LA", (200, 0), (0, 0, 0)),
        ("RGBA", (200, 100, 50, 0), (0, 0, 0)),  # a fully transparent pixel, whatever its colour
        ("RGBA", (200, 100, 50, 255), (200, 100, 50)),
    ],
)
def test_png_modes(tmp_path: Path, mode: str, value: object, want: tuple[int, int, int]) -> None:
    rgb = read_rgb(_saved(Image.new(mode, (3, 2), value), tmp_path / "x.png"))  # type: ignore[arg-type]
    assert rgb.shape == (2, 3, 3) and rgb.dtype == np.uint8
    assert (rgb == want).all(), rgb[0, 0]


def test_palette_images_with_and_without_transparency(tmp_path: Path) -> None:
    image = Image.new("P", (2, 1))
    image.putpalette([*RED, *GREEN])
    image.putpixel((1, 0), 1)
    assert read_rgb(_saved(image, tmp_path / "p.png")).tolist() == [[list(RED), list(GREEN)]]
    transparent = _saved(image, tmp_path / "pt.png", transparency=0)  # colour 0 (red) is transparent
    assert read_rgb(transparent).tolist() == [[[0, 0, 0], list(GREEN)]]
    assert read_rgb(_saved(image, tmp_path / "p.gif", transparency=0)).tolist() == [[[0, 0, 0], list(GREEN)]]


def test_premultiplied_and_palette_alpha_modes() -> None:
    assert to_rgb(Image.new("PA", (1, 1), (0, 0))).tolist() == [[[0, 0, 0]]]
    assert to_rgb(Image.new("RGBa", (1, 1), (100, 50, 0, 255))).tolist() == [[[100, 50, 0]]]
    assert to_rgb(Image.new("La", (1, 1), (90, 255))).tolist() == [[[90, 90, 90]]]


def test_cmyk_and_ycbcr_come_out_in_their_colour(tmp_path: Path) -> None:
    red = Image.new("CMYK", (8, 8), (0, 255, 255, 0))
    for path in (_saved(red, tmp_path / "red.jpg", quality=95), _saved(red, tmp_path / "red.tif")):
        rgb = read_rgb(path).astype(int)
        assert (rgb[..., 0] > 240).all() and (rgb[..., 1:] < 15).all(), rgb[0, 0]
    ycc = to_rgb(Image.new("YCbCr", (1, 1), (76, 85, 255))).astype(int)
    assert np.abs(ycc[0, 0] - RED).max() <= 3


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    stored = np.zeros((16, 32, 3), np.uint8)  # 32 wide, 16 high: left half red, right half green
    stored[:, :16], stored[:, 16:] = RED, GREEN
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display", what a phone held upright writes
    path = tmp_path / "phone.jpg"
    Image.fromarray(stored).save(path, exif=exif, quality=95)
    rgb = read_rgb(path).astype(int)
    assert rgb.shape == (32, 16, 3)  # upright: 16 wide, 32 high
    assert (rgb[:12, :, 0] > 200).all() and (rgb[20:, :, 1] > 200).all()  # the stored left is on top


def test_unreadable_files_are_refused_by_name(tmp_path: Path) -> None:
    Image.new("RGB", (64, 64), (1, 2, 3)).save(tmp_path / "whole.png")
    data = (tmp_path / "whole.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    (tmp_path / "notes.png").write_text("not an image")
    Image.new("LAB", (2, 2)).save(tmp_path / "lab.tif")
    cases = {
        "cut.png": r"cut\.png: not a readable image",
        "notes.png": r"notes\.png: not an image file; expected an image file Pillow reads",
        "lab.tif": r"lab\.tif: image mode 'LAB' is not supported; expected one of 1, L, P",
        "absent.png": r"absent\.png: no such file",
    }
    for name, match in cases.items():
        with pytest.raises(DataError, match=match):
            read_rgb(tmp_path / name)


def test_predict_reads_images_through_read_rgb(tmp_path: Path) -> None:
    path = _saved(Image.fromarray(_gradient16()), tmp_path / "g16.png")
    (frame,) = read_frames(path, k=4)
    assert (frame == read_rgb(path)).all() and frame.max() == 255 and frame.min() == 0
    Image.new("RGB", (64, 64), (9, 9, 9)).save(tmp_path / "whole.jpg")
    (tmp_path / "bad.jpg").write_bytes((tmp_path / "whole.jpg").read_bytes()[:200])  # cut short
    with pytest.raises(InputError, match=r"^not a readable image") as info:
        read_frames(tmp_path / "bad.jpg", k=4)
    assert str(tmp_path) not in str(info.value)  # predict prints the path beside the reason
