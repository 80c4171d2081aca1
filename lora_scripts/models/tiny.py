"""Tiny, deterministic, SD-, SDXL- and FLUX.1-shaped models for the demo and the tests (a few M parameters,
< 1 s).

They have every structural feature the trainer touches in a real model: CrossAttn down/up blocks whose
attention layers are named `to_q/to_k/to_v/to_out.0` inside `transformer_blocks`, a VAE that downsamples 8x
into 4 latent channels with the real scaling factor, and CLIP text encoders with the full 49408-token
vocabulary and 77 positions, so the real CLIP tokenizer works with them. Only the widths and depths are small.
The FLUX.1 one has FLUX's structure likewise: double and single transformer blocks, a 16-channel VAE with
FLUX's scaling and shift, CLIP text plus a T5 encoder with T5's full 32128-token vocabulary.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxTransformer2DModel,
    PNDMScheduler,
    UNet2DConditionModel,
)
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    PreTrainedTokenizerBase,
    T5Config,
    T5EncoderModel,
)

from lora_scripts.models.detect import ModelVersion, PredictionType, SDVersion
from lora_scripts.models.flux_loading import (
    T5_TOKENIZER_DIR,
    FluxVariant,
    shipped_flux_config_dir,
    t5_tokenizer,
)
from lora_scripts.models.sd_loading import (
    CLIP_TOKENIZER_DIR,
    PAD_TOKENS,
    clip_tokenizer,
    load_clip_tokenizer,
    shipped_config_dir,
)
from lora_scripts.models.sdxl_loading import SDXL_PAD_TOKENS

TINY_CONTEXT_DIM = 32  # text encoder width == UNet cross-attention width, as in SD (768 / 1024)
# SDXL: the UNet cross-attends to both encoders' penultimate states side by side (768 + 1280 = 2048), and
# its text_time embedding reads te2's pooled projection plus 6 size/crop numbers of 256 sinusoids each.
TINY_SDXL_TE1_DIM, TINY_SDXL_TE2_DIM, TINY_SDXL_POOLED_DIM, TINY_SDXL_TIME_DIM = 32, 48, 40, 8
# FLUX.1: the transformer reads CLIP's pooled output (768 at full size) and T5's hidden states (4096); widths
# differ so that a swapped encoder cannot go unnoticed.
TINY_FLUX_CLIP_DIM, TINY_FLUX_T5_DIM = 32, 48


@dataclass
class TinySD:
    """The in-memory tiny model: fp32 CPU modules in train mode (as freshly constructed), plus its parts."""

    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    scheduler: PNDMScheduler
    version: SDVersion


def build_tiny_sd_components(
    seed: int = 0, *, version: SDVersion = "sd_v1", prediction_type: PredictionType = "epsilon"
) -> TinySD:
    """Build the tiny model in memory with weights fixed by `seed` (the caller's RNG state is left untouched).

    version="sd_v2" mimics SD 2.x's differences instead: linear proj_in/proj_out, per-block head counts,
    GELU text encoder and "!" padding. Latents are (B, 4, H/8, W/8); the UNet's sample_size is 8 (64 px).
    """
    is_v2 = version == "sd_v2"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            sample_size=8,
            in_channels=4,
            out_channels=4,
            block_out_channels=(32, 64),
            layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=TINY_CONTEXT_DIM,
            # (diffusers' misnamed head *count*) SD 1.x: 8 heads everywhere; SD 2.x: a count per block that
            # keeps the head width constant, as its [5, 10, 20, 20] does (64-wide heads there, 16 here).
            attention_head_dim=(2, 4) if is_v2 else 8,
            use_linear_projection=is_v2,
            norm_num_groups=32,
        )
        vae = _tiny_vae(scaling_factor=0.18215)
        text_encoder = CLIPTextModel(
            _tiny_clip_config(TINY_CONTEXT_DIM, 2, "gelu" if is_v2 else "quick_gelu", TINY_CONTEXT_DIM)
        )
    scheduler_config = PNDMScheduler.load_config(shipped_config_dir(version), subfolder="scheduler")
    scheduler = PNDMScheduler.from_config(scheduler_config, prediction_type=prediction_type)
    return TinySD(unet, vae, text_encoder, load_clip_tokenizer(version), scheduler, version)


def build_tiny_sd(
    out_dir: Path, *, seed: int = 0, version: SDVersion = "sd_v1", prediction_type: PredictionType = "epsilon"
) -> Path:
    """Write the tiny model as a diffusers folder (loadable by StableDiffusionPipeline) and return it.

    The same seed gives the same bytes on every run (same torch/diffusers/transformers versions).
    """
    out_dir = Path(out_dir)
    tiny = build_tiny_sd_components(seed, version=version, prediction_type=prediction_type)
    out_dir.mkdir(parents=True, exist_ok=True)
    tiny.unet.save_pretrained(out_dir / "unet")
    tiny.vae.save_pretrained(out_dir / "vae")
    tiny.text_encoder.save_pretrained(out_dir / "text_encoder")
    tiny.scheduler.save_pretrained(out_dir / "scheduler")
    _write_clip_tokenizer(out_dir / "tokenizer", PAD_TOKENS[version])
    _copy_model_index(version, out_dir)
    return out_dir


@dataclass
class TinySDXL:
    """The in-memory tiny SDXL base model: fp32 CPU modules in train mode (as freshly constructed)."""

    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    text_encoder_2: CLIPTextModelWithProjection
    tokenizer: CLIPTokenizer
    tokenizer_2: CLIPTokenizer
    scheduler: EulerDiscreteScheduler


def build_tiny_sdxl_components(seed: int = 0, *, prediction_type: PredictionType = "epsilon") -> TinySDXL:
    """Build the tiny SDXL model in memory with weights fixed by `seed` (the caller's RNG is left untouched).

    SDXL's structure at small widths: no attention in the first level, several transformer layers per
    attention block (1 and 2 here; SDXL's 1, 2, 10), linear proj_in/proj_out, a text_time add-embedding, a
    CLIP-L-like quick_gelu te1 and a bigG-like gelu te2 with a text projection (different widths so a swap
    cannot go unnoticed). Latents are (B, 4, H/8, W/8); the UNet's sample_size is 8 (64 px).
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            sample_size=8,
            in_channels=4,
            out_channels=4,
            block_out_channels=(32, 64),
            layers_per_block=2,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 2),
            attention_head_dim=(2, 4),  # head counts, 16-wide heads (SDXL: 5, 10, 20 of 64)
            cross_attention_dim=TINY_SDXL_TE1_DIM + TINY_SDXL_TE2_DIM,
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=TINY_SDXL_TIME_DIM,
            projection_class_embeddings_input_dim=TINY_SDXL_POOLED_DIM + 6 * TINY_SDXL_TIME_DIM,
            norm_num_groups=32,
        )
        vae = _tiny_vae(scaling_factor=0.13025)
        text_encoder = CLIPTextModel(_tiny_clip_config(TINY_SDXL_TE1_DIM, 2, "quick_gelu", TINY_SDXL_TE1_DIM))
        text_encoder_2 = CLIPTextModelWithProjection(
            _tiny_clip_config(TINY_SDXL_TE2_DIM, 3, "gelu", TINY_SDXL_POOLED_DIM)
        )
    scheduler_config = EulerDiscreteScheduler.load_config(shipped_config_dir("sdxl"), subfolder="scheduler")
    scheduler = EulerDiscreteScheduler.from_config(scheduler_config, prediction_type=prediction_type)
    tokenizer, tokenizer_2 = (clip_tokenizer(SDXL_PAD_TOKENS[name]) for name in ("tokenizer", "tokenizer_2"))
    return TinySDXL(unet, vae, text_encoder, text_encoder_2, tokenizer, tokenizer_2, scheduler)


def build_tiny_sdxl(out_dir: Path, *, seed: int = 0, prediction_type: PredictionType = "epsilon") -> Path:
    """Write the tiny SDXL model as a diffusers folder (loadable by StableDiffusionXLPipeline); return it.

    The same seed gives the same bytes on every run (same torch/diffusers/transformers versions).
    """
    out_dir = Path(out_dir)
    tiny = build_tiny_sdxl_components(seed, prediction_type=prediction_type)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in ("unet", "vae", "text_encoder", "text_encoder_2", "scheduler"):
        getattr(tiny, name).save_pretrained(out_dir / name)
    for name, pad_token in SDXL_PAD_TOKENS.items():
        _write_clip_tokenizer(out_dir / name, pad_token)
    _copy_model_index("sdxl", out_dir)
    return out_dir


@dataclass
class TinyFlux:
    """The in-memory tiny FLUX.1 model: fp32 CPU modules in train mode (as freshly constructed)."""

    transformer: FluxTransformer2DModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    text_encoder_2: T5EncoderModel
    tokenizer: CLIPTokenizer
    tokenizer_2: PreTrainedTokenizerBase
    scheduler: FlowMatchEulerDiscreteScheduler
    variant: FluxVariant


def build_tiny_flux_components(seed: int = 0, *, variant: FluxVariant = "dev") -> TinyFlux:
    """Build the tiny FLUX.1 model in memory with weights fixed by `seed` (the caller's RNG is untouched).

    FLUX.1's structure at small widths: 2 double-stream + 2 single-stream blocks of 2 heads 16 wide (FLUX: 19
    + 38 blocks, 24 heads of 128), rotary axes 4+6+6 = 16 (FLUX: 16+56+56 = 128), 64 input channels (16
    latent channels packed 2x2, as FLUX), a guidance embedding for "dev" and none for "schnell". Latents
    are (B, 16, H/8, W/8); the scheduler is the shipped FLUX.1 variant's.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = FluxTransformer2DModel(
            patch_size=1,
            in_channels=64,
            num_layers=2,
            num_single_layers=2,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=TINY_FLUX_T5_DIM,
            pooled_projection_dim=TINY_FLUX_CLIP_DIM,
            guidance_embeds=variant == "dev",
            axes_dims_rope=(4, 6, 6),
        )
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(8, 16, 32, 32),
            layers_per_block=1,
            latent_channels=16,
            norm_num_groups=8,
            sample_size=64,
            scaling_factor=0.3611,
            shift_factor=0.1159,
            use_quant_conv=False,
            use_post_quant_conv=False,
        )
        text_encoder = CLIPTextModel(
            _tiny_clip_config(TINY_FLUX_CLIP_DIM, 2, "quick_gelu", TINY_FLUX_CLIP_DIM)
        )
        text_encoder_2 = T5EncoderModel(
            T5Config(
                vocab_size=32128,
                d_model=TINY_FLUX_T5_DIM,
                d_ff=64,
                d_kv=16,
                num_heads=3,
                num_layers=2,
                feed_forward_proj="gated-gelu",
                dense_act_fn="gelu_new",
                relative_attention_num_buckets=32,
                relative_attention_max_distance=128,
                layer_norm_epsilon=1e-6,
                tie_word_embeddings=False,
                is_encoder_decoder=False,
                pad_token_id=0,
                eos_token_id=1,
                decoder_start_token_id=0,
            )
        )
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(
        FlowMatchEulerDiscreteScheduler.load_config(shipped_flux_config_dir(variant), subfolder="scheduler")
    )
    return TinyFlux(
        transformer,
        vae,
        text_encoder,
        text_encoder_2,
        clip_tokenizer("<|endoftext|>"),
        t5_tokenizer(),
        scheduler,
        variant,
    )


def build_tiny_flux(out_dir: Path, *, seed: int = 0, variant: FluxVariant = "dev") -> Path:
    """Write the tiny FLUX.1 model as a diffusers folder (FLUX.1-dev's layout, loadable by FluxPipeline) and
    return it. The same seed gives the same bytes on every run (same torch/diffusers/transformers versions).
    """
    out_dir = Path(out_dir)
    tiny = build_tiny_flux_components(seed, variant=variant)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in ("transformer", "vae", "text_encoder", "text_encoder_2", "scheduler"):
        getattr(tiny, name).save_pretrained(out_dir / name)
    _write_clip_tokenizer(out_dir / "tokenizer", "<|endoftext|>")
    shutil.copytree(T5_TOKENIZER_DIR, out_dir / "tokenizer_2", dirs_exist_ok=True)
    model_index = (shipped_flux_config_dir(variant) / "model_index.json").read_text(encoding="utf-8")
    (out_dir / "model_index.json").write_text(model_index, encoding="utf-8")
    return out_dir


def _tiny_vae(*, scaling_factor: float) -> AutoencoderKL:
    """SD's VAE layout (4 levels, 8x down, 4 latent channels) at widths 8-32; force_upcast (the default)
    as SDXL's config sets it."""
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 32, 32),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=64,
        scaling_factor=scaling_factor,
    )


def _tiny_clip_config(width: int, layers: int, hidden_act: str, projection_dim: int) -> CLIPTextConfig:
    return CLIPTextConfig(
        hidden_size=width,
        intermediate_size=2 * width,
        num_hidden_layers=layers,
        num_attention_heads=4,
        max_position_embeddings=77,
        vocab_size=49408,
        hidden_act=hidden_act,
        projection_dim=projection_dim,
        # Same special ids as the SD configs (eos 2 selects CLIP's argmax pooling, like SD).
        bos_token_id=0,
        eos_token_id=2,
        pad_token_id=1,
    )


def _write_clip_tokenizer(tokenizer_dir: Path, pad_token: str) -> None:
    """Copy the shipped tokenizer files verbatim (save_pretrained would rewrite them in a version-dependent
    format), with `pad_token` set in its two JSON files when it is not the shipped one."""
    shutil.copytree(CLIP_TOKENIZER_DIR, tokenizer_dir, dirs_exist_ok=True)
    if pad_token != "<|endoftext|>":
        for name in ("tokenizer_config.json", "special_tokens_map.json"):
            content = json.loads((tokenizer_dir / name).read_text(encoding="utf-8"))
            content["pad_token"] = pad_token
            (tokenizer_dir / name).write_text(
                json.dumps(content, indent=2, sort_keys=True) + "\n", encoding="utf-8"
            )


def _copy_model_index(version: ModelVersion, out_dir: Path) -> None:
    model_index = json.loads((shipped_config_dir(version) / "model_index.json").read_text(encoding="utf-8"))
    (out_dir / "model_index.json").write_text(json.dumps(model_index, indent=2) + "\n", encoding="utf-8")
