"""The tiny FLUX.1 model written as the single files ComfyUI users have: a BFL-layout transformer (fp32 or
fp8 e4m3fn), BFL's `ae.safetensors` VAE, `clip_l.safetensors`, `t5xxl.safetensors`, and an all-in-one
checkpoint holding all four. For the tests only: the inverse of diffusers' single-file conversions.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from safetensors.torch import save_file

from lora_scripts.models.tiny import TinyFlux


def to_bfl_transformer(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers FluxTransformer2DModel tensors -> BFL's names, q/k/v (and single blocks' mlp) fused."""

    def swap(
        weight: torch.Tensor,
    ) -> torch.Tensor:  # AdaLayerNormContinuous: diffusers scale|shift, BFL shift|scale
        scale, shift = weight.chunk(2, dim=0)
        return torch.cat([shift, scale], dim=0)

    out: dict[str, torch.Tensor] = {}
    embedders = {
        "timestep_embedder": "time_in",
        "text_embedder": "vector_in",
        "guidance_embedder": "guidance_in",
    }
    for ours, theirs in embedders.items():
        for layer, bfl in (("linear_1", "in_layer"), ("linear_2", "out_layer")):
            for kind in ("weight", "bias"):
                key = f"time_text_embed.{ours}.{layer}.{kind}"
                if key in state:
                    out[f"{theirs}.{bfl}.{kind}"] = state[key]
    for kind in ("weight", "bias"):
        out[f"txt_in.{kind}"] = state[f"context_embedder.{kind}"]
        out[f"img_in.{kind}"] = state[f"x_embedder.{kind}"]
        out[f"final_layer.linear.{kind}"] = state[f"proj_out.{kind}"]
        out[f"final_layer.adaLN_modulation.1.{kind}"] = swap(state[f"norm_out.linear.{kind}"])
    doubles = sorted({int(k.split(".")[1]) for k in state if k.startswith("transformer_blocks.")})
    for i in doubles:
        d, b = f"transformer_blocks.{i}.", f"double_blocks.{i}."
        for kind in ("weight", "bias"):
            renames = {
                "img_mod.lin": "norm1.linear",
                "txt_mod.lin": "norm1_context.linear",
                "img_mlp.0": "ff.net.0.proj",
                "img_mlp.2": "ff.net.2",
                "txt_mlp.0": "ff_context.net.0.proj",
                "txt_mlp.2": "ff_context.net.2",
                "img_attn.proj": "attn.to_out.0",
                "txt_attn.proj": "attn.to_add_out",
            }
            for bfl, ours in renames.items():
                out[f"{b}{bfl}.{kind}"] = state[f"{d}{ours}.{kind}"]
            out[f"{b}img_attn.qkv.{kind}"] = torch.cat([state[f"{d}attn.to_{x}.{kind}"] for x in "qkv"])
            out[f"{b}txt_attn.qkv.{kind}"] = torch.cat([state[f"{d}attn.add_{x}_proj.{kind}"] for x in "qkv"])
        out[f"{b}img_attn.norm.query_norm.scale"] = state[f"{d}attn.norm_q.weight"]
        out[f"{b}img_attn.norm.key_norm.scale"] = state[f"{d}attn.norm_k.weight"]
        out[f"{b}txt_attn.norm.query_norm.scale"] = state[f"{d}attn.norm_added_q.weight"]
        out[f"{b}txt_attn.norm.key_norm.scale"] = state[f"{d}attn.norm_added_k.weight"]
    singles = sorted({int(k.split(".")[1]) for k in state if k.startswith("single_transformer_blocks.")})
    for i in singles:
        d, b = f"single_transformer_blocks.{i}.", f"single_blocks.{i}."
        for kind in ("weight", "bias"):
            out[f"{b}modulation.lin.{kind}"] = state[f"{d}norm.linear.{kind}"]
            parts = ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")
            out[f"{b}linear1.{kind}"] = torch.cat([state[f"{d}{part}.{kind}"] for part in parts])
            out[f"{b}linear2.{kind}"] = state[f"{d}proj_out.{kind}"]
        out[f"{b}norm.query_norm.scale"] = state[f"{d}attn.norm_q.weight"]
        out[f"{b}norm.key_norm.scale"] = state[f"{d}attn.norm_k.weight"]
    return {key: value.clone().contiguous() for key, value in out.items()}


def to_bfl_vae(state: dict[str, torch.Tensor], num_levels: int = 4) -> dict[str, torch.Tensor]:
    """diffusers AutoencoderKL tensors -> the LDM/BFL VAE layout of ae.safetensors (attention: 1x1 convs)."""
    out = {}
    for key, value in state.items():
        new = key.replace("conv_norm_out", "norm_out").replace("conv_shortcut", "nin_shortcut")
        new = re.sub(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)", r"encoder.down.\1.block.\2", new)
        new = re.sub(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0", r"encoder.down.\1.downsample", new)
        new = re.sub(
            r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)",
            lambda m: f"decoder.up.{num_levels - 1 - int(m[1])}.block.{m[2]}",
            new,
        )
        new = re.sub(
            r"decoder\.up_blocks\.(\d+)\.upsamplers\.0",
            lambda m: f"decoder.up.{num_levels - 1 - int(m[1])}.upsample",
            new,
        )
        new = re.sub(r"mid_block\.resnets\.(\d+)", lambda m: f"mid.block_{int(m[1]) + 1}", new)
        if ".mid_block.attentions.0." in new:
            attn = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
            for ours, theirs in attn.items():
                new = new.replace(f"mid_block.attentions.0.{ours}.", f"mid.attn_1.{theirs}.")
            if value.dim() == 2:
                value = value[:, :, None, None]
        out[new] = value.clone().contiguous()
    return out


def to_comfy_clip_l(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CLIPTextModel tensors (transformers 5: no text_model.) -> clip_l.safetensors' `text_model.*` names,
    with the projection and logit scale CLIP's full model adds (which a text encoder does not use)."""
    out = {"text_model." + key.removeprefix("text_model."): value.clone() for key, value in state.items()}
    width = state["embeddings.token_embedding.weight"].shape[1]
    out["text_projection.weight"] = torch.zeros(width, width)
    out["logit_scale"] = torch.tensor(4.6052)
    return out


def to_comfy_t5(
    state: dict[str, torch.Tensor], *, embedding: str = "shared.weight"
) -> dict[str, torch.Tensor]:
    """T5EncoderModel tensors with the token embedding stored once, under `embedding`."""
    out = {
        k: v.clone() for k, v in state.items() if k not in ("shared.weight", "encoder.embed_tokens.weight")
    }
    out[embedding] = state["shared.weight"].clone()
    return out


def write_flux_files(tiny: TinyFlux, folder: Path) -> dict[str, Path]:
    """Every file the tests load, in `folder`: transformer (fp32), transformer_fp8 (e4m3fn), ae, clip_l,
    t5xxl, t5xxl_embed (embedding as encoder.embed_tokens.weight only) and all_in_one (ComfyUI's prefixes)."""
    folder.mkdir(parents=True, exist_ok=True)
    transformer = to_bfl_transformer(tiny.transformer.state_dict())
    vae = to_bfl_vae(tiny.vae.state_dict())
    clip = to_comfy_clip_l(tiny.text_encoder.state_dict())
    t5 = to_comfy_t5(tiny.text_encoder_2.state_dict())
    contents = {
        "transformer": transformer,
        "transformer_fp8": {k: v.to(torch.float8_e4m3fn) for k, v in transformer.items()},
        "ae": vae,
        "clip_l": clip,
        "t5xxl": t5,
        "t5xxl_embed": to_comfy_t5(tiny.text_encoder_2.state_dict(), embedding="encoder.embed_tokens.weight"),
        "all_in_one": {
            **{"model.diffusion_model." + k: v for k, v in transformer.items()},
            **{"first_stage_model." + k: v for k, v in vae.items()},
            **{"text_encoders.clip_l.transformer." + k: v for k, v in clip.items()},
            **{"text_encoders.t5xxl.transformer." + k: v for k, v in t5.items()},
        },
    }
    paths = {}
    for name, tensors in contents.items():
        paths[name] = folder / f"{name}.safetensors"
        save_file({k: v.contiguous() for k, v in tensors.items()}, paths[name])
    return paths
