"""SDXL's size conditioning (`add_time_ids`) of a sample, against the two reference trainers.

diffusers' train_text_to_image_lora_sdxl.py records, per image, `original_size = (height, width)` before
the resize, the crop's `(y1, x1)` in the resized image *after* the flip (it flips, then crops), and the
target size; `compute_time_ids` concatenates them. The reference below does that literally: it resizes and
flips a noise image itself and finds where the training crop's pixels sit in it, so it knows nothing of how
`fit_to_bucket` chose its offset. sd-scripts has the same original and target sizes but another crop
(`BucketManager.get_crop_ltrb`: a letterbox margin), restated from library/train_util.py.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lora_scripts.data import CaptionOptions, TrainingDataset
from lora_scripts.data.buckets import image_size
from lora_scripts.data.captions import CaptionedImage
from lora_scripts.data.images import fit_to_bucket, flip_horizontal
from lora_scripts.data.latent_cache import LatentRequest
from lora_scripts.data.size_conditioning import center_size_conditioning, size_conditioning
from lora_scripts.data.training_set import Sample

Size = tuple[int, int]  # (width, height)

# (image size, bucket): a portrait into a square, a wide image into a wide bucket (odd overhang, so the
# flipped offset is not the unflipped one), a square into a wide bucket (vertical overhang only).
CASES = [((90, 120), (64, 64)), ((130, 70), (64, 48)), ((100, 100), (64, 48))]


def noise_image(size: Size, seed: int = 0) -> Image.Image:
    """Random RGB pixels: after resizing, every crop position still has its own pixels."""
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels, mode="RGB")


def to_uint8(pixel_values: torch.Tensor) -> np.ndarray:
    """float32 [3, H, W] in [-1, 1] (data/images.to_tensor) → uint8 [H, W, 3], exactly."""
    return np.rint((pixel_values.permute(1, 2, 0).numpy() + 1.0) * 127.5).astype(np.uint8)


def reference_resize(image: Image.Image, bucket: Size) -> Image.Image:
    """Resize (Lanczos) to the smallest size covering the bucket, rounding each side (sd-scripts' and our
    bucketing resize; diffusers' `Resize(resolution)` is the square-bucket case)."""
    scale = max(bucket[0] / image.width, bucket[1] / image.height)
    size = (max(bucket[0], round(image.width * scale)), max(bucket[1], round(image.height * scale)))
    return image.resize(size, Image.Resampling.LANCZOS) if size != image.size else image


def locate(haystack: np.ndarray, crop: np.ndarray) -> list[tuple[int, int]]:
    """Every (y1, x1) where `crop` [h, w, 3] sits in `haystack` [H, W, 3]."""
    height, width = crop.shape[:2]
    return [
        (y, x)
        for y in range(haystack.shape[0] - height + 1)
        for x in range(haystack.shape[1] - width + 1)
        if np.array_equal(haystack[y : y + height, x : x + width], crop)
    ]


def diffusers_time_ids(image: Image.Image, bucket: Size, crop: np.ndarray) -> tuple[list[int], bool]:
    """train_text_to_image_lora_sdxl.py's add_time_ids for the training crop `crop` (uint8 [h, w, 3]) of
    `image`, and whether it was flipped: original (h, w) before the resize, the crop's (y1, x1) in the
    resized image after the flip, the target (h, w)."""
    original_size = (image.height, image.width)
    resized = reference_resize(image, bucket)
    found = {
        flip: locate(np.asarray(flip_horizontal(resized) if flip else resized), crop)
        for flip in (False, True)
    }
    ((flipped, (positions,)),) = [(flip, where) for flip, where in found.items() if where]  # exactly one
    crop_top_left = positions
    target_size = (bucket[1], bucket[0])
    return list(original_size + crop_top_left + target_size), flipped


def sd_scripts_time_ids(original: Size, bucket: Size, *, flipped: bool) -> list[int]:
    """sd-scripts' original_sizes_hw + crop_top_lefts + target_sizes_hw (train_util.py, `__getitem__` with
    `trim_and_resize_if_required` and `BucketManager.get_crop_ltrb`), whatever crop was really made."""
    bucket_ar, image_ar = bucket[0] / bucket[1], original[0] / original[1]
    if bucket_ar > image_ar:
        resized_width, resized_height = bucket[1] * image_ar, bucket[1]
    else:
        resized_width, resized_height = bucket[0], bucket[0] / image_ar
    crop_left = (bucket[0] - resized_width) // 2
    crop_top = (bucket[1] - resized_height) // 2
    crop_right = crop_left + resized_width
    target_size = bucket
    crop_left_top = (target_size[0] - crop_right, crop_top) if flipped else (crop_left, crop_top)
    return [
        int(original[1]),
        int(original[0]),
        int(crop_left_top[1]),
        int(crop_left_top[0]),
        int(target_size[1]),
        int(target_size[0]),
    ]


def trained_crop(image: Image.Image, bucket: Size, *, crop: str, flip: bool, rng=None):
    """What the dataset does to an image: fit_to_bucket, then the flip. (uint8 crop, fit's (left, top))."""
    fitted, left_top = fit_to_bucket(image, bucket, crop=crop, rng=rng)  # type: ignore[arg-type]
    return np.asarray(flip_horizontal(fitted) if flip else fitted), left_top


# --- the function, against diffusers ------------------------------------------------------------------------


@pytest.mark.parametrize(("size", "bucket"), CASES)
@pytest.mark.parametrize("flip", [False, True], ids=["unflipped", "flipped"])
def test_center_crop_equals_diffusers_time_ids(size, bucket, flip):
    image = noise_image(size)
    pixels, left_top = trained_crop(image, bucket, crop="center", flip=flip)
    expected, flipped = diffusers_time_ids(image, bucket, pixels)
    assert flipped == flip
    ours = size_conditioning(size, bucket, left_top, flip=flip)
    assert ours.dtype == torch.long and ours.tolist() == expected
    assert center_size_conditioning(size, bucket, flip=flip).tolist() == expected  # from sizes alone


def test_center_crop_numbers():
    # 90x120 portrait into 64x64: resized to 64x85, 21 rows of overhang; the crop starts at row 10 (rounded
    # down), so in the mirrored image it is still row 10, column 0.
    assert center_size_conditioning((90, 120), (64, 64)).tolist() == [120, 90, 10, 0, 64, 64]
    assert center_size_conditioning((90, 120), (64, 64), flip=True).tolist() == [120, 90, 10, 0, 64, 64]
    # 130x70 into 64x48: resized to 89x48, 25 columns over; left 12, which is 89 - 12 - 64 = 13 once mirrored.
    assert center_size_conditioning((130, 70), (64, 48)).tolist() == [70, 130, 0, 12, 48, 64]
    assert center_size_conditioning((130, 70), (64, 48), flip=True).tolist() == [70, 130, 0, 13, 48, 64]


@pytest.mark.parametrize(("size", "bucket"), CASES)
@pytest.mark.parametrize("flip", [False, True], ids=["unflipped", "flipped"])
def test_random_crop_equals_diffusers_time_ids(size, bucket, flip):
    image = noise_image(size, seed=1)
    offsets = set()
    for draw in range(6):
        pixels, left_top = trained_crop(image, bucket, crop="random", flip=flip, rng=random.Random(draw))
        expected, flipped = diffusers_time_ids(image, bucket, pixels)
        assert flipped == flip
        assert size_conditioning(size, bucket, left_top, flip=flip).tolist() == expected
        offsets.add(tuple(expected[2:4]))
    assert len(offsets) > 1  # the draws crop at different places


def test_original_and_target_sizes_equal_sd_scripts_but_its_crop_is_a_letterbox_margin():
    for (size, bucket), flip in [(case, flip) for case in CASES for flip in (False, True)]:
        ours = center_size_conditioning(size, bucket, flip=flip).tolist()
        theirs = sd_scripts_time_ids(size, bucket, flipped=flip)
        assert (ours[:2], ours[4:]) == (theirs[:2], theirs[4:])
    # The crop differs: sd-scripts reports the margin the image would have if it were fitted *inside* the
    # bucket (on the axis that is not cropped), we (and diffusers) where the crop was made. A portrait in a
    # square bucket is cropped top and bottom (rows 10..74 of 85); sd-scripts says 8 columns from the left.
    assert center_size_conditioning((90, 120), (64, 64)).tolist()[2:4] == [10, 0]
    assert sd_scripts_time_ids((90, 120), (64, 64), flipped=False)[2:4] == [0, 8]
    assert sd_scripts_time_ids((90, 120), (64, 64), flipped=True)[2:4] == [0, 8]
    # A random crop of a wide image (89x48, cropped 7 columns from the left): sd-scripts' numbers stay the
    # letterbox margin, 6 rows from the top, wherever the crop landed.
    _, left_top = trained_crop(
        noise_image((130, 70)), (64, 48), crop="random", flip=False, rng=random.Random(3)
    )
    assert left_top == (7, 0)
    assert size_conditioning((130, 70), (64, 48), left_top, flip=False).tolist()[2:4] == [0, 7]
    assert sd_scripts_time_ids((130, 70), (64, 48), flipped=False)[2:4] == [6, 0]


# --- through TrainingDataset --------------------------------------------------------------------------------


@pytest.fixture
def samples(tmp_path: Path) -> list[Sample]:
    out = []
    for index, (size, bucket) in enumerate(CASES):
        path = tmp_path / f"img_{index}.png"
        noise_image(size, seed=10 + index).save(path)
        out.append(Sample(CaptionedImage(path, "a caption", path.name), bucket, 1.0, image_size(path)))
    return out


def _dataset(samples: list[Sample], *, random_crop: bool, latents=None) -> TrainingDataset:
    return TrainingDataset(
        samples, [CaptionOptions()], flip_aug=[True], random_crop=[random_crop], seed=5, latents=latents
    )


@pytest.mark.parametrize("random_crop", [False, True], ids=["center", "random"])
def test_dataset_items_carry_the_time_ids_of_their_draw(samples, random_crop):
    dataset = _dataset(samples, random_crop=random_crop)
    flips = set()
    for epoch in range(4):
        for index, sample in enumerate(samples):
            item = dataset[(epoch, index)]
            image = Image.open(sample.image.path).convert("RGB")
            expected, flipped = diffusers_time_ids(image, sample.bucket, to_uint8(item["pixel_values"]))
            assert item["size_conditioning"].dtype == torch.long
            assert item["size_conditioning"].tolist() == expected, (epoch, index)
            flips.add(flipped)
    assert flips == {False, True}


def test_cached_latents_items_carry_the_center_crops_time_ids(samples):
    uncached = _dataset(samples, random_crop=False)
    moments = {
        LatentRequest(s.image.path, s.bucket, flip): torch.zeros(8, s.bucket[1] // 8, s.bucket[0] // 8)
        for s in samples
        for flip in (False, True)
    }
    cached = _dataset(samples, random_crop=False, latents=moments)
    flips = set()
    for epoch in range(4):
        for index, sample in enumerate(samples):
            item = cached[(epoch, index)]
            assert "pixel_values" not in item
            # the uncached draw of the same key makes the same flip decision: its pixels are the reference
            pixels = to_uint8(uncached[(epoch, index)]["pixel_values"])
            image = Image.open(sample.image.path).convert("RGB")
            expected, flipped = diffusers_time_ids(image, sample.bucket, pixels)
            assert item["size_conditioning"].tolist() == expected, (epoch, index)
            flips.add(flipped)
    assert flips == {False, True}
