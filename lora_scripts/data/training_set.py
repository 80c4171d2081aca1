"""The samples of one epoch: every image times its repeats, regularization images balanced against them,
each with its bucket and loss weight. `check` and `train` both build it, so the step count `check` shows is
the one training runs. Images held out for the validation loss (`validation_split`, or the
`validation_data_dir` folder) are set apart here, so nothing else ever trains on them.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

from lora_scripts.config.datasets import DatasetSettings, dataset_settings
from lora_scripts.config.schema import TrainConfig
from lora_scripts.data.buckets import BucketSettings, Size, assign_bucket, image_size
from lora_scripts.data.caption_ops import CaptionOptions
from lora_scripts.data.captions import CaptionedImage
from lora_scripts.data.subsets import SubsetSpec, collect_subsets
from lora_scripts.errors import UserError


@dataclass(frozen=True)
class Sample:
    """One draw of an epoch; an image with repeats 3 appears as three Samples."""

    image: CaptionedImage
    bucket: Size  # (width, height) it is trained at
    loss_weight: float  # 1, or prior_loss_weight for regularization images
    original_size: Size  # the image's displayed (width, height), before it is fitted to `bucket`


@dataclass(frozen=True)
class TrainingSet:
    images: list[CaptionedImage]  # every captioned image trained on, training and regularization
    samples: list[Sample]  # one epoch's draws, in a fixed order (the batch sampler shuffles)
    datasets: list[DatasetSettings]
    # Images the validation loss is measured on, never trained on (empty: validation off). `subset` indexes
    # `datasets` (for validation_data_dir images: 0, so they use the first dataset's resolution).
    validation: list[CaptionedImage] = field(default_factory=list)

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
    *,
    validation_split: float = 0.0,
    seed: int = 0,
) -> TrainingSet:
    """Collect (unless `images` is given), hold out `validation_split` of the training images
    (`split_validation`), bucket and repeat the rest. Raises the datasets' UserError."""
    if images is None:
        images = collect_subsets(subset_specs(datasets))
    validation: list[CaptionedImage] = []
    if validation_split > 0:
        images, validation = split_validation(images, validation_split, seed)
    per_dataset = [bucket_settings(d, buckets) for d in datasets]
    size_of = {item: image_size(item.path) for item in images}
    bucket_of = {item: assign_bucket(size_of[item], per_dataset[item.subset]) for item in images}
    train = [item for item in images if not item.is_reg]
    reg = [item for item in images if item.is_reg]
    samples = [
        Sample(item, bucket_of[item], 1.0, size_of[item]) for item in train for _ in range(item.repeats)
    ]
    reg_repeats = balanced_reg_repeats([item.repeats for item in reg], len(samples))
    samples += [
        Sample(item, bucket_of[item], prior_loss_weight, size_of[item])
        for item, repeats in zip(reg, reg_repeats, strict=True)
        for _ in range(repeats)
    ]
    return TrainingSet(images=list(images), samples=samples, datasets=list(datasets), validation=validation)


def split_validation(
    images: list[CaptionedImage], fraction: float, seed: int
) -> tuple[list[CaptionedImage], list[CaptionedImage]]:
    """(images kept for training, images held out for validation).

    Holds out round(fraction * n) of the n training images, rounding halves up (at least 1 when fraction >
    0); regularization images are always kept. Which ones is a permutation seeded by `seed` of the training
    images sorted by path, so the same files and seed hold out the same images whatever order they were
    listed in. Kept images stay in their input order; held-out ones are sorted by path. Raises UserError
    when no training image would be left.
    """
    if not 0 <= fraction < 1:
        raise UserError(f"validation_split: {fraction} must be at least 0 and below 1 (0.1 = one in ten).")
    if fraction == 0:
        return list(images), []
    train = sorted((item for item in images if not item.is_reg), key=_path_order)
    count = max(1, math.floor(fraction * len(train) + 0.5))
    if count >= len(train):
        raise UserError(
            f"validation_split: {fraction} would hold out {count} of the {len(train)} training images and "
            "leave none to train on; lower validation_split, add images, or put separate images in "
            "validation_data_dir instead."
        )
    # A string seed is hashed with SHA-512 by `random`: the same permutation on every platform and Python,
    # and a different stream from the run's other uses of `seed`.
    order = list(range(len(train)))
    random.Random(f"validation_split/{seed}").shuffle(order)
    held_out = {train[i] for i in sorted(order[:count])}
    kept = [item for item in images if item not in held_out]
    return kept, sorted(held_out, key=_path_order)


def _path_order(item: CaptionedImage) -> tuple[str, int]:
    return str(item.path), item.subset


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


def validation_spec(config: TrainConfig) -> SubsetSpec:
    """How `validation_data_dir` is read: captions as for train_data_dir (its own `metadata.csv` if it has
    one, else caption files with `caption_extension`), each image once (N_name folders do not repeat)."""
    folder = Path(config.validation_data_dir)  # type: ignore[arg-type]
    metadata = folder / "metadata.csv"
    return SubsetSpec(
        image_dir=folder,
        metadata_path=metadata if metadata.is_file() else None,
        caption_extension=config.caption_extension,
        num_repeats=1,
        key="validation_data_dir",
    )


def training_set_for(config: TrainConfig) -> TrainingSet:
    """Every dataset of `config`, collected, checked, bucketed and repeated, with its validation images:
    `validation_split` of the training images, or the `validation_data_dir` folder.
    Raises one UserError with the problems of every folder."""
    problems: list[str] = []
    validation = None
    if config.validation_data_dir is not None:
        try:
            validation = collect_subsets([validation_spec(config)])
        except UserError as err:
            problems += err.messages
    try:
        training_set = build_training_set(
            dataset_settings(config),
            bucket_options(config),
            config.prior_loss_weight,
            validation_split=config.validation_split,
            seed=config.seed,
        )
    except UserError as err:
        raise UserError(err.messages + problems) from None
    if problems:
        raise UserError(problems)
    return training_set if validation is None else replace(training_set, validation=validation)
