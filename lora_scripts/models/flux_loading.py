"""Load a FLUX.1 base model (transformer, 16-channel VAE, CLIP-L and T5-XXL text encoders, tokenizers)
fully offline.

Two sources, as `locate_base_model` resolves them. A single file in Black Forest Labs' layout: the
transformer alone (flux1-dev.safetensors / .sft, fp8 e4m3fn variants), with the VAE and text encoders from
the `vae`, `clip_l` and `t5xxl` files ComfyUI users keep beside it, or ComfyUI's all-in-one checkpoint
holding all four. Single files carry no configs, so FLUX.1-dev's and -schnell's are shipped in
`models/assets/flux_{dev,schnell}/`, with the T5 tokenizer in `models/assets/t5_tokenizer/`; the weights are
converted with diffusers' own single-file functions (models/flux_weights.py). Or a diffusers folder / cached
hub snapshot in FLUX.1-dev's layout, whose parts `vae`, `clip_l` and `t5xxl` may replace.

Every module comes back on CPU in eval mode with requires_grad False, in fp32 unless `dtype` says otherwise
(fp8 files are upcast to it).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel, ModelMixin
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    PreTrainedTokenizerBase,
    T5Config,
    T5EncoderModel,
    T5TokenizerFast,
)

from lora_scripts.errors import UserError
from lora_scripts.models.detect import VERSION_NAMES, detect_model_version, flux_variant
from lora_scripts.models.flux_weights import (
    CLIP_MARKER,
    T5_MARKER,
    PartFile,
    assign_weights,
    clip_prefix,
    clip_weights,
    t5_prefix,
    t5_weights,
    transformer_weights,
    vae_prefix,
    vae_weights,
)
from lora_scripts.models.folder_tokenizer import (
    fit_tokenizer_to_text_encoder,
    load_folder_tokenizer,
    read_tokenizer,
)
from lora_scripts.models.locate import BaseModelLocation, locate_base_model
from lora_scripts.models.sd_loading import ASSETS_DIR, clip_tokenizer, read_model_index, require_configs

FluxVariant = Literal["dev", "schnell"]


@dataclass
class FluxComponents:
    """A loaded FLUX.1 model. All modules fp32 (unless loaded in a lower dtype on request), CPU, eval(),
    requires_grad False.

    `transformer`: diffusers' FluxTransformer2DModel (19 double + 38 single blocks at full size);
    `vae`: AutoencoderKL with 16 latent channels whose config has `scaling_factor` 0.3611 and
    `shift_factor` 0.1159 (latents = (mean - shift) * scale);
    `text_encoder`: CLIP ViT-L/14 text (its pooled output, 768, is the transformer's pooled projection input);
    `text_encoder_2`: T5 v1.1 XXL encoder (its last hidden state, 4096 wide, is the context);
    `tokenizer` (CLIP, 77) and `tokenizer_2` (T5, the 32100-token SentencePiece unigram vocabulary);
    `scheduler_config`: the FlowMatchEulerDiscreteScheduler config sampling uses (dev: shift 3.0 with dynamic
    shifting; schnell: shift 1.0);
    `variant`: "dev" when the transformer has a guidance embedding (guidance-distilled), else "schnell".
    """

    transformer: FluxTransformer2DModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    text_encoder_2: T5EncoderModel
    tokenizer: PreTrainedTokenizerBase
    tokenizer_2: PreTrainedTokenizerBase
    scheduler_config: dict[str, Any]
    variant: FluxVariant
    location: BaseModelLocation


T5_TOKENIZER_DIR = ASSETS_DIR / "t5_tokenizer"
CONFIG_PARTS = ("transformer", "vae", "text_encoder", "text_encoder_2")
# Where each part goes in ComfyUI, for the sentence that asks for it.
PART_FILES = {
    "vae": ("VAE", "ae.safetensors (ComfyUI's models/vae)"),
    "clip_l": ("CLIP-L text encoder", "clip_l.safetensors (ComfyUI's models/text_encoders)"),
    "t5xxl": (
        "T5-XXL text encoder",
        "t5xxl_fp16.safetensors or t5xxl_fp8_e4m3fn.safetensors (ComfyUI's models/text_encoders)",
    ),
}

logger = logging.getLogger(__name__)


def shipped_flux_config_dir(variant: FluxVariant) -> Path:
    """The diffusers-layout config folder shipped for FLUX.1-`variant` (configs only, no weights)."""
    return ASSETS_DIR / f"flux_{variant}"


def t5_tokenizer() -> PreTrainedTokenizerBase:
    """The shipped T5 v1.1 tokenizer (32100 SentencePiece unigram pieces with 100 <extra_id_N>): pad <pad>
    (0), eos </s> (1), unk <unk> (2), model_max_length 512."""
    return T5TokenizerFast.from_pretrained(T5_TOKENIZER_DIR)


def load_flux_components(
    base_model: str,
    *,
    vae: str | None = None,
    clip_l: str | None = None,
    t5xxl: str | None = None,
    config_dir: Path | None = None,
    dtype: torch.dtype | None = None,
) -> FluxComponents:
    """Load the FLUX.1 model `base_model` (a BFL-layout or ComfyUI all-in-one single file, a diffusers folder
    or a cached hub id) offline.

    vae, clip_l, t5xxl: single files for those parts (ae.safetensors, clip_l.safetensors,
        t5xxl_fp16.safetensors ...), required when `base_model` lacks the part; they win over its own.
    config_dir: for single files only, a diffusers-layout folder whose transformer/, vae/, text_encoder/,
        text_encoder_2/ (and optionally scheduler/, tokenizer/, tokenizer_2/) describe the architecture;
        default: the shipped FLUX.1-dev or -schnell configs, by the file's guidance embedding.
    dtype: of every module (default float32); fp8 weights are upcast to it.
    Raises UserError (one sentence naming the config key and file) for anything the user can fix.
    """
    dtype = dtype or torch.float32
    location = locate_base_model(base_model)
    overrides = {
        key: PartFile(Path(spec).expanduser(), key)
        for key, spec in (("vae", vae), ("clip_l", clip_l), ("t5xxl", t5xxl))
        if spec is not None
    }
    if location.kind == "single_file":
        components = _load_single_file(location, overrides, config_dir, dtype)
    else:
        components = _load_diffusers_folder(location, overrides, dtype)
    for module in (
        components.transformer,
        components.vae,
        components.text_encoder,
        components.text_encoder_2,
    ):
        module.requires_grad_(False)
        module.eval()
    logger.info("Loaded FLUX.1-%s from %s", components.variant, location.path)
    return components


# --- single files -----------------------------------------------------------------------------------------


def _load_single_file(
    location: BaseModelLocation, overrides: dict[str, PartFile], config_dir: Path | None, dtype: torch.dtype
) -> FluxComponents:
    path = location.path
    base = PartFile(path, "base_model")
    version = detect_model_version(base.shapes, path)
    if version != "flux1":
        raise UserError(f"base_model: '{path}' is an {VERSION_NAMES[version]} checkpoint, not a FLUX.1 one.")
    sources = {key: overrides.get(key) or _own_part(base, key) for key in PART_FILES}
    cfg_dir = Path(config_dir) if config_dir is not None else None
    if cfg_dir is not None:
        require_configs(cfg_dir, CONFIG_PARTS)
    transformer = _transformer_from_file(base, cfg_dir, dtype)
    variant: FluxVariant = "dev" if transformer.config.guidance_embeds else "schnell"
    cfg_dir = cfg_dir or shipped_flux_config_dir(variant)
    return _assemble(
        transformer,
        _vae_from_file(sources["vae"], cfg_dir, dtype),
        _clip_from_file(sources["clip_l"], cfg_dir, dtype),
        _t5_from_file(sources["t5xxl"], cfg_dir, dtype),
        cfg_dir,
        location,
    )


def missing_part_problems(path: Path, given: dict[str, object]) -> list[str]:
    """One sentence per part (vae, clip_l, t5xxl) the single file at `path` does not hold and `given` (the
    config's keys) does not name, read from the file's header alone: what `check` reports before training."""
    base = PartFile(Path(path), "base_model")
    problems: list[str] = []
    for key in PART_FILES:
        if given.get(key) is None:
            try:
                _own_part(base, key)
            except UserError as err:
                problems.extend(err.messages)
    return problems


def _own_part(base: PartFile, key: str) -> PartFile:
    """`base` itself when it holds the part (an all-in-one checkpoint), else the sentence asking for `key`."""
    finder = {"vae": vae_prefix, "clip_l": clip_prefix, "t5xxl": t5_prefix}[key]
    if finder(base) is not None:
        return _rekeyed(base, key)
    what, where = PART_FILES[key]
    raise UserError(
        f"{key}: '{base.path}' has no {what} (FLUX transformer files carry none); set {key}: to {where}."
    )


def _rekeyed(file: PartFile, key: str) -> PartFile:
    """The same file, read once, named by another config key in messages."""
    clone = object.__new__(PartFile)
    clone.__dict__.update(file.__dict__)
    clone.key = key
    return clone


def _refuse_other_kind(file: PartFile, key: str, marker: str) -> None:
    """A whole model, a LoRA, or a file without the part's weights given for `key`: one sentence."""
    what, where = PART_FILES[key]
    kind = file.kind()
    if kind is not None:
        raise UserError(f"{key}: '{file.path}' is {kind}, not a {what}; set {key}: to {where}.")
    raise UserError(f"{key}: '{file.path}' holds no {what} weights ('{marker}'); set {key}: to {where}.")


def _transformer_from_file(
    base: PartFile, cfg_dir: Path | None, dtype: torch.dtype
) -> FluxTransformer2DModel:
    has_guidance = flux_variant(base.shapes) == "dev"
    folder = cfg_dir or shipped_flux_config_dir("dev" if has_guidance else "schnell")
    config = dict(FluxTransformer2DModel.load_config(folder, subfolder="transformer", local_files_only=True))
    config["guidance_embeds"] = has_guidance  # dev or schnell is the file's, whatever config_dir says
    weights = transformer_weights(base, config, dtype)
    return assign_weights(
        lambda: FluxTransformer2DModel.from_config(config), weights, base, "FLUX transformer"
    )


def _vae_from_file(file: PartFile, cfg_dir: Path, dtype: torch.dtype) -> AutoencoderKL:
    prefix = vae_prefix(file)
    if prefix is None or file.kind() in ("a LoRA", "a Stable Diffusion checkpoint"):
        _refuse_other_kind(file, "vae", "decoder.conv_out.weight")
    config = dict(AutoencoderKL.load_config(cfg_dir, subfolder="vae", local_files_only=True))
    conv_in = file.shapes.get(f"{prefix}decoder.conv_in.weight")
    if conv_in is not None and len(conv_in.shape) == 4 and conv_in.shape[1] != config["latent_channels"]:
        raise UserError(
            f"vae: '{file.path}' is a {conv_in.shape[1]}-channel VAE where FLUX.1's has "
            f"{config['latent_channels']} latent channels; set vae: to {PART_FILES['vae'][1]}."
        )
    weights = vae_weights(file, prefix, config, dtype)
    return assign_weights(lambda: AutoencoderKL.from_config(config), weights, file, "VAE")


def _clip_from_file(file: PartFile, cfg_dir: Path, dtype: torch.dtype) -> CLIPTextModel:
    config = CLIPTextConfig.from_pretrained(cfg_dir, subfolder="text_encoder", local_files_only=True)
    prefix = _encoder_prefix(file, "clip_l", clip_prefix(file), CLIP_MARKER, config.hidden_size)
    with torch.device("meta"):
        probe = CLIPTextModel(config)
    weights = clip_weights(file, prefix, probe, dtype)
    return assign_weights(lambda: CLIPTextModel(config), weights, file, "CLIP-L text encoder")


def _t5_from_file(file: PartFile, cfg_dir: Path, dtype: torch.dtype) -> T5EncoderModel:
    config = T5Config.from_pretrained(cfg_dir, subfolder="text_encoder_2", local_files_only=True)
    prefix = _encoder_prefix(file, "t5xxl", t5_prefix(file), T5_MARKER, config.d_model)
    model = assign_weights(
        lambda: T5EncoderModel(config), t5_weights(file, prefix, dtype), file, "T5-XXL text encoder"
    )
    model.tie_weights()  # shared and encoder.embed_tokens: one parameter again
    return model


# How the width message names each text encoder file: (what the file holds, FLUX.1's encoder).
_ENCODER_NAMES = {"clip_l": ("CLIP text encoder", "CLIP-L"), "t5xxl": ("T5 encoder", "T5-XXL")}


def _encoder_prefix(file: PartFile, key: str, prefix: str | None, marker: str, width: int) -> str:
    """The prefix of a text encoder's weights in the file given for `key`; refuses a file of another kind
    (no `marker` weight under a known prefix, a LoRA, an SD checkpoint) or of another width than `width`."""
    if prefix is None or file.kind() in ("a LoRA", "a Stable Diffusion checkpoint"):
        _refuse_other_kind(file, key, marker)
    found = file.shapes[prefix + marker].shape[-1]
    if found != width:
        what, ours = _ENCODER_NAMES[key]
        raise UserError(
            f"{key}: '{file.path}' holds a {found}-wide {what} where FLUX.1's {ours} is {width} wide; "
            f"set {key}: to {PART_FILES[key][1]}."
        )
    return prefix


# --- diffusers folder / cached hub snapshot ---------------------------------------------------------------


def _load_diffusers_folder(
    location: BaseModelLocation, overrides: dict[str, PartFile], dtype: torch.dtype
) -> FluxComponents:
    path = location.path
    entry = read_model_index(path).get("transformer")
    if not (isinstance(entry, list) and entry and entry[-1] == "FluxTransformer2DModel"):
        raise UserError(
            f"base_model: '{path}' is not a FLUX.1 model (its model_index.json lists no "
            "FluxTransformer2DModel transformer)."
        )
    transformer = _folder_part(FluxTransformer2DModel, path, "transformer", dtype)
    parts = {
        "vae": (_vae_from_file, AutoencoderKL, "vae"),
        "clip_l": (_clip_from_file, CLIPTextModel, "text_encoder"),
        "t5xxl": (_t5_from_file, T5EncoderModel, "text_encoder_2"),
    }
    loaded = {
        key: from_file(overrides[key], path, dtype)
        if key in overrides
        else _folder_part(cls, path, sub, dtype)
        for key, (from_file, cls, sub) in parts.items()
    }
    return _assemble(transformer, loaded["vae"], loaded["clip_l"], loaded["t5xxl"], path, location)


def _folder_part(cls: Any, path: Path, subfolder: str, dtype: torch.dtype) -> torch.nn.Module:
    """`cls.from_pretrained(path, subfolder=...)` offline in `dtype`; UserError naming the folder."""
    folder = path / subfolder
    if not (folder / "config.json").is_file():
        raise UserError(
            f"base_model: '{path}' has no {subfolder}/config.json; it is not a complete FLUX.1 model."
        )
    try:
        # diffusers casts at load time (and warns about a later .to(dtype)); transformers is cast afterwards
        # (it renamed that argument across versions).
        dtype_kwargs = {"torch_dtype": dtype} if issubclass(cls, ModelMixin) else {}
        module = cls.from_pretrained(path, subfolder=subfolder, local_files_only=True, **dtype_kwargs)
    except (OSError, ValueError, RuntimeError) as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(
            f"base_model: could not load '{folder}' ({first_line}); the download may be incomplete or "
            "corrupt."
        ) from err
    return module.to(dtype=dtype)


# --- both -------------------------------------------------------------------------------------------------


def _assemble(
    transformer: FluxTransformer2DModel,
    vae: AutoencoderKL,
    text_encoder: CLIPTextModel,
    text_encoder_2: T5EncoderModel,
    folder: Path,
    location: BaseModelLocation,
) -> FluxComponents:
    """FluxComponents from loaded modules, with `folder`'s tokenizers and scheduler config (the shipped ones
    where it has none). folder: the diffusers folder, or a single file's config folder."""
    variant: FluxVariant = "dev" if transformer.config.guidance_embeds else "schnell"
    widths = (text_encoder.config.hidden_size, text_encoder_2.config.d_model)
    expected = (transformer.config.pooled_projection_dim, transformer.config.joint_attention_dim)
    if widths != expected:
        raise UserError(
            f"base_model: the text encoders of '{location.path}' give {widths[0]}- and {widths[1]}-wide "
            f"embeddings but its transformer reads {expected[0]} and {expected[1]}; the model's parts do not "
            "belong together."
        )
    tokenizer_dir, tokenizer_2_dir = folder / "tokenizer", folder / "tokenizer_2"
    tokenizer = (
        load_folder_tokenizer(tokenizer_dir) if tokenizer_dir.is_dir() else clip_tokenizer("<|endoftext|>")
    )
    fit_tokenizer_to_text_encoder(tokenizer, text_encoder, tokenizer_dir, location.path)
    tokenizer_2 = _folder_t5_tokenizer(tokenizer_2_dir) if tokenizer_2_dir.is_dir() else t5_tokenizer()
    rows = text_encoder_2.get_input_embeddings().num_embeddings
    if len(tokenizer_2) > rows:
        raise UserError(
            f"base_model: the T5 tokenizer in '{tokenizer_2_dir}' has {len(tokenizer_2)} tokens but the T5 "
            f"encoder has only {rows} token embeddings; put the tokenizer saved with it there."
        )
    scheduler_dir = folder if (folder / "scheduler" / "scheduler_config.json").is_file() else None
    scheduler_config = dict(
        FlowMatchEulerDiscreteScheduler.load_config(
            scheduler_dir or shipped_flux_config_dir(variant), subfolder="scheduler", local_files_only=True
        )
    )
    return FluxComponents(
        transformer=transformer,
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        scheduler_config=scheduler_config,
        variant=variant,
        location=location,
    )


def _folder_t5_tokenizer(tokenizer_dir: Path) -> PreTrainedTokenizerBase:
    if not any((tokenizer_dir / name).is_file() for name in ("tokenizer.json", "spiece.model")):
        raise UserError(
            f"base_model: '{tokenizer_dir}' holds neither tokenizer.json nor spiece.model; copy the "
            "model's T5 tokenizer files there, or remove the folder to use the standard T5 tokenizer."
        )
    return read_tokenizer(T5TokenizerFast, tokenizer_dir, "T5 tokenizer")
