"""A torch Dataset of square, center-cropped training images with their captions.

Images are decoded on each access (no caching here), so a DataLoader with workers spreads the decoding.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.utils.data import Dataset

from lora_scripts.data.captions import CaptionedImage
from lora_scripts.data.images import load_rgb, resize_and_crop, to_tensor


class CaptionDataset(Dataset):
    """Items from `collect_dataset` as `{"pixel_values": float32 [3, R, R] in [-1, 1], "caption": str}`.

    R is `resolution`: each image's shorter side is resized to R, then the center R x R is kept.
    """

    def __init__(self, items: list[CaptionedImage], resolution: int):
        if resolution <= 0:
            raise ValueError(f"resolution must be positive, got {resolution}")
        self.items = list(items)
        self.resolution = resolution

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor | str]:
        item = self.items[index]
        image = resize_and_crop(load_rgb(item.path), self.resolution)
        return {"pixel_values": to_tensor(image), "caption": item.caption}


def collate(batch: Sequence[dict[str, torch.Tensor | str]]) -> dict[str, torch.Tensor | list[str]]:
    """Stack examples: `{"pixel_values": float32 [B, 3, R, R], "captions": list of B str}`.

    A module-level function (not a lambda) so DataLoader workers can pickle it.
    """
    return {
        "pixel_values": torch.stack([example["pixel_values"] for example in batch]),  # type: ignore[misc]
        "captions": [str(example["caption"]) for example in batch],
    }
