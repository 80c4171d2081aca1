"""Bucket lists, bucket assignment (predefined and bucket_no_upscale), counts, and header-only image sizes."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from PIL import Image, ImageFile

from lora_scripts.data.buckets import (
    BucketSettings,
    assign_bucket,
    batches_per_epoch,
    bucket_histogram,
    bucket_resolutions,
    closest_bucket,
    image_size,
)
from lora_scripts.data.images import load_rgb

SD15 = BucketSettings((512, 512), enable_bucket=True)
NO_UPSCALE = BucketSettings((512, 512), enable_bucket=True, bucket_no_upscale=True)

# By hand from sd-scripts' make_bucket_resolutions, max_area = 512 * 512 = 262144, steps 64:
# width 256 -> 262144 // 256 = 1024 -> 1024; 320 -> 819 -> 768; 384 -> 682 -> 640; 448 -> 585 -> 576;
# 512 -> 512; 576 -> 455 -> 448; 640 -> 409 -> 384; 704 -> 372 -> 320; 768 -> 341 -> 320;
# 832, 896, 960 -> 315, 292, 273 -> 256; 1024 -> 256. Plus both orientations and the 512 square.
SD15_BUCKETS = [
    (256, 832), (256, 896), (256, 960), (256, 1024), (320, 704), (320, 768), (384, 640), (448, 576),
    (512, 512),
    (576, 448), (640, 384), (704, 320), (768, 320), (832, 256), (896, 256), (960, 256), (1024, 256),
]  # fmt: skip

# resolution (768, 512): max_area 393216, square int(sqrt(393216) // 64) * 64 = 576 (627.07 -> 576);
# 256 -> 1536 capped at 1024; 320 -> 1228 -> 1216 capped 1024; 384 -> 1024; 448 -> 877 -> 832;
# 512 -> 768; 576 -> 682 -> 640; 640 -> 614 -> 576; 704 -> 558 -> 512; 768 -> 512; 832 -> 472 -> 448;
# 896 -> 438 -> 384; 960 -> 409 -> 384; 1024 -> 384.
WIDE_BUCKETS = [
    (256, 1024), (320, 1024), (384, 896), (384, 960), (384, 1024), (448, 832), (512, 704), (512, 768),
    (576, 576), (576, 640), (640, 576), (704, 512), (768, 512), (832, 448), (896, 384), (960, 384),
    (1024, 256), (1024, 320), (1024, 384),
]  # fmt: skip


def test_sd15_bucket_list_matches_hand_computed() -> None:
    buckets = bucket_resolutions(SD15)
    assert buckets == SD15_BUCKETS
    assert len(buckets) == 17


def test_non_square_resolution_bucket_list() -> None:
    buckets = bucket_resolutions(BucketSettings((768, 512), enable_bucket=True))
    assert buckets == WIDE_BUCKETS
    assert len(buckets) == 19
    assert all(w * h <= 768 * 512 and w % 64 == 0 and h % 64 == 0 for w, h in buckets)


def test_without_buckets_every_image_gets_the_resolution() -> None:
    fixed = BucketSettings((512, 512))
    assert bucket_resolutions(fixed) == [(512, 512)]
    for size in [(512, 512), (1024, 768), (600, 1200), (1, 1)]:
        assert assign_bucket(size, fixed) == (512, 512)
    # bucket_no_upscale only matters with enable_bucket, as in sd-scripts.
    assert assign_bucket((100, 60), BucketSettings((768, 512), bucket_no_upscale=True)) == (768, 512)


@pytest.mark.parametrize(
    ("size", "bucket"),
    [
        ((512, 512), (512, 512)),  # exact bucket
        # ratio 1.333: 576/448 = 1.286 (off 0.048) beats 640/384 = 1.667 and 512/512 = 1.0
        ((1024, 768), (576, 448)),
        # ratio 0.5: 320/704 = 0.4545 (off 0.045) beats 320/768 = 0.417 (0.083) and 384/640 = 0.6 (0.1)
        ((600, 1200), (320, 704)),
        # ratio 3: 832/256 = 3.25 (off 0.25) beats 768/320 = 2.4 (0.6) and 896/256 = 3.5 (0.5)
        ((3000, 1000), (832, 256)),
        ((1, 1), (512, 512)),  # tiny images are upscaled into the square
    ],
)
def test_assign_closest_aspect_ratio(size: tuple[int, int], bucket: tuple[int, int]) -> None:
    assert assign_bucket(size, SD15) == bucket


def test_ties_go_to_the_first_bucket_and_exact_sizes_win() -> None:
    # 2:1 lies exactly halfway between 1:1 and 3:1 (|1 - 2| == |3 - 2|): the first in sorted order wins.
    assert closest_bucket((200, 100), [(64, 64), (192, 64)]) == (64, 64)
    # Same ratio twice: an image of exactly one of the sizes stays in it (sd-scripts' predefined_resos_set).
    assert closest_bucket((128, 128), [(64, 64), (128, 128)]) == (128, 128)
    assert closest_bucket((100, 100), [(64, 64), (128, 128)]) == (64, 64)


@pytest.mark.parametrize(
    ("size", "bucket"),
    [
        ((300, 200), (256, 192)),  # smaller than max_area: its own size rounded down
        ((512, 512), (512, 512)),
        ((64, 700), (64, 640)),
        # 2000x1000 (ratio 2): scaled to 724.08 x 362.04; width-rounded 704 x 320 (ratio 2.2) loses to
        # height-rounded 640 x 320 (ratio 2.0)
        ((2000, 1000), (640, 320)),
        # 1024x768: scaled to 591.2 x 443.4; 576 x 384 (1.5) loses to 512 x 384 (1.333)
        ((1024, 768), (512, 384)),
        # 656x859 (ratio 0.7637): scaled to 447.4 x 585.9; width-rounded 384 x 448 (0.857, off 0.093) beats
        # height-rounded 384 x 576 (0.667, off 0.097); resized 384 x 503 -> bucket 384 x 448 (sd-scripts'
        # rounding keeps only 66% of max_area here)
        ((656, 859), (384, 448)),
    ],
)
def test_no_upscale_hand_computed(size: tuple[int, int], bucket: tuple[int, int]) -> None:
    assert assign_bucket(size, NO_UPSCALE) == bucket


@pytest.mark.parametrize("resolution", [(512, 512), (768, 512), (1024, 1024)])
def test_no_upscale_never_larger_than_image_or_area(resolution: tuple[int, int]) -> None:
    settings = BucketSettings(resolution, enable_bucket=True, bucket_no_upscale=True)
    max_area = resolution[0] * resolution[1]
    for width in range(64, 4000, 37):
        for height in range(64, 4000, 53):
            bucket_w, bucket_h = assign_bucket((width, height), settings)
            assert bucket_w <= width and bucket_h <= height, ((width, height), (bucket_w, bucket_h))
            assert bucket_w % 64 == 0 and bucket_h % 64 == 0
            assert bucket_w * bucket_h <= max_area


def test_no_upscale_sides_below_one_step_become_one_step() -> None:
    assert assign_bucket((100, 50), NO_UPSCALE) == (64, 64)
    assert assign_bucket((1, 1), NO_UPSCALE) == (64, 64)
    # Extreme ratio above max_area: the height would round to 0 (sd-scripts divides by zero here).
    assert assign_bucket((100000, 10), NO_UPSCALE)[1] == 64


def test_settings_are_validated() -> None:
    with pytest.raises(ValueError, match="resolution"):
        BucketSettings((0, 512))
    with pytest.raises(ValueError, match="min_bucket_reso"):
        BucketSettings((512, 512), enable_bucket=True, min_bucket_reso=1024, max_bucket_reso=512)
    with pytest.raises(ValueError, match="multiple of bucket_reso_steps"):
        BucketSettings((512, 512), enable_bucket=True, min_bucket_reso=300)
    with pytest.raises(ValueError, match="max_bucket_reso"):
        BucketSettings((1536, 1536), enable_bucket=True)
    BucketSettings((1536, 1536))  # bucket sides are unused without enable_bucket
    with pytest.raises(ValueError, match="image size"):
        assign_bucket((0, 10), SD15)


def test_histogram_and_batches_per_epoch() -> None:
    histogram = bucket_histogram([(576, 448), (512, 512), (576, 448), (448, 576)])
    assert histogram == {(448, 576): 1, (512, 512): 1, (576, 448): 2}
    assert list(histogram) == [(448, 576), (512, 512), (576, 448)]
    assert batches_per_epoch({(512, 512): 5, (576, 448): 3}, 2) == 3 + 2
    assert batches_per_epoch({(512, 512): 4, (576, 448): 4}, 4) == 2
    assert batches_per_epoch({(512, 512): 7}, 1) == 7
    assert batches_per_epoch({}, 3) == 0
    counts = {(64, 64): 10, (128, 64): 1, (64, 128): 33}
    assert batches_per_epoch(counts, 8) == sum(math.ceil(n / 8) for n in counts.values())
    with pytest.raises(ValueError):
        batches_per_epoch({(512, 512): 1}, 0)


def _jpeg_with_orientation(path: Path, stored: tuple[int, int], orientation: int) -> Path:
    exif = Image.Exif()
    exif[0x0112] = orientation  # Orientation
    Image.new("RGB", stored, (10, 200, 30)).save(path, exif=exif.tobytes())
    return path


@pytest.mark.parametrize(
    ("orientation", "displayed"), [(1, (40, 24)), (3, (40, 24)), (6, (24, 40)), (8, (24, 40))]
)
def test_image_size_applies_exif_orientation(
    tmp_path: Path, orientation: int, displayed: tuple[int, int]
) -> None:
    path = _jpeg_with_orientation(tmp_path / "a.jpg", (40, 24), orientation)
    assert image_size(path) == displayed
    assert load_rgb(path).size == displayed


def test_image_size_of_png_without_exif_does_not_decode(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "a.png"
    Image.new("RGB", (30, 20)).save(path)

    def no_decoding(self: Image.Image) -> None:
        raise AssertionError("image_size decoded the pixels")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    assert image_size(path) == (30, 20)


def test_image_size_of_png_with_exif_orientation(tmp_path: Path) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "a.png"
    Image.new("RGB", (30, 20)).save(path, exif=exif.tobytes())  # Pillow writes eXIf before the pixel data
    assert image_size(path) == (20, 30) == load_rgb(path).size
