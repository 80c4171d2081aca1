"""A tiny, deterministic, SD-shaped model for the demo and the tests (~2.6 M parameters, builds in < 1 s).

It has every structural feature the trainer touches in a real SD model: CrossAttn down/up blocks whose
attention layers are named `to_q/to_k/to_v/to_out.0` inside `transformer_blocks`, a VAE that downsamples 8x
into 4 latent channels with SD's scaling factor, and a CLIPTextModel with the full 49408-token vocabulary and
77 positions, so the real CLIP tokenizer works with it. Only the widths and depths are small.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from lora_scripts.models.detect import PredictionType, SDVersion
from lora_scripts.models.sd_loading import (
    CLIP_TOKENIZER_DIR,
    PAD_TOKENS,
    load_clip_tokenizer,
    shipped_config_dir,
)

TINY_CONTEXT_DIM = 32  # text encoder width == UNet cross-attention width, as in SD (768 / 1024)


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
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(8, 16, 32, 32),
            layers_per_block=1,
            latent_channels=4,
            norm_num_groups=8,
            sample_size=64,
            scaling_factor=0.18215,
        )
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                hidden_size=TINY_CONTEXT_DIM,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=4,
                max_position_embeddings=77,
                vocab_size=49408,
                hidden_act="gelu" if is_v2 else "quick_gelu",
                projection_dim=TINY_CONTEXT_DIM,
                # Same special ids as the SD configs (eos 2 selects CLIP's argmax pooling, like SD).
                bos_token_id=0,
                eos_token_id=2,
                pad_token_id=1,
            )
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
    # Copy the tokenizer files verbatim (save_pretrained would rewrite them in a version-dependent format).
    tokenizer_dir = out_dir / "tokenizer"
    shutil.copytree(CLIP_TOKENIZER_DIR, tokenizer_dir, dirs_exist_ok=True)
    if PAD_TOKENS[version] != "<|endoftext|>":
        for name in ("tokenizer_config.json", "special_tokens_map.json"):
            content = json.loads((tokenizer_dir / name).read_text(encoding="utf-8"))
            content["pad_token"] = PAD_TOKENS[version]
            (tokenizer_dir / name).write_text(
                json.dumps(content, indent=2, sort_keys=True) + "\n", encoding="utf-8"
            )
    model_index = json.loads((shipped_config_dir(version) / "model_index.json").read_text(encoding="utf-8"))
    (out_dir / "model_index.json").write_text(json.dumps(model_index, indent=2) + "\n", encoding="utf-8")
    return out_dir
