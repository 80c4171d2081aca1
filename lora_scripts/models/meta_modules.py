"""A base model's denoiser (UNet, FLUX's transformer) and text encoders built on the meta device from their
configs: every module and shape, no memory, no weights (an SDXL UNet in about a second). The post-training
tools name and size a LoRA file's layers with them (export/lora_layouts.py); a single file's own shapes
decide nothing here.

Which text encoders a version has, and how LoRA files name their layers, is the family's (`FAMILIES`).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from pathlib import Path

from torch import nn

from lora_scripts.export.kohya import LoraNetwork
from lora_scripts.models.detect import ModelVersion
from lora_scripts.models.registry import FAMILIES
from lora_scripts.models.sd_loading import shipped_config_dir

VERSIONS: tuple[ModelVersion, ...] = ("sd_v1", "sd_v2", "sdxl", "flux1")


@dataclass(frozen=True)
class MetaModel:
    """A version's modules on the meta device and the networks LoRA files name them by."""

    version: ModelVersion
    unet: nn.Module
    text_encoders: tuple[nn.Module, ...]
    networks: tuple[LoraNetwork, ...]


def meta_model(version: ModelVersion, config_dir: Path | None = None) -> MetaModel:
    """`version`'s full-size modules (from the shipped configs, or `config_dir`'s diffusers layout). Built
    once per process and version: the modules only name and size layers, nothing changes them."""
    return _built(version, str(Path(config_dir).resolve()) if config_dir else None)


@cache
def _built(version: ModelVersion, config_dir: str | None) -> MetaModel:
    family = FAMILIES[version]
    unet, encoders = family.meta_modules(Path(config_dir or shipped_config_dir(version)))
    networks = tuple(family.file_networks(unet, list(encoders)))
    return MetaModel(version, unet, tuple(encoders), networks)
