"""Pick and load the model family of a base model. New families (FLUX, SD3) branch here only."""

from __future__ import annotations

import json
from pathlib import Path

from diffusers import UNet2DConditionModel

from lora_scripts.errors import UserError
from lora_scripts.models.detect import (
    TRAINABLE,
    VERSION_NAMES,
    ModelVersion,
    checkpoint_shapes,
    detect_model_version,
    flux_variant,
)
from lora_scripts.models.family import ModelFamily
from lora_scripts.models.flux import FluxFamily, FluxLoad
from lora_scripts.models.flux_loading import load_flux_components, shipped_flux_config_dir
from lora_scripts.models.locate import locate_base_model
from lora_scripts.models.sd_loading import (
    folder_config,
    load_sd_components,
    marks_zero_terminal_snr,
    scheduler_config_of,
    shipped_config_dir,
    version_from_unet_config,
)
from lora_scripts.models.sdxl import SDXLFamily
from lora_scripts.models.sdxl_loading import load_sdxl_components
from lora_scripts.models.stable_diffusion import StableDiffusionFamily


def base_model_version(base_model: str) -> ModelVersion:
    """ "sd_v1", "sd_v2" or "sdxl" (or a version in FAMILIES), read from the file's header or the folder's
    configs (no weights loaded). Raises the loaders' UserError for what is neither (a refiner, SD3, a LoRA,
    a broken file), and for FLUX.1 while it has no family here."""
    location = locate_base_model(base_model)
    if location.kind == "single_file":
        version = detect_model_version(checkpoint_shapes(location.path), location.path)
    elif _is_flux_folder(location.path):
        version = "flux1"
    elif _lists_component(location.path, "text_encoder_2") or _lists_component(location.path, "transformer"):
        return "sdxl"  # the SDXL loader words the refusal of refiners and transformers
    else:
        version = version_from_unet_config(
            folder_config(UNet2DConditionModel, location.path, "unet"), location.path
        )
    if version not in FAMILIES:
        raise UserError(
            f"base_model: '{location.path}' is a {VERSION_NAMES[version]} model; {TRAINABLE}, and "
            f"{VERSION_NAMES[version]} training is not supported yet."
        )
    return version


def family_of(base_model: str, *, fallback: bool = False) -> type[ModelFamily]:
    """The family class of a base model. fallback: a base model that cannot be read gets the base class
    (SD's defaults: CLIP captions, a UNet) instead of the loader's UserError, for reports that say why
    elsewhere (`check`)."""
    try:
        return FAMILIES[base_model_version(base_model)]
    except (UserError, OSError):
        if fallback:
            return ModelFamily
        raise


def _is_flux_folder(folder: Path) -> bool:
    """Whether a diffusers folder's model_index.json names a FLUX.1 transformer (FluxTransformer2DModel)."""
    try:
        index = json.loads((folder / "model_index.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    entry = index.get("transformer") if isinstance(index, dict) else None
    return isinstance(entry, list) and bool(entry) and entry[-1] == "FluxTransformer2DModel"


def single_file_config_dir(version: ModelVersion, path: Path) -> Path:
    """The shipped configs that describe a single file of `version` (FLUX.1: dev's or schnell's, by the
    file's guidance embedding, read from its header)."""
    if version == "flux1":
        return shipped_flux_config_dir(flux_variant(checkpoint_shapes(path)))
    return shipped_config_dir(version)


def base_model_zero_terminal_snr(base_model: str, config_dir: Path | None = None) -> bool:
    """Whether `base_model` is marked as trained with zero terminal SNR, as its loader finds it (the
    components' `zero_terminal_snr`), from the file's header or the scheduler config (no weights loaded).

    config_dir: a single file's base_model_config, whose scheduler config counts as the loader reads it.
    """
    location = locate_base_model(base_model)
    version = base_model_version(base_model)
    if version == "flux1":  # a rectified-flow model: its noise levels reach pure noise by construction
        return False
    if location.kind == "single_file":
        folder = Path(config_dir) if config_dir is not None else shipped_config_dir(version)
        return marks_zero_terminal_snr(checkpoint_shapes(location.path), scheduler_config_of(folder, version))
    return marks_zero_terminal_snr(None, scheduler_config_of(location.path, version))


FAMILIES: dict[ModelVersion, type[ModelFamily]] = {
    "sd_v1": StableDiffusionFamily,
    "sd_v2": StableDiffusionFamily,
    "sdxl": SDXLFamily,
    "flux1": FluxFamily,
}


def native_resolution(base_model: str) -> int:
    """The side length `base_model`'s family was trained at (512 SD 1.x/2.x, 1024 SDXL): the default of
    the `resolution` key. Raises the loaders' UserError for a model training cannot use."""
    return FAMILIES[base_model_version(base_model)].native_resolution


def _lists_component(folder: Path, name: str) -> bool:
    """Whether the diffusers folder's model_index.json lists `name` (the refiner lists `[null, null]`)."""
    try:
        index = json.loads((folder / "model_index.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return (folder / name).is_dir()
    entry = index.get(name) if isinstance(index, dict) else None
    return isinstance(entry, list) and bool(entry) and entry[-1] is not None


def load_family(
    base_model: str,
    *,
    config_dir: Path | None = None,
    v_parameterization: bool | None = None,
    clip_skip: int | None = None,
    max_token_length: int = 75,
    flux: FluxLoad | None = None,
) -> ModelFamily:
    """Load `base_model` (file, diffusers folder or cached hub id) as its model family.

    clip_skip: use the text encoder's n-th layer from the end (None or 1: the last; SD 1.x/2.x only).
    max_token_length: 75, or 150 / 225 to read longer captions in chunks (models/long_prompts.py).
    flux: FLUX.1's part files and training options.
    """
    version = base_model_version(base_model)
    if version == "flux1":
        flux = flux or FluxLoad()
        components = load_flux_components(
            base_model, vae=flux.vae, clip_l=flux.clip_l, t5xxl=flux.t5xxl, config_dir=config_dir
        )
        return FluxFamily(components, flux.options)
    if version == "sdxl":
        sdxl = load_sdxl_components(base_model, config_dir=config_dir, v_parameterization=v_parameterization)
        return SDXLFamily(sdxl, clip_skip=clip_skip, max_token_length=max_token_length)
    components = load_sd_components(base_model, config_dir=config_dir, v_parameterization=v_parameterization)
    return StableDiffusionFamily(components, clip_skip=clip_skip, max_token_length=max_token_length)
