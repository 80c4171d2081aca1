"""Load an SD 1.x / 2.x base model (UNet, VAE, text encoder, tokenizer, noise scheduler) fully offline.

Three sources, as resolved by `locate_base_model`: a single CompVis/LDM checkpoint file (what civitai and
WebUI users have), a diffusers folder, or a hub snapshot already in the local cache. Single files carry no
configs, so we ship the SD 1.5 / 2.1-base configs and the CLIP tokenizer in `models/assets/` and convert
the weights with diffusers' own LDM -> diffusers key mapping; nothing is ever fetched from the hub.

Every module comes back in fp32 on CPU, in eval mode, with requires_grad False: the training code decides
what to move, cast and unfreeze. The building blocks (config checks, the LDM UNet/VAE conversion, strict
tensor assignment, folder components) are public because `sdxl_loading` loads SDXL with them too.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import init_empty_weights
from diffusers import AutoencoderKL, DDPMScheduler, ModelMixin, UNet2DConditionModel
from diffusers.loaders.single_file_utils import (
    convert_ldm_clip_checkpoint,
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
    convert_open_clip_checkpoint,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, PreTrainedTokenizerBase

from lora_scripts.errors import UserError
from lora_scripts.models.detect import (
    LDM_UNET_PREFIX,
    OPEN_CLIP_PREFIX,
    ModelVersion,
    PredictionType,
    SDVersion,
    detect_sd_version,
    has_v_pred_key,
    has_ztsnr_key,
    is_v_prediction_unet,
    read_checkpoint,
    unet_context_dim,
)
from lora_scripts.models.folder_tokenizer import fit_tokenizer_to_text_encoder, load_folder_tokenizer
from lora_scripts.models.locate import BaseModelLocation, locate_base_model

ASSETS_DIR = Path(__file__).parent / "assets"
CLIP_TOKENIZER_DIR = ASSETS_DIR / "clip_tokenizer"
# SD 2.x's tokenizer pads with "!" (id 0) instead of <|endoftext|>; its text encoder was trained that way.
PAD_TOKENS: dict[SDVersion, str] = {"sd_v1": "<|endoftext|>", "sd_v2": "!"}
# We ship stable-diffusion-2-1-base's UNet config; the 768-v model (stable-diffusion-2-1) differs only here.
SD2_V_UNET_OVERRIDES: dict[str, Any] = {"sample_size": 96, "upcast_attention": True}

logger = logging.getLogger(__name__)


@dataclass
class SDComponents:
    """A loaded base model. All modules fp32, CPU, eval(), requires_grad False.

    `text_encoder` is a transformers CLIPTextModel; under transformers >= 5.6 it has no `.text_model`
    wrapper, so its modules are named `embeddings.*`, `encoder.layers.N.self_attn.{q,k,v,out}_proj`, ...
    `tokenizer` is the model's own (CLIPTokenizer, or CLIPTokenizerFast under transformers 4 when the folder
    has only tokenizer.json); its ids all fit the text encoder's embedding table and its model_max_length
    its positions.
    `noise_scheduler` is a DDPMScheduler for training (add_noise / get_velocity) with `prediction_type` set.
    `zero_terminal_snr`: whether the model marks itself as trained with zero terminal SNR
    (`marks_zero_terminal_snr`); training's `zero_terminal_snr` key defaults to it and sets the schedule.
    """

    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    tokenizer: PreTrainedTokenizerBase
    noise_scheduler: DDPMScheduler
    version: SDVersion
    prediction_type: PredictionType
    location: BaseModelLocation
    zero_terminal_snr: bool = False


# Versions whose shipped configs are in a folder of another name: FLUX.1's are dev's (schnell's modules are
# the same but for dev's guidance embedder, so dev's name and size every layer a FLUX.1 LoRA can have).
_CONFIG_FOLDERS: dict[str, str] = {"flux1": "flux_dev"}


def shipped_config_dir(version: ModelVersion) -> Path:
    """The diffusers-layout config folder we ship for `version` (configs only, no weights)."""
    return ASSETS_DIR / _CONFIG_FOLDERS.get(version, version)


def load_clip_tokenizer(version: SDVersion) -> CLIPTokenizer:
    """The CLIP BPE tokenizer shared by SD 1.x and 2.x, with the version's pad token; model_max_length 77."""
    return clip_tokenizer(PAD_TOKENS[version])


def clip_tokenizer(pad_token: str) -> CLIPTokenizer:
    """The shipped CLIP BPE tokenizer (OpenAI's and OpenCLIP's are the same) padding with `pad_token`."""
    return CLIPTokenizer.from_pretrained(CLIP_TOKENIZER_DIR, pad_token=pad_token)


def scheduler_config_of(folder: Path, version: ModelVersion) -> dict[str, Any]:
    """The noise schedule's config from `folder/scheduler`, else the shipped one of `version`."""
    has_scheduler = (folder / "scheduler" / "scheduler_config.json").is_file()
    return DDPMScheduler.load_config(
        folder if has_scheduler else shipped_config_dir(version), subfolder="scheduler", local_files_only=True
    )


def make_noise_scheduler(scheduler_config: dict[str, Any], prediction_type: PredictionType) -> DDPMScheduler:
    """A training DDPMScheduler with the model's beta schedule (any scheduler config works as the source)."""
    return DDPMScheduler.from_config(scheduler_config, prediction_type=prediction_type)


def load_sd_components(
    base_model: str,
    *,
    config_dir: Path | None = None,
    v_parameterization: bool | None = None,
) -> SDComponents:
    """Load `base_model` (a .safetensors/.ckpt file, a diffusers folder or a cached hub id) offline.

    config_dir: for single files only, a diffusers-layout folder whose unet/, vae/, text_encoder/ (and
        optionally scheduler/) configs describe the architecture; default: the shipped SD 1.x/2.x configs.
    v_parameterization: force v-prediction (True) or epsilon (False); None infers it from the model.
    Raises UserError (one sentence naming the file) for anything the user can fix.
    """
    location = locate_base_model(base_model)
    if location.kind == "single_file":
        components = _load_single_file(location, config_dir, v_parameterization)
    else:
        components = _load_diffusers_folder(location, v_parameterization)
    for module in (components.unet, components.vae, components.text_encoder):
        module.requires_grad_(False)
        module.eval()
    logger.info(
        "Loaded %s base model (%s) from %s", components.version, components.prediction_type, location.path
    )
    return components


# --- single CompVis/LDM file ------------------------------------------------------------------------------


def _load_single_file(
    location: BaseModelLocation, config_dir: Path | None, v_parameterization: bool | None
) -> SDComponents:
    path = location.path
    state_dict = read_checkpoint(path)
    version = detect_sd_version(state_dict, path)
    cfg_dir = Path(config_dir) if config_dir is not None else shipped_config_dir(version)
    require_configs(cfg_dir, ("unet", "vae", "text_encoder"))

    # None: SD 2.x without a marker, decided by the UNet
    prediction_type = marked_prediction_type(state_dict, v_parameterization)
    scheduler_config = scheduler_config_of(cfg_dir, version)
    zero_snr = marks_zero_terminal_snr(state_dict, scheduler_config)
    if prediction_type is None and version == "sd_v1":
        prediction_type = "epsilon"
    unet, prediction_type = _unet_from_ldm(
        state_dict, cfg_dir, path, prediction_type, adapt_sd2_v=config_dir is None and version == "sd_v2"
    )
    vae = vae_from_ldm(state_dict, cfg_dir, path)
    text_encoder = _text_encoder_from_ldm(state_dict, cfg_dir, version, path)

    return _assemble(
        unet, vae, text_encoder, cfg_dir, version, scheduler_config, prediction_type, location, zero_snr
    )


def require_configs(cfg_dir: Path, subfolders: tuple[str, ...]) -> None:
    """A single file's config folder (base_model_config) has each `subfolder/config.json`; else UserError."""
    for sub in subfolders:
        if not (cfg_dir / sub / "config.json").is_file():
            raise UserError(
                f"base_model_config: '{cfg_dir}' has no {sub}/config.json; "
                "give a folder of diffusers-layout configs."
            )


def marked_prediction_type(
    state_dict: dict[str, torch.Tensor], v_parameterization: bool | None
) -> PredictionType | None:
    """The explicit setting, else v-prediction when the file marks itself so; None when neither says."""
    if v_parameterization is not None:
        return "v_prediction" if v_parameterization else "epsilon"
    return "v_prediction" if has_v_pred_key(state_dict) else None


def marks_zero_terminal_snr(state_dict: dict[str, Any] | None, scheduler_config: dict[str, Any]) -> bool:
    """Whether a model says it was trained with zero terminal SNR, as ComfyUI reads it: a single file's
    `ztsnr` key (`state_dict`; None for a diffusers folder), or `rescale_betas_zero_snr: true` in the
    scheduler config (a folder's own, or a single file's base_model_config)."""
    marked = state_dict is not None and has_ztsnr_key(state_dict)
    return marked or scheduler_config.get("rescale_betas_zero_snr") is True


def _unet_from_ldm(
    state_dict: dict[str, torch.Tensor],
    cfg_dir: Path,
    path: Path,
    prediction_type: PredictionType | None,
    *,
    adapt_sd2_v: bool,
) -> tuple[UNet2DConditionModel, PredictionType]:
    """The UNet, and the prediction type (WebUI's test inference decides when `prediction_type` is None).

    adapt_sd2_v: the shipped SD 2 config is 2-1-base's; a v-model gets 2-1 (768-v)'s settings instead.
    The UNet's tensors are removed from `state_dict` to free the half-precision copies early.
    """
    unet_config = dict(UNet2DConditionModel.load_config(cfg_dir, subfolder="unet", local_files_only=True))
    weights = ldm_unet_weights(state_dict, unet_config, cfg_dir, path)

    def build() -> UNet2DConditionModel:
        if adapt_sd2_v and prediction_type == "v_prediction":
            return UNet2DConditionModel.from_config({**unet_config, **SD2_V_UNET_OVERRIDES})
        return UNet2DConditionModel.from_config(unet_config)

    unet = build_and_load(build, weights, path, "UNet")
    if prediction_type is None:
        is_v = is_v_prediction_unet(unet, context_dim=unet_config["cross_attention_dim"])
        prediction_type = "v_prediction" if is_v else "epsilon"
        logger.info("%s: SD 2.x prediction type found by test inference: %s", path.name, prediction_type)
        if is_v and adapt_sd2_v:  # rebuild with the 768-v config around the same tensors (no copy)
            unet = build_and_load(build, weights, path, "UNet")
    return unet, prediction_type


def ldm_unet_weights(
    state_dict: dict[str, torch.Tensor],
    unet_config: dict[str, Any],
    cfg_dir: Path,
    path: Path,
    *,
    family: str = "SD 1.x/2.x",
) -> dict[str, torch.Tensor]:
    """The `model.diffusion_model.*` UNet (LDM and sgm layout alike) as diffusers fp32 tensors.

    Refuses a cross-attention width other than the config's (a config for another model); the UNet's
    tensors are removed from `state_dict` to free the half-precision copies early.
    """
    context_dim = unet_context_dim(state_dict)
    if context_dim is not None and context_dim != unet_config["cross_attention_dim"]:
        raise UserError(
            f"base_model: '{path}' has a UNet with {context_dim}-wide cross-attention, but the config in "
            f"'{cfg_dir}' expects {unet_config['cross_attention_dim']}; it is not a standard {family} "
            "model, so convert it to a diffusers folder and load that instead."
        )
    weights = _as_fp32(convert_ldm_unet_checkpoint(state_dict, unet_config))
    _drop_prefix(state_dict, LDM_UNET_PREFIX)
    return weights


def vae_from_ldm(state_dict: dict[str, torch.Tensor], cfg_dir: Path, path: Path) -> AutoencoderKL:
    """The `first_stage_model.*` VAE (LDM and sgm layout alike) built from `cfg_dir/vae`, in fp32."""
    vae_config = AutoencoderKL.load_config(cfg_dir, subfolder="vae", local_files_only=True)
    vae_weights = _as_fp32(convert_ldm_vae_checkpoint(state_dict, vae_config))
    return build_and_load(lambda: AutoencoderKL.from_config(vae_config), vae_weights, path, "VAE")


def _text_encoder_from_ldm(
    state_dict: dict[str, torch.Tensor], cfg_dir: Path, version: SDVersion, path: Path
) -> CLIPTextModel:
    config = CLIPTextConfig.from_pretrained(cfg_dir, subfolder="text_encoder", local_files_only=True)
    with init_empty_weights():
        model = CLIPTextModel(config)
    if version == "sd_v1":
        converted = convert_ldm_clip_checkpoint(state_dict)
    else:
        converted = convert_open_clip_checkpoint(model, state_dict, prefix=OPEN_CLIP_PREFIX)
    load_text_encoder_weights(model, converted, path, "text encoder")
    return model


def load_text_encoder_weights(
    model: torch.nn.Module, converted: dict[str, torch.Tensor], path: Path, component: str
) -> None:
    """Assign diffusers' converted CLIP weights (`text_model.*`, `text_projection.weight`) strictly.

    transformers >= 5.6 flattened CLIPTextModel (no `.text_model`) while CLIPTextModelWithProjection and
    older versions still wrap it, so the `text_model.` prefix is fitted to the model's own names. Dropped:
    `position_ids` (a non-persistent buffer in recent transformers) and blocks past the config's depth (SD
    2.x stores all 24 OpenCLIP blocks but uses the 23rd's output, the "penultimate layer").
    """
    wrapped = any(key.startswith("text_model.") for key in model.state_dict())
    num_layers = model.config.num_hidden_layers
    weights = {}
    for key, value in converted.items():
        bare = key.removeprefix("text_model.")
        parts = bare.split(".")
        if bare.endswith("position_ids") or (
            bare.startswith("encoder.layers.") and int(parts[2]) >= num_layers
        ):
            continue
        weights[f"text_model.{bare}" if wrapped and not bare.startswith("text_projection.") else bare] = value
    load_into(model, _as_fp32(weights), path, component)


def build_and_load(
    build: Any, weights: dict[str, torch.Tensor], path: Path, component: str
) -> torch.nn.Module:
    """Instantiate `build()` without allocating (meta parameters), then assign `weights` strictly."""
    with init_empty_weights():
        module = build()
    load_into(module, weights, path, component)
    return module


def load_into(
    module: torch.nn.Module,
    weights: dict[str, torch.Tensor],
    path: Path,
    component: str,
    *,
    key: str = "base_model",
) -> None:
    """Strict, shape-checked load that assigns the given tensors (no copy); mismatches become a UserError
    naming the config `key` that gave the file at `path`, and the first offending tensor."""
    expected = module.state_dict()
    missing = [k for k in expected if k not in weights]
    unexpected = [k for k in weights if k not in expected]
    wrong_shape = [k for k in expected if k in weights and weights[k].shape != expected[k].shape]
    if missing or unexpected or wrong_shape:
        details = []
        if missing:
            details.append(f"{len(missing)} missing, e.g. '{missing[0]}'")
        if unexpected:
            details.append(f"{len(unexpected)} unexpected, e.g. '{unexpected[0]}'")
        if wrong_shape:
            key = wrong_shape[0]
            details.append(
                f"'{key}' is {tuple(weights[key].shape)} where {tuple(expected[key].shape)} is expected"
            )
        raise UserError(
            f"{key}: the {component} weights in '{path}' do not match the expected architecture "
            f"({'; '.join(details)}); the file is damaged or a variant that is not supported."
        )
    module.load_state_dict(weights, strict=True, assign=True)


def _as_fp32(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {key: value.to(torch.float32).contiguous() for key, value in weights.items()}


def _drop_prefix(state_dict: dict[str, torch.Tensor], prefix: str) -> None:
    for key in [k for k in state_dict if k.startswith(prefix)]:
        del state_dict[key]


# --- diffusers folder / cached hub snapshot ---------------------------------------------------------------


def _load_diffusers_folder(location: BaseModelLocation, v_parameterization: bool | None) -> SDComponents:
    path = location.path
    index = read_model_index(path)
    if "text_encoder_2" in index or "transformer" in index:
        raise UserError(
            f"base_model: '{path}' is not an SD 1.x/2.x model (its model_index.json lists text_encoder_2 or "
            "a transformer); load it through models/registry.py load_family, which picks its family."
        )
    unet_config = folder_config(UNet2DConditionModel, path, "unet")
    version = version_from_unet_config(unet_config, path)

    unet = folder_component(UNet2DConditionModel, path, "unet")
    vae = folder_component(AutoencoderKL, path, "vae")
    text_encoder = folder_component(CLIPTextModel, path, "text_encoder")
    scheduler_config = scheduler_config_of(path, version)
    prediction_type = folder_prediction_type(scheduler_config, v_parameterization)
    zero_snr = marks_zero_terminal_snr(None, scheduler_config)
    return _assemble(
        unet, vae, text_encoder, path, version, scheduler_config, prediction_type, location, zero_snr
    )


def read_model_index(path: Path) -> dict[str, Any]:
    """A diffusers folder's model_index.json; UserError naming the file when it is not valid JSON."""
    try:
        return json.loads((path / "model_index.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise UserError(f"base_model: '{path / 'model_index.json'}' is not valid JSON ({err}).") from err


def folder_prediction_type(
    scheduler_config: dict[str, Any], v_parameterization: bool | None
) -> PredictionType:
    """The explicit setting, else what the folder's scheduler config says (epsilon unless v_prediction)."""
    if v_parameterization is not None:
        return "v_prediction" if v_parameterization else "epsilon"
    return "v_prediction" if scheduler_config.get("prediction_type") == "v_prediction" else "epsilon"


def _assemble(
    unet: UNet2DConditionModel,
    vae: AutoencoderKL,
    text_encoder: torch.nn.Module,
    folder: Path,
    version: SDVersion,
    scheduler_config: dict[str, Any],
    prediction_type: PredictionType,
    location: BaseModelLocation,
    zero_terminal_snr: bool,
) -> SDComponents:
    """SDComponents from loaded modules: the tokenizer of `folder` (the shipped CLIP one when it has no
    tokenizer folder), checked against the text encoder, and a training noise scheduler for `prediction_type`.

    folder: the diffusers folder, or for a single file the config folder (the shipped one has no tokenizer).
    """
    tokenizer_dir = folder / "tokenizer"
    tokenizer = (
        load_folder_tokenizer(tokenizer_dir) if tokenizer_dir.is_dir() else load_clip_tokenizer(version)
    )
    fit_tokenizer_to_text_encoder(tokenizer, text_encoder, tokenizer_dir, location.path)
    return SDComponents(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        noise_scheduler=make_noise_scheduler(scheduler_config, prediction_type),
        version=version,
        prediction_type=prediction_type,
        location=location,
        zero_terminal_snr=zero_terminal_snr,
    )


def version_from_unet_config(config: dict[str, Any], path: Path) -> SDVersion:
    """SD 1.x vs 2.x from the UNet config: cross-attention width, else SD 2's linear projections."""
    if config.get("addition_embed_type") == "text_time" or config.get("cross_attention_dim") == 2048:
        raise UserError(
            f"base_model: '{path}' is an SDXL model, not an SD 1.x/2.x one; load it as SDXL "
            "(models/registry.py load_family does)."
        )
    if config.get("in_channels", 4) != 4:
        raise UserError(
            f"base_model: '{path}' has a {config['in_channels']}-channel UNet input (inpainting or "
            "instruct-pix2pix), which is not supported yet; use the plain text-to-image model."
        )
    width = config.get("cross_attention_dim")
    if width in (768, 1024):
        return "sd_v1" if width == 768 else "sd_v2"
    # Non-standard sizes (tiny test models): SD 2.x is the one with linear proj_in/proj_out.
    return "sd_v2" if config.get("use_linear_projection") else "sd_v1"


def folder_config(cls: Any, path: Path, subfolder: str) -> dict[str, Any]:
    if not (path / subfolder / "config.json").is_file():
        raise UserError(
            f"base_model: '{path}' has no {subfolder}/config.json; it is not a complete SD model."
        )
    try:
        return dict(cls.load_config(path, subfolder=subfolder, local_files_only=True))
    except (OSError, ValueError) as err:
        raise UserError(
            f"base_model: '{path / subfolder / 'config.json'}' could not be read ({err})."
        ) from err


def folder_component(cls: Any, path: Path, subfolder: str) -> torch.nn.Module:
    """`cls.from_pretrained(path, subfolder=...)` offline, in fp32; fp16-only folders use the fp16 variant."""
    folder = path / subfolder
    if not folder.is_dir():
        raise UserError(f"base_model: '{path}' has no '{subfolder}' folder; it is not a complete SD model.")
    weight_files = [f for f in folder.iterdir() if f.suffix in (".safetensors", ".bin")]
    variant = "fp16" if weight_files and all(".fp16." in f.name for f in weight_files) else None
    # diffusers casts at load time (and warns about a later .to(dtype)); transformers renamed that argument
    # across versions (torch_dtype -> dtype), so for it we cast afterwards, which it does not mind.
    dtype_kwargs = {"torch_dtype": torch.float32} if issubclass(cls, ModelMixin) else {}
    try:
        module = cls.from_pretrained(
            path, subfolder=subfolder, variant=variant, local_files_only=True, **dtype_kwargs
        )
    except (OSError, ValueError, RuntimeError) as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(
            f"base_model: could not load '{folder}' ({first_line}); the download may be incomplete or "
            "corrupt."
        ) from err
    return module if dtype_kwargs else module.to(dtype=torch.float32)
