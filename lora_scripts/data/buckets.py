"""Aspect-ratio buckets: which (width, height) each training image is resized and cropped to.

SD trains on batches of equal-sized latents, but squashing every picture to a square crops away the sides
of landscapes and the heads of portraits. sd-scripts' answer, matched here, is a fixed list of buckets of
about the same area (`bucket_resolutions`), each image going to the bucket whose aspect ratio is closest to
its own (`assign_bucket`); a batch is then drawn from one bucket only (see `lora_scripts.data.batching`).

Sizes are `(width, height)` in pixels everywhere, as in Pillow and sd-scripts.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from PIL import ExifTags, Image, PngImagePlugin

Size = tuple[int, int]  # (width, height) in pixels

# EXIF orientations 5..8 rotate the picture by 90 or 270 degrees, so the displayed size is the stored one
# swapped (1..4 are the identity, flips and a 180-degree turn).
_SIDEWAYS_ORIENTATIONS = frozenset({5, 6, 7, 8})


@dataclass(frozen=True)
class BucketSettings:
    """The bucketing options, named as in sd-scripts.

    resolution: (width, height); without buckets every image becomes this size, with buckets its area
        `width * height` is the target area of every bucket.
    enable_bucket: use aspect-ratio buckets instead of one fixed size.
    min_bucket_reso, max_bucket_reso: the shortest and longest bucket side in pixels (predefined buckets
        only).
    bucket_reso_steps: every bucket side is a multiple of this (64 in sd-scripts; the VAE needs a multiple
        of 8).
    bucket_no_upscale: give each image its own bucket no larger than the image (see `assign_bucket`).
    """

    resolution: Size
    enable_bucket: bool = False
    min_bucket_reso: int = 256
    max_bucket_reso: int = 1024
    bucket_reso_steps: int = 64
    bucket_no_upscale: bool = False

    def __post_init__(self) -> None:
        # The config layer reports user values as UserError first; these guard direct callers.
        width, height = self.resolution
        if width <= 0 or height <= 0:
            raise ValueError(f"resolution must be positive, got {self.resolution}")
        if self.bucket_reso_steps <= 0:
            raise ValueError(f"bucket_reso_steps must be positive, got {self.bucket_reso_steps}")
        if not self.enable_bucket:
            return  # the bucket sizes are not used, so a mismatch with resolution is harmless
        if not 0 < self.min_bucket_reso <= self.max_bucket_reso:
            raise ValueError(
                f"need 0 < min_bucket_reso <= max_bucket_reso, got {self.min_bucket_reso} and "
                f"{self.max_bucket_reso}"
            )
        # Otherwise the widths stepped from min_bucket_reso are not multiples of bucket_reso_steps.
        for name in ("min_bucket_reso", "max_bucket_reso"):
            if getattr(self, name) % self.bucket_reso_steps:
                raise ValueError(
                    f"{name} ({getattr(self, name)}) must be a multiple of bucket_reso_steps "
                    f"({self.bucket_reso_steps})"
                )
        # sd-scripts' BucketManager asserts the same.
        if max(width, height) > self.max_bucket_reso:
            raise ValueError(
                f"max_bucket_reso ({self.max_bucket_reso}) must be at least the longer side of resolution "
                f"{self.resolution}"
            )

    @property
    def max_area(self) -> int:
        """Target bucket area in pixels: resolution width * height."""
        return self.resolution[0] * self.resolution[1]


def bucket_resolutions(settings: BucketSettings) -> list[Size]:
    """The predefined buckets, sorted by (width, height).

    sd-scripts' `make_bucket_resolutions` (library/model_util.py), step for step: the largest square of at
    most `max_area`, then for each width from min to max bucket side, the tallest height (a multiple of the
    step, capped at max_bucket_reso) that keeps the area at most `max_area`, in both orientations. Without
    `enable_bucket` the only bucket is `resolution`.
    """
    if not settings.enable_bucket:
        return [settings.resolution]
    steps = settings.bucket_reso_steps
    max_area = settings.max_area
    square = int(math.sqrt(max_area) // steps) * steps
    resolutions = {(square, square)}
    for width in range(settings.min_bucket_reso, settings.max_bucket_reso + 1, steps):
        height = min(settings.max_bucket_reso, int((max_area // width) // steps) * steps)
        if height >= settings.min_bucket_reso:
            resolutions.add((width, height))
            resolutions.add((height, width))
    return sorted(resolutions)


def assign_bucket(image_size: Size, settings: BucketSettings) -> Size:
    """The bucket an image of displayed size `image_size` (width, height) trains at.

    - Without `enable_bucket`: `settings.resolution`.
    - With it: the predefined bucket whose aspect ratio is closest to the image's, preferring a bucket of
      exactly the image's size; ties go to the first bucket in sorted order (sd-scripts'
      `BucketManager.select_bucket` in library/train_util.py, which uses numpy's argmin).
    - With `bucket_no_upscale` too: a bucket of the image's own shape, no larger than the image (see
      `_no_upscale_bucket`).

    For a whole dataset, call `bucket_resolutions` once and pass the list to `closest_bucket` instead.
    """
    _check_image_size(image_size)
    if not settings.enable_bucket:
        return settings.resolution
    if settings.bucket_no_upscale:
        return _no_upscale_bucket(image_size, settings.max_area, settings.bucket_reso_steps)
    return closest_bucket(image_size, bucket_resolutions(settings))


def closest_bucket(image_size: Size, buckets: list[Size]) -> Size:
    """The bucket of `buckets` (sorted) whose aspect ratio is closest to that of `image_size`.

    An exact size match wins even over an earlier bucket of the same ratio, as in sd-scripts (images that were
    pre-cropped to a bucket stay in it). Otherwise the first bucket with the smallest |w/h - image w/h|.
    """
    _check_image_size(image_size)
    if not buckets:
        raise ValueError("buckets must not be empty")
    if image_size in buckets:
        return image_size
    aspect_ratio = image_size[0] / image_size[1]
    # min() keeps the first of equal keys, like np.argmin in sd-scripts.
    return min(buckets, key=lambda bucket: abs(bucket[0] / bucket[1] - aspect_ratio))


def _no_upscale_bucket(image_size: Size, max_area: int, steps: int) -> Size:
    """sd-scripts' per-image bucket for `bucket_no_upscale` (`select_bucket`, the `no_upscale` branch).

    An image larger than `max_area` is first scaled down to about `max_area`, keeping its aspect ratio, with
    sd-scripts' rounding: of "width rounded to the step" and "height rounded to the step" it keeps the one
    whose rounded shape is closer to the image's ratio. Each side is then rounded down to a multiple of
    `steps`, so the bucket is never larger than the (scaled) image and the image is only ever cropped, never
    padded. The min/max bucket sides do not apply (sd-scripts ignores them here too).

    The rounding is sd-scripts' own, quirks included: the area may come out well under `max_area` (656x859
    at 512x512 gets 384x448, 66% of it), and with steps finer than 64 up to about 1% over it.

    Where this differs from sd-scripts: a side that would round to 0 (an image narrower than one step, or an
    extreme aspect ratio) becomes one step, upscaling that side a little; sd-scripts would make a 0-pixel
    bucket or divide by zero.
    """
    width, height = image_size
    if width * height > max_area:
        aspect_ratio = width / height
        resized_width = math.sqrt(max_area * aspect_ratio)
        resized_height = max_area / resized_width

        width_rounded = _round_to_steps(resized_width, steps)
        height_for_width = _round_to_steps(width_rounded / aspect_ratio, steps)
        height_rounded = _round_to_steps(resized_height, steps)
        width_for_height = _round_to_steps(height_rounded * aspect_ratio, steps)
        # A zero side makes that candidate unusable (sd-scripts would raise ZeroDivisionError).
        ratio_from_width = width_rounded / height_for_width if height_for_width else math.inf
        ratio_from_height = width_for_height / height_rounded if height_rounded else math.inf

        # Strict "<", so a tie goes to the height-rounded shape, as in sd-scripts.
        if abs(ratio_from_width - aspect_ratio) < abs(ratio_from_height - aspect_ratio):
            width, height = width_rounded, int(width_rounded / aspect_ratio + 0.5)
        else:
            width, height = int(height_rounded * aspect_ratio + 0.5), height_rounded
    return max(steps, width - width % steps), max(steps, height - height % steps)


def _round_to_steps(value: float, steps: int) -> int:
    """sd-scripts' `round_to_steps`: round half up to an integer, then down to a multiple of `steps`."""
    rounded = int(value + 0.5)
    return rounded - rounded % steps


def _check_image_size(image_size: Size) -> None:
    if len(image_size) != 2 or image_size[0] <= 0 or image_size[1] <= 0:
        raise ValueError(f"image size must be (width, height) with both positive, got {image_size}")


def bucket_histogram(buckets: Iterable[Size]) -> dict[Size, int]:
    """How many samples fall in each bucket, as {(width, height): count} sorted by (width, height)."""
    return dict(sorted(Counter(buckets).items()))


def batches_per_epoch(samples_per_bucket: Mapping[Size, int], batch_size: int) -> int:
    """Number of batches in one epoch when every batch holds samples of one bucket only.

    Each bucket ends in a partial batch unless its count divides evenly: the sum over buckets of
    ceil(n / batch_size).
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if any(count < 0 for count in samples_per_bucket.values()):
        raise ValueError(f"sample counts must not be negative, got {dict(samples_per_bucket)}")
    return sum(-(-count // batch_size) for count in samples_per_bucket.values())


def image_size(path: Path | str) -> Size:
    """The displayed (width, height) of an image file, read from its header without decoding the pixels.

    EXIF orientations 5-8 (a phone portrait stored sideways) swap width and height, so the result equals
    `load_rgb(path).size`. Raises what Pillow raises for a file it cannot identify
    (PIL.UnidentifiedImageError, an OSError).
    """
    with Image.open(path) as img:
        if isinstance(img, PngImagePlugin.PngImageFile):
            # PngImageFile.getexif() decodes the whole image when no eXIf chunk precedes the pixel data, which
            # is the usual case; the base method reads only what the header gave (eXIf before IDAT, XMP).
            exif = Image.Image.getexif(img)
        else:
            exif = img.getexif()
        orientation = exif.get(ExifTags.Base.Orientation, 1)
        width, height = img.size
    if orientation in _SIDEWAYS_ORIENTATIONS:
        return height, width
    return width, height
