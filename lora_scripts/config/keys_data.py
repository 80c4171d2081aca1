"""Config keys for the dataset's depth: sd-scripts folders, several datasets, regularization images, caption
options, augmentation, aspect-ratio buckets and caches. Mixed into `TrainConfig` (schema.py).

Names are sd-scripts' where a user would look for them. A `datasets` entry takes the per-dataset keys
(`PER_DATASET_KEYS`); any it leaves out come from the top level, so the top level is "the default for every
dataset" exactly as in sd-scripts' TOML `[general]` section.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

from lora_scripts.config.fields import Float, Int, PathValue, field

# Keys a `datasets` entry may set for itself; the rest apply to the whole run.
PER_DATASET_KEYS: tuple[str, ...] = (
    "train_data_dir",
    "metadata_path",
    "caption_extension",
    "num_repeats",
    "is_reg",
    "resolution",
    "shuffle_caption",
    "keep_tokens",
    "caption_separator",
    "caption_prefix",
    "caption_suffix",
    "caption_dropout_rate",
    "caption_tag_dropout_rate",
    "flip_aug",
    "random_crop",
)

Rate = Annotated[float, Field(ge=0, le=1)]


class DatasetEntry(BaseModel):
    """One entry of `datasets`: a folder and the settings that differ from the top level (None = inherit)."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    train_data_dir: PathValue = Field(description="Folder of this dataset's images.")
    metadata_path: PathValue | None = None
    caption_extension: str | None = Field(None, pattern=r"^\.[^/\\]+$")
    num_repeats: Int | None = Field(None, ge=1)
    is_reg: bool = Field(False, description="Regularization (prior-preservation) images.")
    resolution: Int | None = Field(None, ge=64, multiple_of=8)
    shuffle_caption: bool | None = None
    keep_tokens: Int | None = Field(None, ge=0)
    caption_separator: str | None = Field(None, min_length=1)
    caption_prefix: str | None = None
    caption_suffix: str | None = None
    caption_dropout_rate: Annotated[Float, Field(ge=0, le=1)] | None = None
    caption_tag_dropout_rate: Annotated[Float, Field(ge=0, le=1)] | None = None
    flip_aug: bool | None = None
    random_crop: bool | None = None


class DatasetKeys(BaseModel):
    """Dataset layout, captions and augmentation (section "data")."""

    caption_extension: str = field(
        "data",
        "Extension of the caption file beside each image (cat.png + cat.txt). sd-scripts defaults to "
        "'.caption' and silently trains without captions when none match; here a missing caption stops "
        "training with the list of images that lack one.",
        ".txt",
        pattern=r"^\.[^/\\]+$",
        allowed_doc="an extension starting with '.', e.g. .txt or .caption",
    )
    num_repeats: Int | None = field(
        "data",
        "Times each image is seen per epoch. Leave it out to take it from sd-scripts folder names: images in "
        "a subfolder '10_inkstyle' repeat 10 times, images outside such folders once.",
        None,
        default_doc="from N_name folder names (1 elsewhere)",
        ge=1,
    )
    datasets: list[DatasetEntry] | None = field(
        "data",
        "Several datasets in one run, each a mapping with its own train_data_dir and any of: "
        "metadata_path, caption_extension, num_repeats, is_reg, resolution, shuffle_caption, keep_tokens, "
        "caption_separator, caption_prefix, caption_suffix, caption_dropout_rate, caption_tag_dropout_rate, "
        "flip_aug, random_crop. Keys an entry leaves out take the top-level value. Use it instead of "
        "train_data_dir.",
        None,
        default_doc="none (one dataset: train_data_dir)",
        allowed_doc="a list of mappings, each with train_data_dir",
        min_length=1,
    )
    reg_data_dir: PathValue | None = field(
        "data",
        "Folder of regularization (class) images for prior preservation, in sd-scripts' layout: "
        "'1_person/…' gives the caption 'person' to images without a caption file. Each epoch uses as many "
        "regularization samples as training samples, as sd-scripts does.",
        None,
        default_doc="none",
    )
    prior_loss_weight: Float = field(
        "data",
        "Weight of the regularization images' loss relative to the training images'.",
        1.0,
        ge=0,
    )
    shuffle_caption: bool = field(
        "data",
        "Shuffle the comma-separated tags of each caption at every step (for tag captions).",
        False,
    )
    keep_tokens: Int = field(
        "data",
        "Keep this many leading tags in place when shuffling or dropping tags (e.g. 1 keeps the trigger "
        "word first).",
        0,
        ge=0,
    )
    caption_separator: str = field(
        "data", "What separates the tags of a caption, for shuffling and tag dropout.", ",", min_length=1
    )
    caption_prefix: str | None = field(
        "data",
        "Tag put in front of every caption (e.g. a trigger word); counted by keep_tokens.",
        None,
        default_doc="none",
    )
    caption_suffix: str | None = field(
        "data", "Tag put at the end of every caption.", None, default_doc="none"
    )
    caption_dropout_rate: Float = field(
        "data",
        "Probability of training a step with an empty caption (helps the LoRA work without its words).",
        0.0,
        ge=0,
        le=1,
    )
    caption_tag_dropout_rate: Float = field(
        "data",
        "Probability of dropping each (non-kept) tag of a caption at each step.",
        0.0,
        ge=0,
        le=1,
    )
    flip_aug: bool = field(
        "data",
        "Also train on horizontally mirrored images (doubles the variety; avoid for text or asymmetric "
        "characters).",
        False,
    )
    random_crop: bool = field(
        "data",
        "Crop a random part of each image instead of the centre (kohya). Turns the automatic latent cache "
        "off; cannot be used with cache_latents: true.",
        False,
    )
    center_crop: bool | None = field(
        "data",
        "The diffusers spelling of the crop choice: center_crop: false means random_crop: true.",
        None,
        default_doc="the opposite of random_crop",
    )


class BucketKeys(BaseModel):
    """Aspect-ratio buckets (section "buckets")."""

    enable_bucket: bool = field(
        "buckets",
        "Train each image at the aspect ratio closest to its own (about resolution² pixels) instead of a "
        "centre-cropped square; batches are drawn within one bucket.",
        False,
    )
    min_bucket_reso: Int = field("buckets", "Smallest bucket side in pixels.", 256, ge=64, multiple_of=8)
    max_bucket_reso: Int = field("buckets", "Largest bucket side in pixels.", 1024, ge=64, multiple_of=8)
    bucket_reso_steps: Int = field(
        "buckets",
        "Bucket sides are multiples of this many pixels (64 is safest for every UNet).",
        64,
        ge=8,
        multiple_of=8,
    )
    bucket_no_upscale: bool = field(
        "buckets",
        "Never enlarge an image to fill a bucket: small images get a bucket of their own "
        "(rounded down) size.",
        False,
    )


class CacheKeys(BaseModel):
    """Latent and text-encoder caches (section "caching")."""

    cache_latents: bool | None = field(
        "caching",
        "Encode every image with the VAE once before training instead of at every step (much faster, and "
        "the same numbers; the VAE then leaves the GPU). Needs a fixed crop: left out, it is on unless a "
        "dataset uses random_crop; true with random_crop is an error.",
        None,
        default_doc="auto: on unless random_crop is used",
    )
    cache_latents_to_disk: bool = field(
        "caching",
        "Also keep the cached latents on disk (safetensors), keyed by image content, size, crop, flip and "
        "VAE, so later runs reuse them; a changed image or VAE is encoded again. Implies cache_latents.",
        False,
    )
    cache_dir: PathValue | None = field(
        "caching",
        "Folder for the on-disk latent cache.",
        None,
        default_doc="a hidden .lora_scripts_cache folder in each dataset folder",
    )
    cache_text_encoder_outputs: bool | None = field(
        "caching",
        "Encode each caption once before training (the same numbers; the text encoder then leaves the "
        "GPU). Needs a frozen text encoder and captions that do not change (no shuffling or dropout): left "
        "out, it is on when both hold; true without them is an error.",
        None,
        default_doc="auto: on unless train_text_encoder, shuffle_caption or a caption dropout is used",
    )
