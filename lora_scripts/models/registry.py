"""Pick and load the model family of a base model. New families (SDXL, FLUX, SD3) branch here only."""

from __future__ import annotations

from pathlib import Path

from lora_scripts.models.family import ModelFamily
from lora_scripts.models.sd_loading import load_sd_components
from lora_scripts.models.stable_diffusion import StableDiffusionFamily


def load_family(
    base_model: str,
    *,
    config_dir: Path | None = None,
    v_parameterization: bool | None = None,
    clip_skip: int | None = None,
) -> ModelFamily:
    """Load `base_model` (file, diffusers folder or cached hub id) as its model family.

    clip_skip: use the text encoder's n-th layer from the end (None or 1: the last).
    """
    components = load_sd_components(base_model, config_dir=config_dir, v_parameterization=v_parameterization)
    return StableDiffusionFamily(components, clip_skip=clip_skip)
