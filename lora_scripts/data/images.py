"""Turn an image file of any common kind into the RGB tensor the VAE expects.

Three steps, each its own function so that tests and other modules (buckets, latent caches) can reuse them:
`load_rgb` (file -> upright 8-bit RGB), `resize_and_crop` (-> resolution x resolution) or `fit_to_bucket`
(-> an aspect-ratio bucket's width x height, see `lora_scripts.data.buckets`) and `to_tensor`
(-> float32 [3, H, W] in [-1, 1]). `flip_horizontal` is the flip augmentation.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image, ImageOps

# Modes whose alpha channel must be flattened; premultiplied ones ("La", "RGBa") included.
_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})
# Modes holding more than 8 bits per pixel in one channel: Pillow's own convert() clips these to 255
# (a 16-bit photo would come out almost all white), so they are rescaled with numpy instead.
_WIDE_GRAY_MODES = frozenset({"I;16", "I;16B", "I;16L", "I;16N", "I"})
_WHITE = (255, 255, 255, 255)


def load_rgb(path: Path | str) -> Image.Image:
    """Read an image file as upright 8-bit RGB.

    The EXIF orientation is applied (phones store portraits sideways), transparency is composited on white
    and high-bit-depth grayscale is rescaled to 0..255. Raises whatever Pillow raises for unreadable or
    truncated files (OSError, ValueError, Image.DecompressionBombError).

    Returns a mode "RGB" image whose size is the displayed (rotated) size.
    """
    with Image.open(path) as img:
        img.load()  # decode everything now, so a truncated file fails here and the file handle is closed
        upright = ImageOps.exif_transpose(img)
        rgb = to_rgb(upright)
        # to_rgb returns its input unchanged for RGB; copy so the result outlives the closed file.
        return rgb.copy() if rgb is img else rgb


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert an image in any Pillow mode to 8-bit RGB (no EXIF handling; see `load_rgb`).

    - RGBA, LA, PA, premultiplied modes, and P/L/RGB with a transparent color: composited on white, because
      black (what a plain convert gives) would teach the model dark backgrounds that are not in the picture.
    - 16- and 32-bit integer grayscale (I;16, I;16B, I): scaled from the 16-bit range (see `_wide_gray_to_l`).
    - 32-bit float (F): see `_float_to_l`.
    - 1, L, P, CMYK, YCbCr, LAB, HSV, RGBX: Pillow's own conversion.
    """
    if img.mode == "RGB":
        return img
    if img.mode in _WIDE_GRAY_MODES:
        return _wide_gray_to_l(img).convert("RGB")
    if img.mode == "F":
        return _float_to_l(img).convert("RGB")
    if _has_alpha(img):
        # Pillow cannot go from "La" to RGBA directly, only through LA.
        rgba = (img.convert("LA") if img.mode == "La" else img).convert("RGBA")
        background = Image.new("RGBA", rgba.size, _WHITE)
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def _has_alpha(img: Image.Image) -> bool:
    """True when some pixels may be (partly) transparent: an alpha band, a transparent color key (PNG tRNS)
    or a palette with alpha entries."""
    return (
        img.mode in _ALPHA_MODES
        or "transparency" in img.info
        or (img.mode == "P" and img.palette is not None and img.palette.mode == "RGBA")
    )


def _wide_gray_to_l(img: Image.Image) -> Image.Image:
    """I;16* / I -> L. Values are read as 16-bit (0..65535 -> 0..255, the PNG/TIFF convention).

    A 32-bit "I" image whose values do not fit 0..65535 has no agreed range, so it is stretched min..max.
    """
    values = np.asarray(img).astype(np.float64)  # handles the big-endian I;16B layout too
    low, high = float(values.min()), float(values.max())
    if low >= 0 and high <= 65535:
        scaled = values / 257.0  # 65535 / 257 == 255 exactly
    else:
        scaled = (values - low) / max(high - low, 1e-12) * 255.0
    return Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8), mode="L")


def _float_to_l(img: Image.Image) -> Image.Image:
    """F -> L. Floats in 0..1 (the usual convention) are scaled by 255, values already in 0..255 are kept,
    anything else (negative, HDR) is stretched min..max. NaN counts as 0."""
    values = np.nan_to_num(np.asarray(img).astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    low, high = float(values.min()), float(values.max())
    if low >= 0 and high <= 1:
        scaled = values * 255.0
    elif low >= 0 and high <= 255:
        scaled = values
    else:
        scaled = (values - low) / max(high - low, 1e-12) * 255.0
    return Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8), mode="L")


def resize_and_crop(img: Image.Image, resolution: int) -> Image.Image:
    """Resize so the shorter side is `resolution` (Lanczos; small images are upscaled), then center-crop.

    Returns a resolution x resolution image in the input's mode.
    """
    if resolution <= 0:
        raise ValueError(f"resolution must be positive, got {resolution}")
    width, height = img.size
    if (width, height) == (resolution, resolution):
        return img
    scale = resolution / min(width, height)
    # max() guards against rounding the shorter side to resolution - 1.
    new_size = (max(resolution, round(width * scale)), max(resolution, round(height * scale)))
    if new_size != img.size:
        img = img.resize(new_size, Image.Resampling.LANCZOS)
    left = (new_size[0] - resolution) // 2
    top = (new_size[1] - resolution) // 2
    return img.crop((left, top, left + resolution, top + resolution))


def fit_to_bucket(
    img: Image.Image,
    bucket: tuple[int, int],
    *,
    crop: Literal["center", "random"] = "center",
    rng: random.Random | None = None,
) -> tuple[Image.Image, tuple[int, int]]:
    """Resize `img` (Lanczos) to just cover `bucket` (width, height), then crop to exactly `bucket`.

    The scale is max(bucket_w / w, bucket_h / h): one side fits exactly and the other overhangs, so the fewest
    pixels are lost and nothing is padded (sd-scripts' `trim_and_resize_if_required`). Small images are
    upscaled. The overhang is cut evenly from both ends ("center", rounding the offset down) or at an offset
    drawn uniformly from every valid one with `rng.randint`, left then top ("random"; `rng` is then required,
    so runs are reproducible). For a square bucket this is exactly `resize_and_crop`.

    Returns (image of size `bucket` in the input's mode, (crop_left, crop_top)), the offsets in pixels of the
    resized image. SDXL's `crops_coords_top_left` conditioning is this pair in (top, left) order.
    """
    bucket_width, bucket_height = bucket
    if bucket_width <= 0 or bucket_height <= 0:
        raise ValueError(f"bucket must be (width, height) with both positive, got {bucket}")
    if crop not in ("center", "random"):
        raise ValueError(f"crop must be 'center' or 'random', got {crop!r}")
    if crop == "random" and rng is None:
        raise ValueError("crop='random' needs an rng (random.Random) so that the crops can be reproduced")
    new_size = covering_size(img.size, bucket)
    if new_size != img.size:
        img = img.resize(new_size, Image.Resampling.LANCZOS)
    slack_x, slack_y = new_size[0] - bucket_width, new_size[1] - bucket_height
    if crop == "random":
        assert rng is not None  # checked above; narrows the type
        left, top = rng.randint(0, slack_x), rng.randint(0, slack_y)
    else:
        left, top = slack_x // 2, slack_y // 2  # center_crop_offset, from the resized size
    if (left, top, *new_size) == (0, 0, bucket_width, bucket_height):
        return img, (0, 0)
    return img.crop((left, top, left + bucket_width, top + bucket_height)), (left, top)


def covering_size(size: tuple[int, int], bucket: tuple[int, int]) -> tuple[int, int]:
    """The (width, height) `fit_to_bucket` resizes an image of `size` to: the smallest that covers `bucket`.

    Same arithmetic as resize_and_crop (round, then max() against rounding the fitting side one pixel
    short), so that square buckets give identical pixels. sd-scripts rounds half up (int(x + 0.5)); Python's
    round differs only on exact halves, by one pixel of overhang that the crop removes anyway.
    """
    (width, height), (bucket_width, bucket_height) = size, bucket
    scale = max(bucket_width / width, bucket_height / height)
    return max(bucket_width, round(width * scale)), max(bucket_height, round(height * scale))


def center_crop_offset(size: tuple[int, int], bucket: tuple[int, int]) -> tuple[int, int]:
    """(left, top) of `fit_to_bucket`'s center crop, in pixels of the resized image, for an image of `size`
    (before resizing): the overhang split evenly, rounding the offset down."""
    resized = covering_size(size, bucket)
    return (resized[0] - bucket[0]) // 2, (resized[1] - bucket[1]) // 2


def flip_horizontal(img: Image.Image) -> Image.Image:
    """Mirror left-right (sd-scripts' `flip_aug`). Returns a new image of the same size and mode."""
    return img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)


def to_tensor(img: Image.Image) -> torch.Tensor:
    """RGB image -> float32 tensor [3, H, W] in [-1, 1] (0 -> -1.0, 255 -> 1.0), the VAE's input range."""
    if img.mode != "RGB":
        raise ValueError(f"to_tensor expects an RGB image, got mode {img.mode!r}; call to_rgb first")
    pixels = np.asarray(img, dtype=np.float32)  # [H, W, 3], 0..255
    pixels = pixels / 127.5 - 1.0
    return torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1)))
