"""The samples of an epoch, from a config: kohya repeats, sd-scripts' reg balancing, per-dataset resolution
and buckets, and the batch count `check` and `train` share. No model is loaded."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from lora_scripts.config import TrainConfig, validate_config_dict
from lora_scripts.data.batching import BucketBatchSampler
from lora_scripts.data.training_set import TrainingSet, balanced_reg_repeats, training_set_for
from tests.data.imagefiles import write_image


def captioned(path: Path, caption: str, size: tuple[int, int] = (8, 8), extension: str = ".txt") -> None:
    write_image(path, size=size)
    path.with_suffix(extension).write_text(caption, encoding="utf-8")


def config(tmp_path: Path, **values: Any) -> TrainConfig:
    data = {"base_model": "m.safetensors", "output_dir": str(tmp_path / "out"), **values}
    return validate_config_dict(data, "<test>", check_paths=False)


def build(tmp_path: Path, **values: Any) -> TrainingSet:
    return training_set_for(config(tmp_path, **values))


def test_repeats_come_from_kohya_folders(tmp_path: Path) -> None:
    data = tmp_path / "train"
    for i in range(3):
        captioned(data / "10_ink" / f"{i}.png", f"ink {i}")
    for i in range(2):
        captioned(data / "2_close" / f"{i}.png", f"close {i}")
    captioned(data / "loose.png", "loose")  # outside any N_name folder: once
    training_set = build(tmp_path, train_data_dir=str(data))
    assert training_set.num_train_images == 6 and training_set.num_reg_images == 0
    assert training_set.num_train_samples == len(training_set.samples) == 10 * 3 + 2 * 2 + 1
    per_image = Counter(sample.image.file_name for sample in training_set.samples)
    assert per_image["10_ink/0.png"] == 10 and per_image["2_close/1.png"] == 2 and per_image["loose.png"] == 1
    assert {sample.loss_weight for sample in training_set.samples} == {1.0}


def test_num_repeats_overrides_the_folder_numbers(tmp_path: Path) -> None:
    data = tmp_path / "train"
    captioned(data / "10_ink" / "a.png", "a")
    captioned(data / "b.png", "b")
    assert build(tmp_path, train_data_dir=str(data), num_repeats=3).num_train_samples == 6


@pytest.mark.parametrize(
    ("folder_repeats", "train_samples", "expected"),
    [
        # pass 1 takes 1+1+1 = 3; pass 2 adds one each (6); pass 3 adds one to the first and reaches 7
        ([1, 1, 1], 7, [3, 2, 2]),
        ([5], 3, [5]),  # the first pass alone overshoots: sd-scripts keeps all 5
        ([2, 2], 5, [3, 2]),  # 2 + 2 = 4, then +1 on the first = 5
        ([3, 3, 3], 4, [3, 3, 0]),  # 3 + 3 = 6 >= 4 before the third image: it is never drawn
        ([2, 1], 10, [6, 4]),  # folder repeats count in pass 1 only: 3, 5, 7, 9, then 10
        ([1], 10, [10]),
        ([1, 2], 3, [1, 2]),  # exactly balanced by the folder repeats
        ([], 5, []),
        ([4, 4], 0, [0, 0]),
    ],
)
def test_balanced_reg_repeats_matches_sd_scripts(
    folder_repeats: list[int], train_samples: int, expected: list[int]
) -> None:
    assert balanced_reg_repeats(folder_repeats, train_samples) == expected


def test_reg_samples_are_balanced_and_carry_prior_loss_weight(tmp_path: Path) -> None:
    data, reg = tmp_path / "train", tmp_path / "reg"
    for i in range(2):
        captioned(data / "2_sks" / f"{i}.png", f"sks person {i}")
    for i in range(3):
        write_image(reg / "1_person" / f"{i}.png", size=(8, 8))  # no captions: the class token
    training_set = build(tmp_path, train_data_dir=str(data), reg_data_dir=str(reg), prior_loss_weight=0.25)
    assert (training_set.num_train_images, training_set.num_reg_images) == (2, 3)
    # 2 images x 2 repeats = 4 training samples; reg repeats [1, 1, 1] vs 4 -> [2, 1, 1]
    reg_draws = Counter(s.image.file_name for s in training_set.samples if s.image.is_reg)
    assert reg_draws == {"1_person/0.png": 2, "1_person/1.png": 1, "1_person/2.png": 1}
    weights = Counter((s.image.is_reg, s.loss_weight) for s in training_set.samples)
    assert weights == {(False, 1.0): 4, (True, 0.25): 4}
    assert {s.image.caption for s in training_set.samples if s.image.is_reg} == {"person"}
    assert [d.key for d in training_set.datasets] == ["train_data_dir", "reg_data_dir"]


def test_datasets_inherit_the_top_level_and_keep_their_own_resolution(tmp_path: Path) -> None:
    small, large = tmp_path / "small", tmp_path / "large"
    captioned(small / "a.png", "a")
    captioned(large / "b.png", "b", extension=".caption")
    captioned(large / "c.png", "c", extension=".caption")
    training_set = build(
        tmp_path,
        resolution=128,
        caption_prefix="sks",
        shuffle_caption=True,
        datasets=[
            {"train_data_dir": str(small), "resolution": 64, "num_repeats": 2, "caption_prefix": "ink"},
            {"train_data_dir": str(large), "caption_extension": ".caption", "shuffle_caption": False},
        ],
    )
    buckets = Counter((s.image.subset, s.bucket) for s in training_set.samples)
    assert buckets == {(0, (64, 64)): 2, (1, (128, 128)): 2}
    assert training_set.bucket_counts() == {(64, 64): 2, (128, 128): 2}
    first, second = training_set.caption_options()
    assert (first.caption_prefix, first.shuffle_caption) == ("ink", True)  # own prefix, inherited shuffle
    assert (second.caption_prefix, second.shuffle_caption) == ("sks", False)  # inherited prefix, own shuffle
    # two buckets never share a batch: ceil(2/4) + ceil(2/4)
    assert training_set.batches_per_epoch(batch_size=4) == 2


def _mixed_aspect_dataset(root: Path) -> Path:
    """2_mix: 2 wide (200x70), 1 tall (70x200), 3 square (100x100); 1_extra: one 256x64."""
    for i in range(2):
        captioned(root / "2_mix" / f"wide{i}.png", "wide", size=(200, 70))
    captioned(root / "2_mix" / "tall.png", "tall", size=(70, 200))
    for i in range(3):
        captioned(root / "2_mix" / f"square{i}.png", "square", size=(100, 100))
    captioned(root / "1_extra" / "banner.png", "banner", size=(256, 64))
    return root


BUCKET_KEYS = {"resolution": 128, "enable_bucket": True, "min_bucket_reso": 64, "max_bucket_reso": 256}


def test_enable_bucket_puts_each_aspect_ratio_in_its_bucket(tmp_path: Path) -> None:
    data = _mixed_aspect_dataset(tmp_path / "train")
    training_set = build(tmp_path, train_data_dir=str(data), **BUCKET_KEYS)
    # Buckets of area <= 128*128 in steps of 64: 64x192, 64x256, 128x128, 192x64, 256x64 (and the square).
    # 200x70 has ratio 2.86, closest to 192x64 (3.0); 70x200 -> 64x192; 100x100 -> 128x128 (upscaled);
    # 256x64 is a bucket of its own size.
    bucket_of = {s.image.file_name: s.bucket for s in training_set.samples}
    assert bucket_of["2_mix/wide0.png"] == (192, 64) and bucket_of["2_mix/tall.png"] == (64, 192)
    assert bucket_of["2_mix/square0.png"] == (128, 128) and bucket_of["1_extra/banner.png"] == (256, 64)
    counts = {(64, 192): 2, (128, 128): 6, (192, 64): 4, (256, 64): 1}  # with the 2x repeats
    assert training_set.bucket_counts() == counts
    # batch 4: ceil(2/4) + ceil(6/4) + ceil(4/4) + ceil(1/4) = 1 + 2 + 1 + 1 = 5
    assert training_set.batches_per_epoch(4) == 5
    assert training_set.batches_per_epoch(4, num_processes=2) == 3  # ceil(5 / 2)
    # batch 3: 1 + 2 + 2 + 1 = 6, over 4 processes ceil(6 / 4) = 2
    assert training_set.batches_per_epoch(3) == 6 and training_set.batches_per_epoch(3, 4) == 2
    sampler = BucketBatchSampler([s.bucket for s in training_set.samples], 4, seed=0)
    assert len(sampler) == len(list(sampler)) == 5


def test_bucket_no_upscale_keeps_small_images_at_their_size(tmp_path: Path) -> None:
    data = _mixed_aspect_dataset(tmp_path / "train")
    training_set = build(tmp_path, train_data_dir=str(data), bucket_no_upscale=True, **BUCKET_KEYS)
    # every image is below 128*128 px, so each side is only rounded down to a multiple of 64
    assert training_set.bucket_counts() == {(64, 64): 6, (64, 192): 2, (192, 64): 4, (256, 64): 1}


def test_without_buckets_every_sample_is_the_resolution_square(tmp_path: Path) -> None:
    data = _mixed_aspect_dataset(tmp_path / "train")
    training_set = build(tmp_path, train_data_dir=str(data), resolution=64)
    assert training_set.bucket_counts() == {(64, 64): 13}
    assert training_set.batches_per_epoch(4) == 4  # ceil(13 / 4)
