"""SDXL's micro-conditioning of a sample (the UNet's `add_time_ids`), from what the data pipeline did to it.

SDXL (Podell et al. 2023, §2.2) conditions the UNet on three pairs: the image's original size (height,
width) before any resizing, the top-left corner of the crop (top, left) and the target size (height, width)
it is trained at. They are computed here from what `fit_to_bucket` really did: its resize to cover the
bucket, its crop (center, or the random offset drawn for that step) and the flip. A flipped image's left
offset is measured in the flipped image (resized width - left - bucket width), which is what diffusers'
`train_text_to_image_lora_sdxl.py` gets by flipping before it crops.

sd-scripts reports another crop: `BucketManager.get_crop_ltrb`, the margin of the image fitted *inside* the
bucket (a letterbox offset, on the axis that is not cropped), whatever crop was made ("I have no idea how
to reflect the cropped value in crop left/top in the case of random crop", its comment says). Its original
and target sizes are the same as ours.

Families that do not use the conditioning (SD 1.x/2.x) ignore it; it costs six integers per sample.
"""

from __future__ import annotations

import torch

from lora_scripts.data.images import center_crop_offset, covering_size

Size = tuple[int, int]  # (width, height) in pixels


def size_conditioning(original: Size, bucket: Size, crop_left_top: Size, *, flip: bool) -> torch.Tensor:
    """long [6]: (original height, original width, crop top, crop left, target height, target width), the
    order of SDXL's `add_time_ids`.

    original: the image's displayed (width, height) before resizing; bucket: the (width, height) it was
    fitted to; crop_left_top: `fit_to_bucket`'s (left, top) in the resized, unflipped image; flip: whether
    the sample was mirrored after the crop.
    """
    left, top = crop_left_top
    if flip:
        left = covering_size(original, bucket)[0] - left - bucket[0]
    return torch.tensor([original[1], original[0], top, left, bucket[1], bucket[0]], dtype=torch.long)


def center_size_conditioning(original: Size, bucket: Size, *, flip: bool = False) -> torch.Tensor:
    """`size_conditioning` of a center-cropped sample, computed from the sizes alone (no image decoded):
    what cached latents and validation images use."""
    return size_conditioning(original, bucket, center_crop_offset(original, bucket), flip=flip)
