"""Diffusers components -> one CompVis/LDM single-file state dict (what WebUI/civitai checkpoints contain).

The inverse of diffusers' LDM import (`diffusers.loaders.single_file_utils.convert_ldm_*`), written for any
layers_per_block and block count so that tiny test models convert too (diffusers' own reverse script,
scripts/convert_diffusers_to_original_stable_diffusion.py, hard-codes SD 1.5's layout). Tensors are passed
through untouched (no copies, same dtype) except where LDM stores a different shape: the VAE attention's
1x1 convs and OpenCLIP's fused q/k/v projection.

The text encoders' names (the prefixes, OpenCLIP's names and q/k/v order) are the package's
(lora_scripts/models/checkpoint_layout.py, what merge and extract write by). The UNet's and VAE's are this
module's own: tests/export checks the package's UNet map (export/sdxl_keys.py SgmUnetMap) against this
independent conversion, and the loaders read every tensor through diffusers' importers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch

from lora_scripts.models.checkpoint_layout import open_clip_name
from lora_scripts.models.detect import CLIP_PREFIX, OPEN_CLIP_PREFIX

_UNET_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "time_emb_proj": "emb_layers.1",
    "conv_shortcut": "skip_connection",
}
_UNET_TOP = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _resnet(rest: list[str], renames: dict[str, str]) -> str:
    return ".".join([renames.get(rest[0], rest[0]), *rest[1:]])


def unet_to_compvis(unet_sd: dict[str, torch.Tensor], layers_per_block: int) -> dict[str, torch.Tensor]:
    """UNet2DConditionModel state dict -> `model.diffusion_model.*` keys (openaimodel.UNetModel layout)."""
    per_down = layers_per_block + 1  # resnets (+attentions) then a downsampler, each its own input block
    per_up = layers_per_block + 1  # up blocks have one more resnet than down blocks, the last with upsampler
    up_has_attention = {
        int(k.split(".")[1]) for k in unet_sd if k.startswith("up_blocks.") and ".attentions." in k
    }
    out = {}
    for key, value in unet_sd.items():
        parts = key.split(".")
        top = next((t for t in _UNET_TOP if key.startswith(t + ".")), None)
        if top is not None:
            new = _UNET_TOP[top] + key[len(top) :]
        elif parts[0] == "down_blocks":
            block, kind = int(parts[1]), parts[2]
            if kind == "downsamplers":  # downsamplers.0.conv.weight -> input_blocks.N.0.op.weight
                new = f"input_blocks.{1 + block * per_down + layers_per_block}.0.op." + ".".join(parts[5:])
            else:
                index = 1 + block * per_down + int(parts[3])
                sub = _resnet(parts[4:], _UNET_RESNET) if kind == "resnets" else ".".join(parts[4:])
                new = f"input_blocks.{index}.{0 if kind == 'resnets' else 1}.{sub}"
        elif parts[0] == "mid_block":
            j = int(parts[2])
            if parts[1] == "resnets":
                new = f"middle_block.{2 * j}." + _resnet(parts[3:], _UNET_RESNET)
            else:
                new = "middle_block.1." + ".".join(parts[3:])
        elif parts[0] == "up_blocks":
            block, kind = int(parts[1]), parts[2]
            if kind == "upsamplers":  # after the resnet (.0) and, when present, the attention (.1)
                slot = 2 if block in up_has_attention else 1
                new = f"output_blocks.{block * per_up + layers_per_block}.{slot}.conv." + ".".join(parts[5:])
            else:
                index = block * per_up + int(parts[3])
                sub = _resnet(parts[4:], _UNET_RESNET) if kind == "resnets" else ".".join(parts[4:])
                new = f"output_blocks.{index}.{0 if kind == 'resnets' else 1}.{sub}"
        else:
            raise KeyError(f"unexpected UNet key {key!r}")
        out["model.diffusion_model." + new] = value
    return out


def vae_to_compvis(vae_sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """AutoencoderKL state dict -> `first_stage_model.*` keys (ldm AutoencoderKL layout)."""
    num_up = 1 + max(int(k.split(".")[2]) for k in vae_sd if k.startswith("decoder.up_blocks."))
    out = {}
    for key, value in vae_sd.items():
        parts = key.split(".")
        new = key.replace("conv_norm_out", "norm_out")
        if parts[1] == "down_blocks":
            i = parts[2]
            if parts[3] == "resnets":
                new = f"encoder.down.{i}.block.{parts[4]}." + _resnet(
                    parts[5:], {"conv_shortcut": "nin_shortcut"}
                )
            else:
                new = f"encoder.down.{i}.downsample.conv." + ".".join(parts[6:])
        elif parts[1] == "up_blocks":
            i = num_up - 1 - int(parts[2])  # LDM numbers decoder levels from the lowest resolution up
            if parts[3] == "resnets":
                new = f"decoder.up.{i}.block.{parts[4]}." + _resnet(
                    parts[5:], {"conv_shortcut": "nin_shortcut"}
                )
            else:
                new = f"decoder.up.{i}.upsample.conv." + ".".join(parts[6:])
        elif parts[1] == "mid_block" and parts[2] == "resnets":
            new = f"{parts[0]}.mid.block_{int(parts[3]) + 1}." + _resnet(
                parts[4:], {"conv_shortcut": "nin_shortcut"}
            )
        elif parts[1] == "mid_block":
            rest = ".".join(parts[4:])
            name = next(n for n in _VAE_ATTENTION if rest.startswith(n + "."))
            new = f"{parts[0]}.mid.attn_1.{_VAE_ATTENTION[name]}{rest[len(name) :]}"
            if value.ndim == 2:  # LDM's attention projections are 1x1 convs
                value = value[:, :, None, None]
        out["first_stage_model." + new] = value
    return out


def clip_text_to_compvis(text_encoder_sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CLIPTextModel state dict -> SD 1.x's `cond_stage_model.transformer.text_model.*` (+ position_ids)."""
    prefix = CLIP_PREFIX + "text_model."
    out = {
        prefix + key.removeprefix("text_model."): value
        for key, value in text_encoder_sd.items()
        if not key.endswith("position_ids")
    }
    positions = out[prefix + "embeddings.position_embedding.weight"].shape[0]
    # Real SD 1.x files carry this buffer (older transformers saved it); loaders must cope with it.
    out[prefix + "embeddings.position_ids"] = torch.arange(positions)[None]
    return out


def open_clip_text_to_compvis(
    text_encoder_sd: dict[str, torch.Tensor], *, add_unused_final_block: bool = True
) -> dict[str, torch.Tensor]:
    """CLIPTextModel state dict -> SD 2.x's OpenCLIP `cond_stage_model.model.*` layout.

    Real SD 2.x files hold one more transformer block than diffusers keeps (SD 2 conditions on the penultimate
    layer) plus `text_projection` and `logit_scale`; `add_unused_final_block` adds such extras (a copy of
    the last block, an identity projection) so tests see what loaders meet in the wild.
    """
    sd = {key.removeprefix("text_model."): value for key, value in text_encoder_sd.items()}
    prefix = OPEN_CLIP_PREFIX
    out: dict[str, torch.Tensor] = {}
    fused: dict[str, dict[int, torch.Tensor]] = {}  # in_proj_weight / in_proj_bias: q, k, v by row third
    for key, value in sd.items():
        found = open_clip_name(key)
        if found is None:
            continue  # position_ids: open_clip has no such buffer
        name, third = found
        if third is None:
            out[prefix + name] = value
        else:
            fused.setdefault(prefix + name, {})[third] = value
    for name, thirds in fused.items():
        out[name] = torch.cat([thirds[0], thirds[1], thirds[2]])
    layers = sorted({int(k.split(".")[2]) for k in sd if k.startswith("encoder.layers.")})
    if add_unused_final_block:
        last, extra = (
            f"{prefix}transformer.resblocks.{layers[-1]}.",
            f"{prefix}transformer.resblocks.{len(layers)}.",
        )
        for key in [k for k in out if k.startswith(last)]:
            out[extra + key[len(last) :]] = out[key].clone()
        width = sd["final_layer_norm.weight"].shape[0]
        out[prefix + "text_projection"] = torch.eye(width, dtype=sd["final_layer_norm.weight"].dtype)
        out[prefix + "logit_scale"] = torch.tensor(4.6052)
    return out


def to_compvis_state_dict(
    unet_sd: dict[str, torch.Tensor],
    vae_sd: dict[str, torch.Tensor],
    text_encoder_sd: dict[str, torch.Tensor],
    *,
    layers_per_block: int,
    text_encoder: Literal["clip", "open_clip"] = "clip",
) -> dict[str, torch.Tensor]:
    """The whole single-file state dict: UNet + VAE + text encoder (CLIP for SD 1.x, OpenCLIP for SD 2.x)."""
    text = clip_text_to_compvis if text_encoder == "clip" else open_clip_text_to_compvis
    return {
        **unet_to_compvis(unet_sd, layers_per_block),
        **vae_to_compvis(vae_sd),
        **text(text_encoder_sd),
    }


def write_compvis_checkpoint(
    path: Path,
    unet: torch.nn.Module,
    vae: torch.nn.Module,
    text_encoder: torch.nn.Module,
    *,
    text_encoder_kind: Literal["clip", "open_clip"] = "clip",
    extra: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write diffusers modules as one .safetensors (or, for any other suffix, torch.save'd) checkpoint."""
    state = to_compvis_state_dict(
        unet.state_dict(),
        vae.state_dict(),
        text_encoder.state_dict(),
        layers_per_block=unet.config.layers_per_block,
        text_encoder=text_encoder_kind,
    )
    return save_checkpoint(path, state, extra)


def save_checkpoint(path: Path | str, state: dict[str, torch.Tensor], extra: dict | None = None) -> Path:
    """`state` (plus `extra` keys) as a single-file checkpoint: .safetensors, else a Lightning-style .ckpt
    (`{"state_dict": ..., "global_step": 1}`), as the files users download are."""
    state = {key: value.detach().contiguous() for key, value in {**state, **(extra or {})}.items()}
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(state, path)
    else:
        torch.save({"state_dict": state, "global_step": 1}, path)
    return path
