"""Load an SDXL base model (UNet, VAE, two text encoders and tokenizers, noise scheduler) fully offline.

The same three sources as SD 1.x/2.x (`locate_base_model`): a single file in Stability's sgm layout (what
civitai and WebUI users have), a diffusers folder, or a hub snapshot already in the local cache. Single files
carry no configs, so stable-diffusion-xl-base-1.0's are shipped in `models/assets/sdxl/`; the weights are
converted with diffusers' own single-file mapping (`sd_loading`'s helpers, shared with SD 1.x/2.x).

The SDXL family (models/sdxl.py) trains on what this returns.
Every module comes back in fp32 on CPU, in eval mode, with requires_grad False.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import init_empty_weights
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint, convert_open_clip_checkpoint
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    PreTrainedTokenizerBase,
)

from lora_scripts.errors import UserError
from lora_scripts.models.detect import (
    LDM_UNET_PREFIX,
    SGM_CLIP_PREFIX,
    SGM_OPEN_CLIP_PREFIX,
    TRAINABLE,
    VAE_PREFIX,
    PredictionType,
    detect_model_version,
    read_checkpoint,
)
from lora_scripts.models.folder_tokenizer import fit_tokenizer_to_text_encoder, load_folder_tokenizer
from lora_scripts.models.locate import BaseModelLocation, locate_base_model
from lora_scripts.models.sd_loading import (
    build_and_load,
    clip_tokenizer,
    folder_component,
    folder_config,
    folder_prediction_type,
    ldm_unet_weights,
    load_text_encoder_weights,
    make_noise_scheduler,
    marked_prediction_type,
    marks_zero_terminal_snr,
    read_model_index,
    require_configs,
    scheduler_config_of,
    shipped_config_dir,
    vae_from_ldm,
)

# tokenizer (CLIP ViT-L) pads with <|endoftext|>; tokenizer_2 (OpenCLIP ViT-bigG) with "!" (id 0), as SD 2.x.
# Both are the same BPE vocabulary, so the shipped CLIP tokenizer serves for both.
SDXL_PAD_TOKENS = {"tokenizer": "<|endoftext|>", "tokenizer_2": "!"}
CONFIG_PARTS = ("unet", "vae", "text_encoder", "text_encoder_2")

logger = logging.getLogger(__name__)


@dataclass
class SDXLComponents:
    """A loaded SDXL base model. All modules fp32, CPU, eval(), requires_grad False.

    `text_encoder` is CLIP ViT-L/14 (a CLIPTextModel, 768 wide), `text_encoder_2` OpenCLIP ViT-bigG/14 (a
    CLIPTextModelWithProjection, 1280 wide, whose `text_embeds` are the pooled prompt embedding); the UNet
    cross-attends to both penultimate hidden states concatenated (2048). Each tokenizer's ids fit its text
    encoder's embedding table and its model_max_length its positions (77).
    `noise_scheduler` is a DDPMScheduler for training (add_noise / get_velocity) with `prediction_type` set.
    `zero_terminal_snr`: whether the model marks itself as trained with zero terminal SNR (a `ztsnr` key, as
    NoobAI-XL v-pred files have, or the scheduler config's `rescale_betas_zero_snr`); training's
    `zero_terminal_snr` key defaults to it and sets the schedule.
    """

    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    text_encoder_2: CLIPTextModelWithProjection
    tokenizer: PreTrainedTokenizerBase
    tokenizer_2: PreTrainedTokenizerBase
    noise_scheduler: DDPMScheduler
    prediction_type: PredictionType
    location: BaseModelLocation
    zero_terminal_snr: bool = False


def load_sdxl_components(
    base_model: str,
    *,
    config_dir: Path | None = None,
    v_parameterization: bool | None = None,
) -> SDXLComponents:
    """Load the SDXL base model `base_model` (a .safetensors/.ckpt file, a diffusers folder or a cached hub
    id) offline.

    config_dir: for single files only, a diffusers-layout folder whose unet/, vae/, text_encoder/,
        text_encoder_2/ (and optionally scheduler/, tokenizer/, tokenizer_2/) describe the architecture;
        default: the shipped stable-diffusion-xl-base-1.0 configs.
    v_parameterization: force v-prediction (True) or epsilon (False); None: v-prediction when the file has a
        `v_pred` key (or the folder's scheduler says so), else epsilon as SDXL base was trained.
    Raises UserError (one sentence naming the file) for anything the user can fix.
    """
    location = locate_base_model(base_model)
    if location.kind == "single_file":
        components = _load_single_file(location, config_dir, v_parameterization)
    else:
        components = _load_diffusers_folder(location, v_parameterization)
    for module in (components.unet, components.vae, components.text_encoder, components.text_encoder_2):
        module.requires_grad_(False)
        module.eval()
    logger.info("Loaded SDXL base model (%s) from %s", components.prediction_type, location.path)
    return components


# --- single sgm file --------------------------------------------------------------------------------------


def _load_single_file(
    location: BaseModelLocation, config_dir: Path | None, v_parameterization: bool | None
) -> SDXLComponents:
    path = location.path
    state_dict = read_checkpoint(path)
    version = detect_model_version(state_dict, path)
    if version != "sdxl":
        family = {"sd_v1": "Stable Diffusion 1.x", "sd_v2": "Stable Diffusion 2.x", "flux1": "FLUX.1"}[
            version
        ]
        raise UserError(f"base_model: '{path}' is a {family} checkpoint, not an SDXL one.")
    require_sdxl_parts(state_dict, path)
    cfg_dir = Path(config_dir) if config_dir is not None else shipped_config_dir("sdxl")
    require_configs(cfg_dir, CONFIG_PARTS)
    prediction_type = marked_prediction_type(state_dict, v_parameterization) or "epsilon"
    scheduler_config = scheduler_config_of(cfg_dir, "sdxl")
    zero_snr = marks_zero_terminal_snr(state_dict, scheduler_config)

    unet_config = dict(UNet2DConditionModel.load_config(cfg_dir, subfolder="unet", local_files_only=True))
    weights = ldm_unet_weights(state_dict, unet_config, cfg_dir, path, family="SDXL")
    unet = build_and_load(lambda: UNet2DConditionModel.from_config(unet_config), weights, path, "UNet")
    vae = vae_from_ldm(state_dict, cfg_dir, path)
    text_encoder = _text_encoder_from_sgm(CLIPTextModel, state_dict, cfg_dir, path)
    text_encoder_2 = _text_encoder_from_sgm(CLIPTextModelWithProjection, state_dict, cfg_dir, path)
    return _assemble(
        unet,
        vae,
        text_encoder,
        text_encoder_2,
        cfg_dir,
        scheduler_config,
        prediction_type,
        location,
        zero_snr,
    )


def require_sdxl_parts(state_dict: dict[str, Any], path: Path) -> None:
    """Refuse a partial file (a UNet-only or text-encoder-only extract) before converting anything; values
    need only a `.shape` (`check` passes a header's)."""
    parts = {
        "UNet": LDM_UNET_PREFIX + "input_blocks.",
        "VAE": VAE_PREFIX,
        "CLIP ViT-L text encoder": SGM_CLIP_PREFIX,
        "OpenCLIP ViT-bigG text encoder": SGM_OPEN_CLIP_PREFIX,
    }
    for name, prefix in parts.items():
        if not any(key.startswith(prefix) for key in state_dict):
            raise UserError(
                f"base_model: '{path}' is an SDXL checkpoint without its {name} weights ('{prefix}*'); use "
                "a full SDXL base checkpoint."
            )


def _text_encoder_from_sgm(
    cls: type[CLIPTextModel] | type[CLIPTextModelWithProjection],
    state_dict: dict[str, torch.Tensor],
    cfg_dir: Path,
    path: Path,
) -> torch.nn.Module:
    """CLIP ViT-L (transformers' layout, embedders.0) or OpenCLIP bigG (open_clip's layout, embedders.1)."""
    is_bigg = cls is CLIPTextModelWithProjection
    subfolder = "text_encoder_2" if is_bigg else "text_encoder"
    config = CLIPTextConfig.from_pretrained(cfg_dir, subfolder=subfolder, local_files_only=True)
    with init_empty_weights():
        model = cls(config)
    if is_bigg:  # q/k/v split out of the fused in_proj; text_projection transposed (open_clip: x @ P)
        converted = convert_open_clip_checkpoint(model, state_dict, prefix=SGM_OPEN_CLIP_PREFIX)
        component = "second text encoder (OpenCLIP ViT-bigG)"
    else:
        converted = convert_ldm_clip_checkpoint(state_dict)
        component = "first text encoder (CLIP ViT-L)"
    load_text_encoder_weights(model, converted, path, component)
    return model


# --- diffusers folder / cached hub snapshot ---------------------------------------------------------------


def _load_diffusers_folder(location: BaseModelLocation, v_parameterization: bool | None) -> SDXLComponents:
    path = location.path
    check_sdxl_folder(path)
    unet = folder_component(UNet2DConditionModel, path, "unet")
    vae = folder_component(AutoencoderKL, path, "vae")
    text_encoder = folder_component(CLIPTextModel, path, "text_encoder")
    text_encoder_2 = folder_component(CLIPTextModelWithProjection, path, "text_encoder_2")
    scheduler_config = scheduler_config_of(path, "sdxl")
    prediction_type = folder_prediction_type(scheduler_config, v_parameterization)
    zero_snr = marks_zero_terminal_snr(None, scheduler_config)
    return _assemble(
        unet, vae, text_encoder, text_encoder_2, path, scheduler_config, prediction_type, location, zero_snr
    )


def check_sdxl_folder(path: Path) -> None:
    """Refuse, with the loader's sentence, a diffusers folder that is not an SDXL base model (a refiner, a
    transformer model, an inpainting UNet); reads only its JSON files."""
    _require_sdxl_index(read_model_index(path), path)
    _require_sdxl_unet(folder_config(UNet2DConditionModel, path, "unet"), path)


def _require_sdxl_index(index: dict[str, Any], path: Path) -> None:
    def present(part: str) -> bool:  # the refiner lists text_encoder as [null, null]
        entry = index.get(part)
        return isinstance(entry, list) and bool(entry) and entry[-1] is not None

    if present("transformer"):
        raise UserError(
            f"base_model: '{path}' is a diffusion-transformer model (SD3, ...), not SDXL; {TRAINABLE}, "
            "and other model families are not supported yet."
        )
    if present("text_encoder_2") and not present("text_encoder"):
        raise UserError(f"base_model: '{path}' is an SDXL refiner, which is not supported yet; {TRAINABLE}.")
    if not present("text_encoder_2"):
        raise UserError(
            f"base_model: '{path}' is not an SDXL model (its model_index.json lists no text_encoder_2); load "
            "it as Stable Diffusion 1.x/2.x."
        )


def _require_sdxl_unet(config: dict[str, Any], path: Path) -> None:
    if config.get("addition_embed_type") != "text_time":
        raise UserError(
            f"base_model: '{path}' has a UNet without SDXL's text_time embedding (unet/config.json); it is "
            "not an SDXL base model."
        )
    if config.get("in_channels", 4) != 4:
        raise UserError(
            f"base_model: '{path}' has a {config['in_channels']}-channel UNet input (inpainting or "
            "instruct-pix2pix), which is not supported yet; use the plain text-to-image model."
        )


# --- both -------------------------------------------------------------------------------------------------


def _assemble(
    unet: UNet2DConditionModel,
    vae: AutoencoderKL,
    text_encoder: torch.nn.Module,
    text_encoder_2: torch.nn.Module,
    folder: Path,
    scheduler_config: dict[str, Any],
    prediction_type: PredictionType,
    location: BaseModelLocation,
    zero_terminal_snr: bool,
) -> SDXLComponents:
    """SDXLComponents from loaded modules: the tokenizers of `folder` (the shipped CLIP one with each pad
    token where it has none), each checked against its text encoder, and a training noise scheduler.

    folder: the diffusers folder, or for a single file the config folder (the shipped one has no tokenizer).
    """
    widths = text_encoder.config.hidden_size + text_encoder_2.config.hidden_size
    if widths != unet.config.cross_attention_dim:
        raise UserError(
            f"base_model: the text encoders of '{location.path}' give {widths}-wide embeddings but its UNet "
            f"cross-attends to {unet.config.cross_attention_dim}; the model's parts do not belong together."
        )
    tokenizers = []
    for name, encoder in (("tokenizer", text_encoder), ("tokenizer_2", text_encoder_2)):
        tokenizer_dir = folder / name
        tokenizer = (
            load_folder_tokenizer(tokenizer_dir)
            if tokenizer_dir.is_dir()
            else clip_tokenizer(SDXL_PAD_TOKENS[name])
        )
        fit_tokenizer_to_text_encoder(tokenizer, encoder, tokenizer_dir, location.path)
        tokenizers.append(tokenizer)
    return SDXLComponents(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizers[0],
        tokenizer_2=tokenizers[1],
        noise_scheduler=make_noise_scheduler(scheduler_config, prediction_type),
        prediction_type=prediction_type,
        location=location,
        zero_terminal_snr=zero_terminal_snr,
    )
