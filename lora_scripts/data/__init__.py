"""Reading the training data: images and captions, checked up front, served as tensors."""

from lora_scripts.data.caption_ops import CaptionOptions, process_caption
from lora_scripts.data.captions import (
    IMAGE_EXTENSIONS,
    CaptionedImage,
    caption_words,
    collect_dataset,
    find_images,
    tag_frequency,
)
from lora_scripts.data.dataset import EpochBatchSampler, TrainingDataset, collate
from lora_scripts.data.images import load_rgb, resize_and_crop, to_rgb, to_tensor
from lora_scripts.data.subsets import SubsetSpec, collect_subsets, folder_repeats

__all__ = [
    "CaptionOptions",
    "SubsetSpec",
    "collect_subsets",
    "folder_repeats",
    "process_caption",
    "IMAGE_EXTENSIONS",
    "EpochBatchSampler",
    "TrainingDataset",
    "CaptionedImage",
    "collate",
    "collect_dataset",
    "find_images",
    "load_rgb",
    "resize_and_crop",
    "caption_words",
    "tag_frequency",
    "to_rgb",
    "to_tensor",
]
