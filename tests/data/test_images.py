"""load_rgb / to_rgb for every image mode, resize_and_crop geometry, to_tensor values."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lora_scripts.data.images import load_rgb, resize_and_crop, to_rgb, to_tensor
from tests.data.imagefiles import BLUE, GREEN, RED, WHITE, split_image, write_png_rgb16


def pixel(img: Image.Image, xy: tuple[int, int]) -> tuple[int, ...]:
    value = img.getpixel(xy)
    assert isinstance(value, tuple)
    return value


def assert_close(actual: tuple[int, ...], expected: tuple[int, ...], tolerance: int) -> None:
    assert max(abs(a - e) for a, e in zip(actual, expected, strict=True)) <= tolerance, (actual, expected)


# ---- modes, read from files ------------------------------------------------------------------------------


def test_rgb_png_is_returned_unchanged(tmp_path: Path) -> None:
    original = split_image((8, 4), RED, BLUE)
    original.save(tmp_path / "a.png")
    loaded = load_rgb(tmp_path / "a.png")
    assert loaded.mode == "RGB"
    assert np.array_equal(np.asarray(loaded), np.asarray(original))


def test_rgba_transparent_region_becomes_white(tmp_path: Path) -> None:
    pixels = np.zeros((4, 8, 4), dtype=np.uint8)
    pixels[:, :4] = (255, 0, 0, 255)  # opaque red
    pixels[:, 4:6] = (0, 0, 0, 0)  # fully transparent black: must not come out black
    pixels[:, 6:] = (0, 0, 255, 128)  # half-transparent blue
    Image.fromarray(pixels, mode="RGBA").save(tmp_path / "a.png")
    loaded = load_rgb(tmp_path / "a.png")
    assert loaded.mode == "RGB"
    assert pixel(loaded, (0, 0)) == RED
    assert pixel(loaded, (4, 0)) == WHITE
    assert_close(pixel(loaded, (7, 0)), (127, 127, 255), tolerance=1)


def test_la_transparent_region_becomes_white(tmp_path: Path) -> None:
    pixels = np.zeros((2, 4, 2), dtype=np.uint8)
    pixels[:, :2] = (60, 255)
    pixels[:, 2:] = (0, 0)
    Image.fromarray(pixels, mode="LA").save(tmp_path / "a.png")
    loaded = load_rgb(tmp_path / "a.png")
    assert pixel(loaded, (0, 0)) == (60, 60, 60)
    assert pixel(loaded, (3, 0)) == WHITE


def test_palette_image_keeps_its_colors(tmp_path: Path) -> None:
    palette_image = split_image((8, 4), RED, BLUE).convert("P", palette=Image.Palette.ADAPTIVE, colors=4)
    palette_image.save(tmp_path / "a.png")
    loaded = load_rgb(tmp_path / "a.png")
    assert Image.open(tmp_path / "a.png").mode == "P"
    assert pixel(loaded, (0, 0)) == RED
    assert pixel(loaded, (7, 3)) == BLUE


def test_palette_transparent_index_becomes_white(tmp_path: Path) -> None:
    img = Image.new("P", (4, 2), 0)
    img.putpalette([0, 0, 0, 255, 0, 0] + [0] * (3 * 254))  # index 0 black, index 1 red
    img.paste(1, (0, 0, 2, 2))
    img.save(tmp_path / "a.png", transparency=0)  # index 0 (black) is transparent
    reopened = Image.open(tmp_path / "a.png")
    assert reopened.mode == "P" and "transparency" in reopened.info
    loaded = load_rgb(tmp_path / "a.png")
    assert pixel(loaded, (0, 0)) == RED
    assert pixel(loaded, (3, 1)) == WHITE


@pytest.mark.parametrize("mode", ["L", "1"])
def test_grayscale_and_bilevel(tmp_path: Path, mode: str) -> None:
    img = Image.new("L", (4, 2), 0)
    img.paste(255, (2, 0, 4, 2))
    img.convert(mode).save(tmp_path / "a.png")
    loaded = load_rgb(tmp_path / "a.png")
    assert pixel(loaded, (0, 0)) == (0, 0, 0)
    assert pixel(loaded, (3, 0)) == WHITE


def test_cmyk_jpeg(tmp_path: Path) -> None:
    Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(tmp_path / "a.jpg", quality=95)  # red in CMYK
    assert Image.open(tmp_path / "a.jpg").mode == "CMYK"
    assert_close(pixel(load_rgb(tmp_path / "a.jpg"), (8, 8)), RED, tolerance=4)


def test_16_bit_grayscale_png_maps_monotonically_onto_0_to_255(tmp_path: Path) -> None:
    gradient = np.linspace(0, 65535, 512).round().astype(np.uint16)[None, :].repeat(2, axis=0)
    Image.fromarray(gradient).save(tmp_path / "a.png")
    assert Image.open(tmp_path / "a.png").mode == "I;16"
    loaded = np.asarray(load_rgb(tmp_path / "a.png"))
    row = loaded[0, :, 0].astype(int)
    assert np.array_equal(loaded[..., 0], loaded[..., 1]) and np.array_equal(loaded[..., 0], loaded[..., 2])
    assert row[0] == 0 and row[-1] == 255
    assert np.all(np.diff(row) >= 0)
    assert len(np.unique(row)) == 256  # every 8-bit level is used: scaled, not clipped to white
    assert abs(row[256] - 128) <= 1


def test_16_bit_rgb_png_keeps_the_high_byte(tmp_path: Path) -> None:
    pixels = np.zeros((2, 3, 3), dtype=np.uint16)
    pixels[..., 0] = 65535
    pixels[..., 1] = 0x8000
    pixels[..., 2] = 0x00FF
    loaded = load_rgb(write_png_rgb16(tmp_path / "a.png", pixels))
    assert pixel(loaded, (1, 1)) == (255, 128, 0)


@pytest.mark.parametrize("suffix, options", [(".webp", {"lossless": True}), (".bmp", {})])
def test_webp_and_bmp(tmp_path: Path, suffix: str, options: dict[str, object]) -> None:
    original = split_image((8, 4), GREEN, BLUE)
    original.save(tmp_path / f"a{suffix}", **options)
    assert np.array_equal(np.asarray(load_rgb(tmp_path / f"a{suffix}")), np.asarray(original))


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    # Stored 40 wide x 20 high, red on the left; orientation 6 means "rotate 90 degrees clockwise to display",
    # so the displayed image is 20 wide x 40 high with red on top.
    exif = Image.Exif()
    exif[0x0112] = 6
    split_image((40, 20), RED, BLUE).save(tmp_path / "a.jpg", exif=exif, quality=95)
    loaded = load_rgb(tmp_path / "a.jpg")
    assert loaded.size == (20, 40)
    assert_close(pixel(loaded, (10, 5)), RED, tolerance=8)
    assert_close(pixel(loaded, (10, 34)), BLUE, tolerance=8)


def test_unreadable_file_raises(tmp_path: Path) -> None:
    (tmp_path / "a.png").write_text("not an image")
    with pytest.raises(OSError):
        load_rgb(tmp_path / "a.png")


# ---- modes that only exist in memory (or in TIFFs) ------------------------------------------------------


def test_16_bit_big_endian_and_32_bit_int() -> None:
    values = np.array([[0, 257, 32896, 65535]])
    for dtype, mode in ((">u2", "I;16B"), (np.int32, "I")):
        img = Image.fromarray(values.astype(dtype))
        assert img.mode == mode
        assert np.asarray(to_rgb(img))[0, :, 0].tolist() == [0, 1, 128, 255]


def test_32_bit_int_outside_16_bit_range_is_stretched() -> None:
    img = Image.fromarray(np.array([[-100, 0, 100]], dtype=np.int32))
    assert np.asarray(to_rgb(img))[0, :, 0].tolist() == [0, 128, 255]


@pytest.mark.parametrize(
    "values, expected",
    [
        ([0.0, 0.5, 1.0], [0, 128, 255]),  # 0..1 convention
        ([0.0, 100.0, 255.0], [0, 100, 255]),  # already 8-bit range
        ([-1.0, 0.0, 3.0], [0, 64, 255]),  # anything else: stretched
    ],
)
def test_float_images(values: list[float], expected: list[int]) -> None:
    img = Image.fromarray(np.array([values], dtype=np.float32))
    assert img.mode == "F"
    assert np.asarray(to_rgb(img))[0, :, 0].tolist() == expected


@pytest.mark.parametrize("mode", ["PA", "La", "RGBa"])
def test_other_alpha_modes_composite_on_white(mode: str) -> None:
    # Pillow's RGBA -> La conversion makes everything opaque, so La starts from LA.
    source = Image.new("LA", (2, 2), (0, 0)) if mode == "La" else Image.new("RGBA", (2, 2), (0, 0, 0, 0))
    transparent = source.convert(mode)
    alpha = transparent.getchannel(transparent.getbands()[-1])
    assert transparent.mode == mode and alpha.getextrema() == (0, 0)
    assert pixel(to_rgb(transparent), (0, 0)) == WHITE


def test_ycbcr() -> None:
    img = Image.new("RGB", (2, 2), (200, 30, 90)).convert("YCbCr")
    assert_close(pixel(to_rgb(img), (0, 0)), (200, 30, 90), tolerance=3)


# ---- resize_and_crop ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [(200, 100), (100, 200), (50, 30), (64, 64), (65, 1000), (1000, 65)])
def test_resize_and_crop_gives_a_square(size: tuple[int, int]) -> None:
    assert resize_and_crop(Image.new("RGB", size), 64).size == (64, 64)


def test_resize_and_crop_keeps_the_center_horizontally() -> None:
    # 200x100 -> 128x64; the center 64 columns are 32..95, the red/blue edge at 64 lands on column 32.
    out = np.asarray(resize_and_crop(split_image((200, 100), RED, BLUE), 64))
    assert np.all(out[:, :28] == RED)
    assert np.all(out[:, 36:] == BLUE)
    assert out[32, 30, 0] > out[32, 30, 2] and out[32, 33, 2] > out[32, 33, 0]  # the edge sits at 31.5


def test_resize_and_crop_keeps_the_center_vertically() -> None:
    tall = split_image((200, 100), RED, BLUE).transpose(Image.Transpose.ROTATE_90)  # red at the bottom
    out = np.asarray(resize_and_crop(tall, 64))
    assert np.all(out[:28] == BLUE)
    assert np.all(out[36:] == RED)


def test_resize_and_crop_drops_the_sides() -> None:
    # Three 100-pixel stripes -> 192x64; the center crop is exactly the green stripe.
    pixels = np.zeros((100, 300, 3), dtype=np.uint8)
    pixels[:, :100], pixels[:, 100:200], pixels[:, 200:] = RED, GREEN, BLUE
    out = np.asarray(resize_and_crop(Image.fromarray(pixels), 64))
    assert np.all(out[:, 4:60] == GREEN)


def test_resize_and_crop_upscales_small_images() -> None:
    out = resize_and_crop(Image.new("RGB", (8, 4), RED), 32)
    assert out.size == (32, 32)
    assert np.all(np.asarray(out) == RED)


# ---- to_tensor -------------------------------------------------------------------------------------------


def test_to_tensor_shape_range_and_values() -> None:
    pixels = np.array([[[0, 255, 51], [255, 0, 102]]], dtype=np.uint8)  # H=1, W=2
    tensor = to_tensor(Image.fromarray(pixels, mode="RGB"))
    assert tensor.shape == (3, 1, 2) and tensor.dtype == torch.float32
    expected = torch.tensor([[[-1.0, 1.0]], [[1.0, -1.0]], [[-0.6, -0.2]]])
    assert torch.allclose(tensor, expected, atol=1e-6)
    assert tensor.is_contiguous()


def test_to_tensor_refuses_other_modes() -> None:
    with pytest.raises(ValueError, match="RGB"):
        to_tensor(Image.new("L", (2, 2)))
