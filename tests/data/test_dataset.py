"""TrainingDataset draws and collate batches, through a real DataLoader with the bucket batch sampler."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from lora_scripts.data import CaptionOptions, EpochBatchSampler, TrainingDataset, collate
from lora_scripts.data.batching import BucketBatchSampler
from lora_scripts.data.captions import CaptionedImage
from lora_scripts.data.latent_cache import LatentRequest
from lora_scripts.data.training_set import Sample
from tests.data.imagefiles import BLUE, RED, split_image, write_image


@pytest.fixture
def samples(tmp_path: Path) -> list[Sample]:
    split_image((200, 100), RED, BLUE).save(tmp_path / "wide.png")  # left half red, right half blue
    write_image(tmp_path / "tall.png", size=(60, 120))
    wide = CaptionedImage(tmp_path / "wide.png", "red, blue, sky", "wide.png")
    tall = CaptionedImage(tmp_path / "tall.png", "tall, thing", "tall.png", is_reg=True)
    return [
        Sample(wide, (64, 32), 1.0, (200, 100)),
        Sample(wide, (64, 32), 1.0, (200, 100)),
        Sample(tall, (32, 64), 0.5, (60, 120)),
    ]


def _dataset(samples: list[Sample], **kwargs) -> TrainingDataset:
    options = kwargs.pop("options", CaptionOptions())
    return TrainingDataset(
        samples, [options], flip_aug=[kwargs.pop("flip", False)], random_crop=[False], seed=7, **kwargs
    )


def test_items_take_their_bucket_size_caption_and_weight(samples: list[Sample]) -> None:
    dataset = _dataset(samples)
    wide, tall = dataset[(0, 0)], dataset[(0, 2)]
    assert wide["pixel_values"].shape == (3, 32, 64) and tall["pixel_values"].shape == (3, 64, 32)
    assert wide["caption"] == "red, blue, sky" and (wide["loss_weight"], tall["loss_weight"]) == (1.0, 0.5)
    pixels = wide["pixel_values"]
    assert pixels.min() >= -1 and pixels.max() <= 1
    # not flipped: red (R=1) on the left, blue on the right
    assert pixels[0, :, :8].mean() > 0.9 and pixels[2, :, -8:].mean() > 0.9


def test_flip_aug_mirrors_about_half_the_draws_reproducibly(samples: list[Sample]) -> None:
    dataset = _dataset(samples, flip=True)
    left_red = [bool(dataset[(epoch, 0)]["pixel_values"][0, :, :8].mean() > 0.9) for epoch in range(40)]
    assert 8 < sum(left_red) < 32  # both orientations occur
    again = [bool(dataset[(epoch, 0)]["pixel_values"][0, :, :8].mean() > 0.9) for epoch in range(40)]
    assert left_red == again  # (seed, epoch, index) decides, nothing else


def test_caption_options_apply_per_draw(samples: list[Sample]) -> None:
    options = CaptionOptions(shuffle_caption=True, keep_tokens=1)
    dataset = _dataset(samples, options=options)
    captions = {dataset[(epoch, 0)]["caption"] for epoch in range(20)}
    assert captions == {"red, blue, sky", "red, sky, blue"}  # "red" kept first, the rest shuffled


def test_cached_moments_replace_pixels(samples: list[Sample]) -> None:
    moments = {
        LatentRequest(s.image.path, s.bucket, False): torch.full(
            (8, s.bucket[1] // 8, s.bucket[0] // 8), float(i)
        )
        for i, s in enumerate(samples)
    }
    item = _dataset(samples, latents=moments)[(3, 2)]
    assert "pixel_values" not in item and item["moments"].shape == (8, 8, 4) and item["moments"][0, 0, 0] == 2


def test_loader_batches_stay_within_a_bucket(samples: list[Sample]) -> None:
    dataset = _dataset(samples)
    sampler = EpochBatchSampler(BucketBatchSampler([s.bucket for s in samples], 2, seed=1))
    loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=collate)
    assert len(loader) == 2  # ceil(2/2) + ceil(1/2)
    for _ in range(2):  # two epochs
        shapes = sorted(tuple(batch["pixel_values"].shape) for batch in loader)
        assert shapes == [(1, 3, 64, 32), (2, 3, 32, 64)]
    batch = next(iter(loader))
    assert batch["loss_weights"].dtype == torch.float32 and len(batch["captions"]) == len(
        batch["loss_weights"]
    )
