"""fit_to_bucket geometry (sizes, crop offsets, random crops) and flip_horizontal."""

from __future__ import annotations

import random

import numpy as np
import pytest
from PIL import Image

from lora_scripts.data.images import fit_to_bucket, flip_horizontal, resize_and_crop
from tests.data.imagefiles import BLUE, RED, split_image

SIZES = [
    (1, 1),
    (7, 3),
    (3, 7),
    (64, 64),
    (100, 37),
    (37, 100),
    (513, 512),
    (640, 480),
    (1000, 999),
    (97, 1001),
]
BUCKETS = [(64, 64), (64, 128), (128, 64), (192, 128), (48, 80)]


def gradient(size: tuple[int, int]) -> Image.Image:
    """An RGB image whose pixels all differ (so a crop in the wrong place changes the result)."""
    width, height = size
    xs, ys = np.meshgrid(np.arange(width), np.arange(height))
    pixels = np.stack([xs * 7 % 256, ys * 11 % 256, (xs + ys) * 3 % 256], axis=-1).astype(np.uint8)
    return Image.fromarray(pixels, mode="RGB")


@pytest.mark.parametrize("bucket", BUCKETS)
@pytest.mark.parametrize("size", SIZES)
def test_output_is_exactly_the_bucket(size: tuple[int, int], bucket: tuple[int, int]) -> None:
    img = Image.new("RGB", size)
    fitted, (left, top) = fit_to_bucket(img, bucket)
    assert fitted.size == bucket
    assert fitted.mode == "RGB"
    # One side fits exactly, so one offset is 0.
    assert left == 0 or top == 0
    assert left >= 0 and top >= 0


@pytest.mark.parametrize("resolution", [1, 5, 64, 100])
@pytest.mark.parametrize("size", SIZES)
def test_square_bucket_equals_resize_and_crop(size: tuple[int, int], resolution: int) -> None:
    img = gradient(size)
    fitted, _ = fit_to_bucket(img, (resolution, resolution))
    assert np.array_equal(np.asarray(fitted), np.asarray(resize_and_crop(img, resolution)))


def test_center_crop_offsets_hand_computed() -> None:
    # 1000x500 into 128x128: scale max(0.128, 0.256) = 0.256 -> 256x128; left = (256 - 128) // 2 = 64.
    assert fit_to_bucket(Image.new("RGB", (1000, 500)), (128, 128))[1] == (64, 0)
    # 640x480 into 192x128: scale max(0.3, 0.2667) = 0.3 -> 192x144; top = (144 - 128) // 2 = 8.
    assert fit_to_bucket(Image.new("RGB", (640, 480)), (192, 128))[1] == (0, 8)
    # 300x100 into 64x64: scale 0.64 -> 192x64; left 64. Odd slack rounds down: 101x100 -> 65x64, left 0.
    assert fit_to_bucket(Image.new("RGB", (300, 100)), (64, 64))[1] == (64, 0)
    assert fit_to_bucket(Image.new("RGB", (101, 100)), (64, 64))[1] == (0, 0)
    # Already the bucket: unchanged.
    img = gradient((48, 80))
    fitted, offsets = fit_to_bucket(img, (48, 80))
    assert offsets == (0, 0) and np.array_equal(np.asarray(fitted), np.asarray(img))


def test_center_crop_keeps_the_middle() -> None:
    # 12x4 red|blue into 4x4: no resize, left = 4, so the result is half red, half blue.
    fitted, offsets = fit_to_bucket(split_image((12, 4), RED, BLUE), (4, 4))
    assert offsets == (4, 0)
    assert fitted.getpixel((0, 0)) == RED and fitted.getpixel((3, 0)) == BLUE


def test_random_crop_is_within_bounds_uniform_and_seeded() -> None:
    img = gradient((100, 10))  # into 10x10: no resize, 91 valid left offsets
    rng = random.Random(0)
    offsets = [fit_to_bucket(img, (10, 10), crop="random", rng=rng)[1] for _ in range(2000)]
    lefts = [left for left, _ in offsets]
    assert all(top == 0 for _, top in offsets)
    assert min(lefts) == 0 and max(lefts) == 90  # both ends reachable
    assert len(set(lefts)) == 91
    assert abs(np.mean(lefts) - 45) < 3  # uniform mean (0 + 90) / 2

    # The same seed gives the same crops; the pixels are those at the offset.
    again = random.Random(0)
    fitted, (left, top) = fit_to_bucket(img, (10, 10), crop="random", rng=again)
    assert (left, top) == offsets[0]
    assert np.array_equal(np.asarray(fitted), np.asarray(img)[:, left : left + 10])

    # Vertical slack: 20x60 into 20x20.
    rng = random.Random(1)
    tops = {fit_to_bucket(gradient((20, 60)), (20, 20), crop="random", rng=rng)[1][1] for _ in range(400)}
    assert tops == set(range(41))


def test_random_crop_needs_an_rng_and_bad_arguments_raise() -> None:
    img = Image.new("RGB", (10, 10))
    with pytest.raises(ValueError, match="rng"):
        fit_to_bucket(img, (8, 8), crop="random")
    with pytest.raises(ValueError, match="crop"):
        fit_to_bucket(img, (8, 8), crop="top")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="bucket"):
        fit_to_bucket(img, (0, 8))


def test_flip_horizontal_mirrors_columns() -> None:
    img = gradient((5, 3))
    flipped = flip_horizontal(img)
    assert flipped.size == (5, 3) and flipped.mode == "RGB"
    assert np.array_equal(np.asarray(flipped), np.asarray(img)[:, ::-1])
    assert np.array_equal(np.asarray(flip_horizontal(flipped)), np.asarray(img))
