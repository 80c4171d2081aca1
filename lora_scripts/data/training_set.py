"""The samples of one epoch: every image times its repeats, regularization images balanced against them,
each with its bucket and loss weight. `check` and `train` both build it, so the step count `check` shows is
the one training runs.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, fields, replace

from lora_scripts.config.datasets import DatasetSettings, dataset_settings
from lora_scripts.config.schema import TrainConfig
from lora_scripts.data.buckets import BucketSettings, Size, assign_bucket, image_size
from lora_scripts.data.caption_ops import CaptionOptions
from lora_scripts.data.captions import CaptionedImage
from lora_scripts.data.subsets import SubsetSpec, collect_subsets


@dataclass(frozen=True)
class Sample:
    """One draw of an epoch; an image with repeats 3 appears as three Samples."""

    image: CaptionedImage
    bucket: Size  # (width, height) it is trained at
    loss_weight: float  # 1, or prior_loss_weight for regularization images


@dataclass(frozen=True)
class TrainingSet:
    images: list[CaptionedImage]  # every captioned image, training and regularization
    samples: list[Sample]  # one epoch's draws, in a fixed order (the batch sampler shuffles)
    datasets: list[DatasetSettings]

    @property
    def num_train_images(self) -> int:
        return sum(1 for item in self.images if not item.is_reg)

    @property
    def num_reg_images(self) -> int:
        return sum(1 for item in self.images if item.is_reg)

    @property
    def num_train_samples(self) -> int:
        return sum(1 for s in self.samples if not s.image.is_reg)

    def bucket_counts(self) -> dict[Size, int]:
        """Samples per bucket, sorted by (width, height)."""
        return dict(sorted(Counter(s.bucket for s in self.samples).items()))

    def batches_per_epoch(self, batch_size: int, num_processes: int = 1) -> int:
        """Batches each process runs per epoch: whole buckets cut into batches (a partial last batch per
        bucket), then dealt out over processes, every process getting the same count (accelerate pads)."""
        total = sum(math.ceil(n / batch_size) for n in self.bucket_counts().values())
        return math.ceil(total / num_processes)

    def caption_options(self) -> list[CaptionOptions]:
        """Per dataset (index = `CaptionedImage.subset`)."""
        return [caption_options(d) for d in self.datasets]


def caption_options(dataset: DatasetSettings) -> CaptionOptions:
    # CaptionOptions' fields are named after the config keys that set them.
    return CaptionOptions(**{f.name: getattr(dataset, f.name) for f in fields(CaptionOptions)})


def subset_specs(datasets: Sequence[DatasetSettings]) -> list[SubsetSpec]:
    return [
        SubsetSpec(
            image_dir=d.train_data_dir,
            metadata_path=d.metadata_path,
            caption_extension=d.caption_extension,
            num_repeats=d.num_repeats,
            is_reg=d.is_reg,
            key=d.dir_key,
        )
        for d in datasets
    ]


def bucket_settings(dataset: DatasetSettings, buckets: BucketSettings) -> BucketSettings:
    """`buckets` (the run's bucket options) at this dataset's resolution."""
    return replace(buckets, resolution=(dataset.resolution, dataset.resolution))


def build_training_set(
    datasets: Sequence[DatasetSettings],
    buckets: BucketSettings,
    prior_loss_weight: float,
    images: list[CaptionedImage] | None = None,
) -> TrainingSet:
    """Collect (unless `images` is given), bucket and repeat every image. Raises the datasets' UserError."""
    if images is None:
        images = collect_subsets(subset_specs(datasets))
    per_dataset = [bucket_settings(d, buckets) for d in datasets]
    bucket_of = {item: assign_bucket(image_size(item.path), per_dataset[item.subset]) for item in images}
    train = [item for item in images if not item.is_reg]
    reg = [item for item in images if item.is_reg]
    samples = [Sample(item, bucket_of[item], 1.0) for item in train for _ in range(item.repeats)]
    reg_repeats = balanced_reg_repeats([item.repeats for item in reg], len(samples))
    samples += [
        Sample(item, bucket_of[item], prior_loss_weight)
        for item, repeats in zip(reg, reg_repeats, strict=True)
        for _ in range(repeats)
    ]
    return TrainingSet(images=list(images), samples=samples, datasets=list(datasets))


def balanced_reg_repeats(repeats: Sequence[int], num_train_samples: int) -> list[int]:
    """How often each regularization image is drawn per epoch: sd-scripts' DreamBoothDataset rule.

    The first pass takes each image with its folder repeats; further passes add one draw per image, in order,
    until there are at least as many regularization draws as training draws (so the total can overshoot by
    up to the last image's repeats, exactly as in sd-scripts). Images a pass does not reach are not used.
    """
    counts = [0] * len(repeats)
    if not repeats:
        return counts
    total, first_pass = 0, True
    while total < num_train_samples:
        for i, folder_repeats in enumerate(repeats):
            step = folder_repeats if first_pass else 1
            counts[i] += step
            total += step
            if total >= num_train_samples:
                break
        first_pass = False
    return counts


def bucket_options(config: TrainConfig) -> BucketSettings:
    """The run's bucket options; each dataset applies them at its own resolution (`bucket_settings`)."""
    return BucketSettings(
        resolution=(config.resolution, config.resolution),
        enable_bucket=config.enable_bucket,
        min_bucket_reso=config.min_bucket_reso,
        max_bucket_reso=config.max_bucket_reso,
        bucket_reso_steps=config.bucket_reso_steps,
        bucket_no_upscale=config.bucket_no_upscale,
    )


def training_set_for(config: TrainConfig) -> TrainingSet:
    """Every dataset of `config`, collected, checked, bucketed and repeated
    (raises the datasets' UserError)."""
    return build_training_set(dataset_settings(config), bucket_options(config), config.prior_loss_weight)
