"""How AUTOMATIC1111's WebUI and ComfyUI resolve kohya LoRA key names, ported for tests.

Ported (logic kept line for line where it matters, trimmed to the SD 1.x / 2.x paths) from:

* AUTOMATIC1111/stable-diffusion-webui, extensions-builtin/Lora/networks.py (stored commit 873edba4; the
  v1.7+ file only adds "norm1"/"norm2" to `suffix_conversion` and OFT/bundled-embedding branches, included
  or noted below): `convert_diffusers_name_to_compvis`, `assign_network_names_to_compvis_modules`,
  `load_network` (the key → layer lookup) and `network_apply_weights` (which matched keys take effect).
* comfyanonymous/ComfyUI, comfy/lora.py (`LORA_CLIP_MAP`, `model_lora_keys_clip`, `model_lora_keys_unet`),
  comfy/utils.py (`unet_to_diffusers` and its UNET_MAP_* tables) and comfy/model_detection.py
  (`detect_unet_config`, `count_blocks`, `calculate_transformer_depth`: the UNet config ComfyUI reads
  off a checkpoint, which `unet_to_diffusers` then expands into diffusers names).

Both loaders see the model as the CompVis/LDM single-file layout; `meta_sd_model` builds it on the meta
device from our shipped SD 1.5 / SD 2.1 configs via tests/helpers/compvis.py, so only names and shapes exist.

SDXL (`meta_sdxl_model`): the UNet in the sgm layout (tests/helpers/sd_scripts_sdxl.py, sd-scripts' copy of
it), CLIP ViT-L as `conditioner.embedders.0.transformer.*` and OpenCLIP bigG as
`conditioner.embedders.1.model.*` (q/k/v fused in `attn.in_proj_weight`), as in sd_xl_base_1.0.safetensors.
A1111 names the modules of each embedder's `wrapped` module `{i}_{name}`
(`assign_network_names_to_compvis_modules`' is_sdxl branch); ComfyUI
adds the `clip_g` branch of `model_lora_keys_clip` (lora_te2_… once clip_l is present). Forge (backend/,
2.x) resolves keys with ComfyUI's `model_lora_keys_unet` / `model_lora_keys_clip`
(packages_3rdparty/comfyui_lora_collection/lora.py, stored commit 5e1dcd35) on the same sgm UNet and
clip_l / clip_g names, so the ComfyUI port stands for it too.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cache
from typing import Literal

import torch
from diffusers import UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from lora_scripts.models.sd_loading import ASSETS_DIR, shipped_config_dir
from tests.helpers.compvis import clip_text_to_compvis, open_clip_text_to_compvis, unet_to_compvis
from tests.helpers.sd_scripts_sdxl import SdxlUNet2DConditionModel, meta_sgm_unet

# ---------------------------------------------------------------------------------------------------------
# The full SD 1.5 / SD 2.1 models, on the meta device
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MetaSDModel:
    unet: UNet2DConditionModel
    text_encoder: CLIPTextModel
    compvis: dict[str, torch.Tensor]  # UNet (`model.diffusion_model.*`) + text encoder (`cond_stage_model.*`)


def meta_sd_model(version: Literal["sd_v1", "sd_v2"]) -> MetaSDModel:
    """Fresh meta-device UNet and text encoder from the shipped configs, plus their CompVis state dict."""
    config_dir = shipped_config_dir(version)
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(config_dir / "unet"))
        text_encoder = CLIPTextModel(CLIPTextConfig.from_pretrained(config_dir / "text_encoder"))
    to_text = open_clip_text_to_compvis if version == "sd_v2" else clip_text_to_compvis
    compvis = {
        **unet_to_compvis(unet.state_dict(), unet.config.layers_per_block),
        # Real SD 2.x files carry a 24th, unused OpenCLIP block; WebUI models have it too.
        **to_text(text_encoder.state_dict()),
    }
    return MetaSDModel(unet, text_encoder, compvis)


# The text encoders of stabilityai/stable-diffusion-xl-base-1.0 (text_encoder/, text_encoder_2/ config.json):
# OpenAI CLIP ViT-L/14 and OpenCLIP ViT-bigG/14, both with CLIP's 49408-token vocabulary and 77 positions.
SDXL_CLIP_L = dict(
    hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
    projection_dim=768, hidden_act="quick_gelu",
)  # fmt: skip
SDXL_CLIP_BIG_G = dict(
    hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
    projection_dim=1280, hidden_act="gelu",
)  # fmt: skip


@dataclass(frozen=True)
class MetaSDXLModel:
    unet: UNet2DConditionModel  # diffusers, from the shipped sdxl/unet config
    text_encoder: CLIPTextModel  # CLIP ViT-L (lora_te1)
    text_encoder_2: CLIPTextModelWithProjection  # OpenCLIP bigG in transformers' layout (lora_te2)
    sgm_unet: SdxlUNet2DConditionModel  # sd-scripts' sgm-layout UNet
    checkpoint: dict[str, torch.Tensor]  # sd_xl_base_1.0.safetensors' UNet and text-encoder keys and shapes


def meta_sdxl_model() -> MetaSDXLModel:
    """Fresh meta-device SDXL base modules, and the single-file checkpoint layout they have."""
    with torch.device("meta"):
        config = UNet2DConditionModel.load_config(ASSETS_DIR / "sdxl" / "unet")
        unet = UNet2DConditionModel.from_config(config)
        text_encoder = CLIPTextModel(CLIPTextConfig(**SDXL_CLIP_L))
        text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**SDXL_CLIP_BIG_G))
    sgm_unet = meta_sgm_unet()
    clip_l = {k.removeprefix("text_model."): v for k, v in text_encoder.state_dict().items()}
    big_g = open_clip_text_to_compvis(text_encoder_2.state_dict(), add_unused_final_block=False)
    checkpoint = {
        **{f"model.diffusion_model.{k}": v for k, v in sgm_unet.state_dict().items()},
        **{f"conditioner.embedders.0.transformer.text_model.{k}": v for k, v in clip_l.items()},
        **{k.replace("cond_stage_model.", "conditioner.embedders.1.", 1): v for k, v in big_g.items()},
    }
    return MetaSDXLModel(unet, text_encoder, text_encoder_2, sgm_unet, checkpoint)


# ---------------------------------------------------------------------------------------------------------
# AUTOMATIC1111: extensions-builtin/Lora/networks.py
# ---------------------------------------------------------------------------------------------------------

re_digits = re.compile(r"\d+")
re_x_proj = re.compile(r"(.*)_([qkv]_proj)$")
re_compiled: dict[str, re.Pattern[str]] = {}

suffix_conversion = {
    "attentions": {},
    "resnets": {
        "conv1": "in_layers_2",
        "conv2": "out_layers_3",
        "norm1": "in_layers_0",  # v1.7+
        "norm2": "out_layers_0",  # v1.7+
        "time_emb_proj": "emb_layers_1",
        "conv_shortcut": "skip_connection",
    },
}


def a1111_convert(key: str, is_sd2: bool) -> str:
    """`convert_diffusers_name_to_compvis(key, is_sd2)`: a kohya key (no `.lora_down.weight` suffix) → the
    WebUI layer name it is looked up under; unknown keys come back unchanged."""

    def match(match_list: list, regex_text: str) -> bool:
        regex = re_compiled.get(regex_text)
        if regex is None:
            regex = re.compile(regex_text)
            re_compiled[regex_text] = regex

        r = re.match(regex, key)
        if not r:
            return False

        match_list.clear()
        match_list.extend([int(x) if re.match(re_digits, x) else x for x in r.groups()])
        return True

    m: list = []

    if match(m, r"lora_unet_conv_in(.*)"):
        return f"diffusion_model_input_blocks_0_0{m[0]}"

    if match(m, r"lora_unet_conv_out(.*)"):
        return f"diffusion_model_out_2{m[0]}"

    if match(m, r"lora_unet_time_embedding_linear_(\d+)(.*)"):
        return f"diffusion_model_time_embed_{m[0] * 2 - 2}{m[1]}"

    if match(m, r"lora_unet_down_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)"):
        suffix = suffix_conversion.get(m[1], {}).get(m[3], m[3])
        return (
            f"diffusion_model_input_blocks_{1 + m[0] * 3 + m[2]}_{1 if m[1] == 'attentions' else 0}_{suffix}"
        )

    if match(m, r"lora_unet_mid_block_(attentions|resnets)_(\d+)_(.+)"):
        suffix = suffix_conversion.get(m[0], {}).get(m[2], m[2])
        return f"diffusion_model_middle_block_{1 if m[0] == 'attentions' else m[1] * 2}_{suffix}"

    if match(m, r"lora_unet_up_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)"):
        suffix = suffix_conversion.get(m[1], {}).get(m[3], m[3])
        return f"diffusion_model_output_blocks_{m[0] * 3 + m[2]}_{1 if m[1] == 'attentions' else 0}_{suffix}"

    if match(m, r"lora_unet_down_blocks_(\d+)_downsamplers_0_conv"):
        return f"diffusion_model_input_blocks_{3 + m[0] * 3}_0_op"

    if match(m, r"lora_unet_up_blocks_(\d+)_upsamplers_0_conv"):
        return f"diffusion_model_output_blocks_{2 + m[0] * 3}_{2 if m[0] > 0 else 1}_conv"

    if match(m, r"lora_te_text_model_encoder_layers_(\d+)_(.+)"):
        if is_sd2:
            if "mlp_fc1" in m[1]:
                return f"model_transformer_resblocks_{m[0]}_{m[1].replace('mlp_fc1', 'mlp_c_fc')}"
            elif "mlp_fc2" in m[1]:
                return f"model_transformer_resblocks_{m[0]}_{m[1].replace('mlp_fc2', 'mlp_c_proj')}"
            else:
                return f"model_transformer_resblocks_{m[0]}_{m[1].replace('self_attn', 'attn')}"

        return f"transformer_text_model_encoder_layers_{m[0]}_{m[1]}"

    if match(m, r"lora_te2_text_model_encoder_layers_(\d+)_(.+)"):
        if "mlp_fc1" in m[1]:
            return f"1_model_transformer_resblocks_{m[0]}_{m[1].replace('mlp_fc1', 'mlp_c_fc')}"
        elif "mlp_fc2" in m[1]:
            return f"1_model_transformer_resblocks_{m[0]}_{m[1].replace('mlp_fc2', 'mlp_c_proj')}"
        else:
            return f"1_model_transformer_resblocks_{m[0]}_{m[1].replace('self_attn', 'attn')}"

    return key


@dataclass(frozen=True)
class A1111Layers:
    """`sd_model.network_layer_mapping`'s keys, plus which of those layers are torch MultiheadAttention
    (OpenCLIP's fused q/k/v `attn`), whose LoRA A1111 applies only through a special path."""

    names: frozenset[str]
    fused_attention: frozenset[str]

    @property
    def is_sd2(self) -> bool:
        # load_network: is_sd2 = 'model_transformer_resblocks' in shared.sd_model.network_layer_mapping
        return "model_transformer_resblocks" in self.names


def a1111_layers_from_compvis(keys: Iterable[str]) -> A1111Layers:
    """`assign_network_names_to_compvis_modules` for SD 1.x/2.x, from a CompVis checkpoint's key names.

    WebUI names `name.replace(".", "_")` for every module of `cond_stage_model.wrapped` (FrozenCLIPEmbedder:
    `transformer.text_model.…`; FrozenOpenCLIPEmbedder: `model.transformer.resblocks.…`) and of
    `sd_model.model` (DiffusionWrapper: `diffusion_model.…`). The checkpoint's parameter keys are those
    modules' paths under `cond_stage_model.` / `model.` plus a parameter name; every ancestor of a
    parameter is a module (named_modules lists them all, the root as ""). The VAE (`first_stage_model.`)
    gets no names.
    """
    names: set[str] = set()
    fused: set[str] = set()
    for key in keys:
        for prefix in ("model.", "cond_stage_model."):
            if key.startswith(prefix):
                path = key[len(prefix) :]
                break
        else:
            continue
        parts = path.split(".")
        module = parts[:-1]
        if parts[-1] == "in_proj_weight":  # only torch.nn.MultiheadAttention holds this parameter
            fused.add("_".join(module))
        for depth in range(len(module) + 1):
            names.add("_".join(module[:depth]))
    return A1111Layers(frozenset(names), frozenset(fused))


def a1111_layers_from_sdxl(keys: Iterable[str]) -> A1111Layers:
    """`assign_network_names_to_compvis_modules` for SDXL, from an SDXL checkpoint's key names.

    `sd_model.model.named_modules()` as for SD 1.x (`diffusion_model_…`); then, for each conditioner embedder
    `i` with a `wrapped` module (0: FrozenCLIPEmbedder, 1: FrozenOpenCLIPEmbedder2; whose paths are the
    checkpoint's after `conditioner.embedders.{i}.`), `f"{i}_{name}"` for each of its named modules.
    """
    names: set[str] = set()
    fused: set[str] = set()
    for key in keys:
        embedder = re.match(r"conditioner\.embedders\.(\d+)\.(.+)", key)
        if key.startswith("model."):
            prefix, parts = "", key.removeprefix("model.").split(".")
        elif embedder:
            prefix, parts = f"{embedder[1]}_", embedder[2].split(".")
        else:
            continue
        module = parts[:-1]
        if parts[-1] == "in_proj_weight":
            fused.add(prefix + "_".join(module))
        for depth in range(len(module) + 1):
            names.add(prefix + "_".join(module[:depth]))
    return A1111Layers(frozenset(names), frozenset(fused))


@cache
def a1111_sdxl_layers() -> A1111Layers:
    """The WebUI layer mapping of SDXL base."""
    return a1111_layers_from_sdxl(meta_sdxl_model().checkpoint)


@cache
def a1111_layers(is_sd2: bool) -> A1111Layers:
    """The WebUI layer mapping of the full SD 2.1 (`is_sd2`) or SD 1.5 model."""
    return a1111_layers_from_compvis(meta_sd_model("sd_v2" if is_sd2 else "sd_v1").compvis)


def a1111_layer_names(is_sd2: bool) -> set[str]:
    """The keys of WebUI's `network_layer_mapping` for the full SD 2.1 / SD 1.5 model."""
    return set(a1111_layers(is_sd2).names)


def a1111_match(key_network_without_network_parts: str, layers: A1111Layers) -> tuple[str, str] | None:
    """`load_network`'s lookup for one kohya key: (sd_key the weights are stored under, the layer they attach
    to), or None where WebUI reports the key in `keys_failed_to_match` and ignores it."""
    mapping = layers.names
    key = a1111_convert(key_network_without_network_parts, layers.is_sd2)
    if key in mapping:
        return key, key

    m = re_x_proj.match(key)
    if m and m.group(1) in mapping:  # SD 2.x: q/k/v_proj → the fused OpenCLIP `attn`, key kept as is
        return key, m.group(1)

    # SDXL loras seem to already have correct compvis keys, so only need to replace "lora_unet" with
    # "diffusion_model" (A1111's comment; kept because it is part of the SD 1.x/2.x path too)
    if "lora_unet" in key_network_without_network_parts:
        key = key_network_without_network_parts.replace("lora_unet", "diffusion_model")
        if key in mapping:
            return key, key
    elif "lora_te1_text_model" in key_network_without_network_parts:
        key = key_network_without_network_parts.replace("lora_te1_text_model", "0_transformer_text_model")
        if key in mapping:
            return key, key
        # some SD1 Loras also have correct compvis keys
        key = key_network_without_network_parts.replace("lora_te1_text_model", "transformer_text_model")
        if key in mapping:
            return key, key
    # (The v1.7+ "oft_unet" / "oft_diag" branches only concern OFT keys, which we never write.)
    return None


_FUSED_PARTS = ("q_proj", "k_proj", "v_proj", "out_proj")


def a1111_dropped(keys: Iterable[str], layers: A1111Layers) -> dict[str, str]:
    """Keys (without suffix) of one LoRA file that WebUI would load without effect, with the reason.

    Unmatched keys are skipped by `load_network`. Matched keys take effect in `network_apply_weights`,
    called from the patched forward of their layer — except inside a torch MultiheadAttention: its forward
    never calls `out_proj.forward`, and the fused branch adds q/k/v/out deltas to `in_proj_weight` /
    `out_proj.weight` only when `network_layer_name + "_q_proj"`, `"_k_proj"`, `"_v_proj"` and
    `"_out_proj"` are all in the network.
    """
    keys = list(keys)
    hits = {key: a1111_match(key, layers) for key in keys}
    sd_keys = {hit[0] for hit in hits.values() if hit is not None}
    dropped = {}
    for key, hit in hits.items():
        if hit is None:
            dropped[key] = "no WebUI layer matches"
            continue
        _, layer = hit
        fused = layer if layer in layers.fused_attention else None
        if layer.endswith("_out_proj") and layer.removesuffix("_out_proj") in layers.fused_attention:
            fused = layer.removesuffix("_out_proj")
        if fused is not None and not all(f"{fused}_{part}" in sd_keys for part in _FUSED_PARTS):
            dropped[key] = f"fused attention {fused} is patched only when q, k, v and out_proj all have LoRA"
    return dropped


# ---------------------------------------------------------------------------------------------------------
# ComfyUI: comfy/model_detection.py, comfy/utils.py, comfy/lora.py
# ---------------------------------------------------------------------------------------------------------


def count_blocks(state_dict_keys: list[str], prefix_string: str) -> int:
    count = 0
    while True:
        c = False
        for k in state_dict_keys:
            if k.startswith(prefix_string.format(count)):
                c = True
                break
        if not c:
            break
        count += 1
    return count


def calculate_transformer_depth(prefix: str, state_dict_keys: list[str]) -> int | None:
    # Only the depth: context_dim / use_linear_in_transformer / video flags do not affect the key map.
    transformer_prefix = prefix + "1.transformer_blocks."
    transformer_keys = sorted(a for a in state_dict_keys if a.startswith(transformer_prefix))
    if len(transformer_keys) > 0:
        return count_blocks(state_dict_keys, transformer_prefix + "{}")
    return None


def comfyui_detect_unet_config(state_dict: dict[str, torch.Tensor], key_prefix: str) -> dict:
    """`detect_unet_config`'s SD UNet branch, reduced to the fields `unet_to_diffusers` reads."""
    state_dict_keys = list(state_dict.keys())
    model_channels = state_dict[f"{key_prefix}input_blocks.0.0.weight"].shape[0]

    num_res_blocks: list[int] = []
    channel_mult: list[int] = []
    transformer_depth: list[int] = []
    transformer_depth_output: list[int] = []
    last_res_blocks = 0
    last_channel_mult = 0

    input_block_count = count_blocks(state_dict_keys, f"{key_prefix}input_blocks" + ".{}.")
    for count in range(input_block_count):
        prefix = f"{key_prefix}input_blocks.{count}."
        prefix_output = f"{key_prefix}output_blocks.{input_block_count - count - 1}."

        block_keys = sorted(a for a in state_dict_keys if a.startswith(prefix))
        if len(block_keys) == 0:
            break
        block_keys_output = sorted(a for a in state_dict_keys if a.startswith(prefix_output))

        if f"{prefix}0.op.weight" in block_keys:  # new layer
            num_res_blocks.append(last_res_blocks)
            channel_mult.append(last_channel_mult)
            last_res_blocks = 0
            last_channel_mult = 0
            out = calculate_transformer_depth(prefix_output, state_dict_keys)
            transformer_depth_output.append(out if out is not None else 0)
        else:
            if f"{prefix}0.in_layers.0.weight" in block_keys:
                last_res_blocks += 1
                last_channel_mult = state_dict[f"{prefix}0.out_layers.3.weight"].shape[0] // model_channels
                out = calculate_transformer_depth(prefix, state_dict_keys)
                transformer_depth.append(out if out is not None else 0)
            if f"{prefix_output}0.in_layers.0.weight" in block_keys_output:
                out = calculate_transformer_depth(prefix_output, state_dict_keys)
                transformer_depth_output.append(out if out is not None else 0)

    num_res_blocks.append(last_res_blocks)
    channel_mult.append(last_channel_mult)
    if f"{key_prefix}middle_block.1.proj_in.weight" in state_dict_keys:
        transformer_depth_middle = count_blocks(
            state_dict_keys, f"{key_prefix}middle_block.1.transformer_blocks." + "{}"
        )
    elif f"{key_prefix}middle_block.0.in_layers.0.weight" in state_dict_keys:
        transformer_depth_middle = -1
    else:
        transformer_depth_middle = -2

    return {
        "model_channels": model_channels,
        "num_res_blocks": num_res_blocks,
        "transformer_depth": transformer_depth,
        "transformer_depth_output": transformer_depth_output,
        "channel_mult": channel_mult,
        "transformer_depth_middle": transformer_depth_middle,
    }


UNET_MAP_ATTENTIONS = {
    "proj_in.weight",
    "proj_in.bias",
    "proj_out.weight",
    "proj_out.bias",
    "norm.weight",
    "norm.bias",
}

TRANSFORMER_BLOCKS = {
    "norm1.weight",
    "norm1.bias",
    "norm2.weight",
    "norm2.bias",
    "norm3.weight",
    "norm3.bias",
    "attn1.to_q.weight",
    "attn1.to_k.weight",
    "attn1.to_v.weight",
    "attn1.to_out.0.weight",
    "attn1.to_out.0.bias",
    "attn2.to_q.weight",
    "attn2.to_k.weight",
    "attn2.to_v.weight",
    "attn2.to_out.0.weight",
    "attn2.to_out.0.bias",
    "ff.net.0.proj.weight",
    "ff.net.0.proj.bias",
    "ff.net.2.weight",
    "ff.net.2.bias",
}

UNET_MAP_RESNET = {
    "in_layers.2.weight": "conv1.weight",
    "in_layers.2.bias": "conv1.bias",
    "emb_layers.1.weight": "time_emb_proj.weight",
    "emb_layers.1.bias": "time_emb_proj.bias",
    "out_layers.3.weight": "conv2.weight",
    "out_layers.3.bias": "conv2.bias",
    "skip_connection.weight": "conv_shortcut.weight",
    "skip_connection.bias": "conv_shortcut.bias",
    "in_layers.0.weight": "norm1.weight",
    "in_layers.0.bias": "norm1.bias",
    "out_layers.0.weight": "norm2.weight",
    "out_layers.0.bias": "norm2.bias",
}

UNET_MAP_BASIC = {
    ("label_emb.0.0.weight", "class_embedding.linear_1.weight"),
    ("label_emb.0.0.bias", "class_embedding.linear_1.bias"),
    ("label_emb.0.2.weight", "class_embedding.linear_2.weight"),
    ("label_emb.0.2.bias", "class_embedding.linear_2.bias"),
    ("label_emb.0.0.weight", "add_embedding.linear_1.weight"),
    ("label_emb.0.0.bias", "add_embedding.linear_1.bias"),
    ("label_emb.0.2.weight", "add_embedding.linear_2.weight"),
    ("label_emb.0.2.bias", "add_embedding.linear_2.bias"),
    ("input_blocks.0.0.weight", "conv_in.weight"),
    ("input_blocks.0.0.bias", "conv_in.bias"),
    ("out.0.weight", "conv_norm_out.weight"),
    ("out.0.bias", "conv_norm_out.bias"),
    ("out.2.weight", "conv_out.weight"),
    ("out.2.bias", "conv_out.bias"),
    ("time_embed.0.weight", "time_embedding.linear_1.weight"),
    ("time_embed.0.bias", "time_embedding.linear_1.bias"),
    ("time_embed.2.weight", "time_embedding.linear_2.weight"),
    ("time_embed.2.bias", "time_embedding.linear_2.bias"),
}


def comfyui_unet_to_diffusers(unet_config: dict) -> dict[str, str]:
    """`comfy.utils.unet_to_diffusers`: diffusers UNet key → CompVis key (without `diffusion_model.`)."""
    if "num_res_blocks" not in unet_config:
        return {}
    num_res_blocks = unet_config["num_res_blocks"]
    channel_mult = unet_config["channel_mult"]
    transformer_depth = unet_config["transformer_depth"][:]
    transformer_depth_output = unet_config["transformer_depth_output"][:]
    num_blocks = len(channel_mult)

    transformers_mid = unet_config.get("transformer_depth_middle", None)

    diffusers_unet_map = {}
    for x in range(num_blocks):
        n = 1 + (num_res_blocks[x] + 1) * x
        for i in range(num_res_blocks[x]):
            for b in UNET_MAP_RESNET:
                diffusers_unet_map[f"down_blocks.{x}.resnets.{i}.{UNET_MAP_RESNET[b]}"] = (
                    f"input_blocks.{n}.0.{b}"
                )
            num_transformers = transformer_depth.pop(0)
            if num_transformers > 0:
                for b in UNET_MAP_ATTENTIONS:
                    diffusers_unet_map[f"down_blocks.{x}.attentions.{i}.{b}"] = f"input_blocks.{n}.1.{b}"
                for t in range(num_transformers):
                    for b in TRANSFORMER_BLOCKS:
                        diffusers_unet_map[f"down_blocks.{x}.attentions.{i}.transformer_blocks.{t}.{b}"] = (
                            f"input_blocks.{n}.1.transformer_blocks.{t}.{b}"
                        )
            n += 1
        for k in ["weight", "bias"]:
            diffusers_unet_map[f"down_blocks.{x}.downsamplers.0.conv.{k}"] = f"input_blocks.{n}.0.op.{k}"

    i = 0
    for b in UNET_MAP_ATTENTIONS:
        diffusers_unet_map[f"mid_block.attentions.{i}.{b}"] = f"middle_block.1.{b}"
    for t in range(transformers_mid):
        for b in TRANSFORMER_BLOCKS:
            diffusers_unet_map[f"mid_block.attentions.{i}.transformer_blocks.{t}.{b}"] = (
                f"middle_block.1.transformer_blocks.{t}.{b}"
            )

    for i, n in enumerate([0, 2]):
        for b in UNET_MAP_RESNET:
            diffusers_unet_map[f"mid_block.resnets.{i}.{UNET_MAP_RESNET[b]}"] = f"middle_block.{n}.{b}"

    num_res_blocks = list(reversed(num_res_blocks))
    for x in range(num_blocks):
        n = (num_res_blocks[x] + 1) * x
        length = num_res_blocks[x] + 1
        for i in range(length):
            c = 0
            for b in UNET_MAP_RESNET:
                diffusers_unet_map[f"up_blocks.{x}.resnets.{i}.{UNET_MAP_RESNET[b]}"] = (
                    f"output_blocks.{n}.0.{b}"
                )
            c += 1
            num_transformers = transformer_depth_output.pop()
            if num_transformers > 0:
                c += 1
                for b in UNET_MAP_ATTENTIONS:
                    diffusers_unet_map[f"up_blocks.{x}.attentions.{i}.{b}"] = f"output_blocks.{n}.1.{b}"
                for t in range(num_transformers):
                    for b in TRANSFORMER_BLOCKS:
                        diffusers_unet_map[f"up_blocks.{x}.attentions.{i}.transformer_blocks.{t}.{b}"] = (
                            f"output_blocks.{n}.1.transformer_blocks.{t}.{b}"
                        )
            if i == length - 1:
                for k in ["weight", "bias"]:
                    diffusers_unet_map[f"up_blocks.{x}.upsamplers.0.conv.{k}"] = (
                        f"output_blocks.{n}.{c}.conv.{k}"
                    )
            n += 1

    for k in UNET_MAP_BASIC:
        diffusers_unet_map[k[1]] = k[0]

    return diffusers_unet_map


LORA_CLIP_MAP = {
    "mlp.fc1": "mlp_fc1",
    "mlp.fc2": "mlp_fc2",
    "self_attn.k_proj": "self_attn_k_proj",
    "self_attn.q_proj": "self_attn_q_proj",
    "self_attn.v_proj": "self_attn_v_proj",
    "self_attn.out_proj": "self_attn_out_proj",
}

# ComfyUI builds its own text encoder from a fixed config and converts the checkpoint into it:
# comfy/sd1_clip_config.json (12 layers) for SD 1.x, comfy/text_encoders/sd2_clip_config.json (24 layers; the
# OpenCLIP-H tower including the block SD 2 skips) for SD 2.x; SDXL has clip_l (12) and clip_g
# (comfy/clip_config_bigg.json, 32 layers). Its state dict keys are these.
COMFYUI_CLIP_LAYERS = {"clip_l": 12, "clip_h": 24, "clip_g": 32}
ClipKind = Literal["clip_l", "clip_h", "clip_g"]


def comfyui_clip_state_dict_keys(text_encoder_kind: ClipKind) -> set[str]:
    layers = COMFYUI_CLIP_LAYERS[text_encoder_kind]
    return {
        f"{text_encoder_kind}.transformer.text_model.encoder.layers.{b}.{c}.{p}"
        for b in range(layers)
        for c in LORA_CLIP_MAP
        for p in ("weight", "bias")
    }


def model_lora_keys_clip(sdk: set[str], key_map: dict[str, str]) -> dict[str, str]:
    """`comfy.lora.model_lora_keys_clip` (the clip_h / clip_l / clip_g branches)."""
    text_model_lora_key = "lora_te_text_model_encoder_layers_{}_{}"
    clip_l_present = False
    for b in range(32):
        for c in LORA_CLIP_MAP:
            k = f"clip_h.transformer.text_model.encoder.layers.{b}.{c}.weight"
            if k in sdk:
                key_map[text_model_lora_key.format(b, LORA_CLIP_MAP[c])] = k
                key_map[f"lora_te1_text_model_encoder_layers_{b}_{LORA_CLIP_MAP[c]}"] = k
                key_map[f"text_encoder.text_model.encoder.layers.{b}.{c}"] = k  # diffusers lora

            k = f"clip_l.transformer.text_model.encoder.layers.{b}.{c}.weight"
            if k in sdk:
                key_map[text_model_lora_key.format(b, LORA_CLIP_MAP[c])] = k
                key_map[f"lora_te1_text_model_encoder_layers_{b}_{LORA_CLIP_MAP[c]}"] = k  # SDXL base
                clip_l_present = True
                key_map[f"text_encoder.text_model.encoder.layers.{b}.{c}"] = k  # diffusers lora

            k = f"clip_g.transformer.text_model.encoder.layers.{b}.{c}.weight"
            if k in sdk:
                if clip_l_present:
                    key_map[f"lora_te2_text_model_encoder_layers_{b}_{LORA_CLIP_MAP[c]}"] = k  # SDXL base
                    key_map[f"text_encoder_2.text_model.encoder.layers.{b}.{c}"] = k  # diffusers lora
                else:  # SDXL refiner (clip_g alone), Stable Cascade
                    key_map[text_model_lora_key.format(b, LORA_CLIP_MAP[c])] = k
                    key_map[f"text_encoder.text_model.encoder.layers.{b}.{c}"] = k  # diffusers lora
                    key_map[f"lora_prior_te_text_model_encoder_layers_{b}_{LORA_CLIP_MAP[c]}"] = k
    return key_map


def model_lora_keys_unet(sdk: set[str], unet_config: dict, key_map: dict[str, str]) -> dict[str, str]:
    """`comfy.lora.model_lora_keys_unet`; `sdk` is the model's state dict keys (`diffusion_model.*`)."""
    for k in sdk:
        if k.startswith("diffusion_model.") and k.endswith(".weight"):
            key_lora = k[len("diffusion_model.") : -len(".weight")].replace(".", "_")
            key_map[f"lora_unet_{key_lora}"] = k
            key_map[f"lora_prior_unet_{key_lora}"] = k  # cascade lora

    diffusers_keys = comfyui_unet_to_diffusers(unet_config)
    for k in diffusers_keys:
        if k.endswith(".weight"):
            unet_key = f"diffusion_model.{diffusers_keys[k]}"
            key_lora = k[: -len(".weight")].replace(".", "_")
            key_map[f"lora_unet_{key_lora}"] = unet_key

            for p in ["", "unet."]:
                diffusers_lora_key = "{}{}".format(p, k[: -len(".weight")].replace(".to_", ".processor.to_"))
                if diffusers_lora_key.endswith(".to_out.0"):
                    diffusers_lora_key = diffusers_lora_key[:-2]
                key_map[diffusers_lora_key] = unet_key
    return key_map


@dataclass(frozen=True)
class ComfyUIModel:
    key_map: dict[str, str]  # LoRA key (no suffix) → the model state-dict key the patch is added to
    state_dict_keys: frozenset[str]  # a patch whose target is missing here is dropped by add_patches


def comfyui_key_map(compvis: dict[str, torch.Tensor], *text_encoder_kinds: ClipKind) -> ComfyUIModel:
    """The key map `load_lora_for_models` builds for a checkpoint: UNet config detected from its
    `model.diffusion_model.*` tensors (as comfy.sd.load_checkpoint_guess_config does), clip keys from the
    text encoders ComfyUI builds for the model type (SDXL: clip_l and clip_g)."""
    unet_config = comfyui_detect_unet_config(compvis, "model.diffusion_model.")
    unet_sdk = {k.removeprefix("model.") for k in compvis if k.startswith("model.diffusion_model.")}
    clip_sdk = set().union(*(comfyui_clip_state_dict_keys(kind) for kind in text_encoder_kinds))
    key_map = model_lora_keys_unet(unet_sdk, unet_config, {})
    key_map = model_lora_keys_clip(clip_sdk, key_map)
    return ComfyUIModel(key_map, frozenset(unet_sdk | clip_sdk))


@cache
def comfyui_model(version: Literal["sd_v1", "sd_v2"]) -> ComfyUIModel:
    return comfyui_key_map(meta_sd_model(version).compvis, "clip_h" if version == "sd_v2" else "clip_l")


@cache
def comfyui_sdxl_model() -> ComfyUIModel:
    return comfyui_key_map(meta_sdxl_model().checkpoint, "clip_l", "clip_g")


def comfyui_dropped(keys: Iterable[str], model: ComfyUIModel) -> dict[str, str]:
    """Keys (without suffix) ComfyUI would not apply: `load_lora` warns "lora key not loaded" for keys
    missing from the key map; `ModelPatcher.add_patches` skips patches whose target is not in the model."""
    dropped = {}
    for key in keys:
        target = model.key_map.get(key)
        if target is None:
            dropped[key] = "not in ComfyUI's key map"
        elif target not in model.state_dict_keys:
            dropped[key] = f"maps to {target}, which the model does not have"
    return dropped


def materialise_lora_weights(module: torch.nn.Module) -> None:
    """Give only the small LoRA A/B layers real storage; the base model stays on the meta device."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for layer in module.modules():
        if isinstance(layer, BaseTunerLayer):
            for adapter_layers in (layer.lora_A, layer.lora_B):
                for linear in adapter_layers.values():
                    linear.to_empty(device="cpu")
