"""The torch side of the training data: a Dataset of samples and the batch sampler that feeds it.

Every random choice of a draw (crop offset, flip, caption shuffle and dropout) comes from an RNG seeded by
(seed, epoch, sample index), so a run is reproducible with any number of DataLoader workers, and a resumed
run can replay an epoch exactly. The sampler therefore hands the dataset `(epoch, index)` pairs.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Mapping, Sequence

import torch
from torch.utils.data import Dataset, Sampler

from lora_scripts.data.batching import BucketBatchSampler
from lora_scripts.data.caption_ops import CaptionOptions, process_caption
from lora_scripts.data.images import fit_to_bucket, flip_horizontal, load_rgb, to_tensor
from lora_scripts.data.latent_cache import LatentRequest
from lora_scripts.data.size_conditioning import center_size_conditioning, size_conditioning
from lora_scripts.data.training_set import Sample

Key = tuple[int, int]  # (epoch, sample index)


class TrainingDataset(Dataset):
    """Samples as `{"pixel_values": float32 [3, H, W] in [-1, 1]` (or `"moments"`: the cached VAE posterior
    [2C, H/8, W/8]), `"caption": str, "loss_weight": float, "size_conditioning": long [6]}`; H, W are the
    sample's bucket, size_conditioning SDXL's (original size, crop top-left, target size) of the draw.

    flip_aug, random_crop: per dataset (index = `CaptionedImage.subset`). latents: when given, every sample's
    moments are read from it (both flips cached when flip_aug is on) and no image is decoded.
    """

    def __init__(
        self,
        samples: Sequence[Sample],
        caption_options: Sequence[CaptionOptions],
        *,
        flip_aug: Sequence[bool],
        random_crop: Sequence[bool],
        seed: int,
        latents: Mapping[LatentRequest, torch.Tensor] | None = None,
    ):
        self.samples = list(samples)
        self.caption_options = list(caption_options)
        self.flip_aug = list(flip_aug)
        self.random_crop = list(random_crop)
        self.seed = seed
        self.latents = latents

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key: Key) -> dict[str, torch.Tensor | str | float]:
        epoch, index = key
        # A string seed is hashed with SHA-512 by `random`, the same on every platform and process.
        rng = random.Random(f"{self.seed}/{epoch}/{index}")
        sample = self.samples[index]
        subset = sample.image.subset
        flip = self.flip_aug[subset] and rng.random() < 0.5
        caption = process_caption(sample.image.caption, self.caption_options[subset], rng)
        out: dict[str, torch.Tensor | str | float] = {"caption": caption, "loss_weight": sample.loss_weight}
        request = LatentRequest(sample.image.path, sample.bucket, flip)
        if self.latents is not None:  # cached latents are center crops (the config refuses random_crop)
            out["moments"] = self.latents[request]
            out["size_conditioning"] = center_size_conditioning(
                sample.original_size, sample.bucket, flip=flip
            )
            return out
        crop = "random" if self.random_crop[subset] else "center"
        out["pixel_values"], crop_left_top = fit_pixels(request, crop=crop, rng=rng)
        out["size_conditioning"] = size_conditioning(
            sample.original_size, sample.bucket, crop_left_top, flip=flip
        )
        return out


def fit_pixels(
    request: LatentRequest, *, crop: str = "center", rng: random.Random | None = None
) -> tuple[torch.Tensor, tuple[int, int]]:
    """An image fitted to its bucket (and flipped if asked): (float32 [3, H, W] in [-1, 1], the crop's
    (left, top) in the resized image before the flip, as `fit_to_bucket` returns it)."""
    image, crop_left_top = fit_to_bucket(load_rgb(request.path), request.bucket, crop=crop, rng=rng)  # type: ignore[arg-type]
    if request.flip:
        image = flip_horizontal(image)
    return to_tensor(image), crop_left_top


def load_pixels(
    request: LatentRequest, *, crop: str = "center", rng: random.Random | None = None
) -> torch.Tensor:
    """An image fitted to its bucket (and flipped if asked): float32 [3, H, W] in [-1, 1]."""
    return fit_pixels(request, crop=crop, rng=rng)[0]


class EpochBatchSampler(Sampler[list[Key]]):
    """`BucketBatchSampler`'s batches, each index paired with its epoch for the dataset's RNG.

    No `batch_size` attribute, on purpose: see BucketBatchSampler (accelerate would hold back short batches).
    """

    def __init__(self, inner: BucketBatchSampler):
        self.inner = inner
        self._epoch = 0

    def __len__(self) -> int:
        return len(self.inner)

    def set_epoch(self, epoch: int) -> None:
        self._epoch = epoch

    def __iter__(self) -> Iterator[list[Key]]:
        epoch = self._epoch
        self._epoch = epoch + 1
        for batch in self.inner.batches(epoch):
            yield [(epoch, index) for index in batch]


def collate(batch: Sequence[Mapping[str, torch.Tensor | str | float]]) -> dict[str, object]:
    """Stack a batch (all of one bucket): pixel_values or moments [B, ...], captions (list of B str),
    loss_weights float32 [B], size_conditioning long [B, 6] (`data/size_conditioning.py`).
    A module-level function so DataLoader workers can pickle it."""
    out: dict[str, object] = {
        "captions": [str(example["caption"]) for example in batch],
        "loss_weights": torch.tensor([float(example["loss_weight"]) for example in batch]),  # type: ignore[arg-type]
    }
    for key in ("pixel_values", "moments", "size_conditioning"):
        if key in batch[0]:
            out[key] = torch.stack([example[key] for example in batch])  # type: ignore[misc]
    return out
