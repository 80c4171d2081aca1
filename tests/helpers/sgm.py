"""Diffusers SDXL components -> one single-file state dict in Stability's sgm layout (what civitai has).

The SDXL counterpart of `compvis.py` and the inverse of diffusers' single-file import: the UNet and VAE keep
the LDM names (plus the UNet's `label_emb`, SDXL's size/crop and pooled-text embedding), CLIP ViT-L sits under
`conditioner.embedders.0.transformer.` in transformers' layout and OpenCLIP ViT-bigG under
`conditioner.embedders.1.model.` in open_clip's (fused q/k/v, `text_projection` stored as x @ P). Tensors
pass through untouched (no copies, same dtype) except where sgm stores a different shape.
"""

from __future__ import annotations

from pathlib import Path

import torch

from lora_scripts.models.detect import CLIP_PREFIX, OPEN_CLIP_PREFIX, SGM_CLIP_PREFIX, SGM_OPEN_CLIP_PREFIX
from tests.helpers.compvis import (
    clip_text_to_compvis,
    open_clip_text_to_compvis,
    save_checkpoint,
    unet_to_compvis,
    vae_to_compvis,
)

SGM_CLIP = SGM_CLIP_PREFIX
SGM_OPEN_CLIP = SGM_OPEN_CLIP_PREFIX
_LABEL_EMB = {"add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2"}


def _reprefixed(state: dict[str, torch.Tensor], old: str, new: str) -> dict[str, torch.Tensor]:
    return {new + key.removeprefix(old): value for key, value in state.items()}


def sdxl_unet_to_sgm(unet_sd: dict[str, torch.Tensor], layers_per_block: int) -> dict[str, torch.Tensor]:
    """SDXL UNet2DConditionModel state dict -> `model.diffusion_model.*` (label_emb for the add-embedding)."""
    added = {key: value for key, value in unet_sd.items() if key.startswith("add_embedding.")}
    out = unet_to_compvis({k: v for k, v in unet_sd.items() if k not in added}, layers_per_block)
    for key, value in added.items():
        layer, kind = key.rsplit(".", 1)
        out[f"model.diffusion_model.{_LABEL_EMB[layer]}.{kind}"] = value
    return out


def open_clip_bigg_to_sgm(text_encoder_2_sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CLIPTextModelWithProjection state dict -> `conditioner.embedders.1.model.*` (all blocks, no extras
    beyond what SDXL files hold: the transposed text_projection and logit_scale)."""
    out = _reprefixed(
        open_clip_text_to_compvis(text_encoder_2_sd, add_unused_final_block=False),
        OPEN_CLIP_PREFIX,
        SGM_OPEN_CLIP,
    )
    out[SGM_OPEN_CLIP + "text_projection"] = text_encoder_2_sd["text_projection.weight"].T
    out[SGM_OPEN_CLIP + "logit_scale"] = torch.tensor(4.6052)
    return out


def to_sgm_state_dict(
    unet_sd: dict[str, torch.Tensor],
    vae_sd: dict[str, torch.Tensor],
    text_encoder_sd: dict[str, torch.Tensor],
    text_encoder_2_sd: dict[str, torch.Tensor],
    *,
    layers_per_block: int,
) -> dict[str, torch.Tensor]:
    """The whole SDXL base single-file state dict: UNet + VAE + CLIP ViT-L + OpenCLIP ViT-bigG."""
    return {
        **sdxl_unet_to_sgm(unet_sd, layers_per_block),
        **vae_to_compvis(vae_sd),
        **_reprefixed(clip_text_to_compvis(text_encoder_sd), CLIP_PREFIX, SGM_CLIP),
        **open_clip_bigg_to_sgm(text_encoder_2_sd),
    }


def write_sgm_checkpoint(
    path: Path,
    unet: torch.nn.Module,
    vae: torch.nn.Module,
    text_encoder: torch.nn.Module,
    text_encoder_2: torch.nn.Module,
    *,
    dtype: torch.dtype | None = None,
    extra: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write diffusers SDXL modules as one .safetensors (any other suffix: a torch.save'd .ckpt) file.

    dtype: cast the floating-point tensors (torch.float16 for the usual release files); None keeps fp32.
    """
    state = to_sgm_state_dict(
        unet.state_dict(),
        vae.state_dict(),
        text_encoder.state_dict(),
        text_encoder_2.state_dict(),
        layers_per_block=unet.config.layers_per_block,
    )
    if dtype is not None:
        state = {key: value.to(dtype) if value.is_floating_point() else value for key, value in state.items()}
    return save_checkpoint(path, state, extra)
