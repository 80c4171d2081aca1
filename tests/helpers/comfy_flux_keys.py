"""How ComfyUI and Forge load a kohya-named FLUX.1 LoRA file, ported for tests: which model weight each key of
the file patches, which keys are left unloaded, and the weight each patch makes.

Ported (the FLUX paths only; no code of theirs runs or ships) from:

* comfyanonymous/ComfyUI, comfy/lora.py (stored commit 41444b52): `model_lora_keys_unet` (its generic branch:
  every `diffusion_model.<path>.weight` of the model is the target of `lora_unet_<path with _>`; the Flux
  branch adds only diffusers spellings, `transformer.` / `lycoris_` / `lora_transformer_` + the names of
  `comfy.utils.flux_to_diffusers`, which our files never use), `model_lora_keys_clip` (`lora_te1_…` for the
  clip_l layers in LORA_CLIP_MAP; for each `t5xxl.transformer.<path>.weight`, with clip_l present and no
  clip_g, `lora_te2_<path>` ("OneTrainer Flux") and `lora_te3_<path>`) and `load_lora` (the keys of a
  module it consumes: `.alpha`, `.lora_up.weight`, `.lora_down.weight`, `.lora_mid.weight`, `.dora_scale`,
  `.reshape_weight`; every other key is logged "lora key not loaded"). The update is
  comfy/weight_adapter/lora.py `LoRAAdapter.calculate_weight` (stored commit 6fd406fb):
  `weight += strength * (alpha / down.shape[0]) * (up @ down).reshape(weight.shape)` (alpha 1 where the
  file has none; a product that does not reshape to the weight is logged as an error and not applied).
* ComfyUI's model: comfy/ldm/flux/model.py and layers.py (BFL's flux/model.py, names kept) under
  `diffusion_model.`; text encoders comfy/text_encoders/flux.py `FluxClipModel`: `clip_l` (sd1_clip's
  SDClipModel, `clip_l.transformer.text_model.…`) and `t5xxl` (comfy/text_encoders/t5.py:
  `t5xxl.transformer.encoder.block.N.layer.0.SelfAttention.q`, `….layer.1.DenseReluDense.wi_0`, …).
* lllyasviel/stable-diffusion-webui-forge (stored commit dfdcbab6): backend/patcher/lora.py
  (`model_lora_keys_unet` / `model_lora_keys_clip` call packages_3rdparty/comfyui_lora_collection/lora.py,
  a copy of ComfyUI's maps that gives every T5 weight `lora_te3_` and `lora_te2_`; backend/patcher/lora.py
  adds `lora_te1_`/`lora_te2_`/`lora_te3_` for T5 again; `load_lora` returns the keys left over, loading
  the UNet keys first and the rest against the clip map; `merge_lora_to_weight`: ComfyUI's formula, except
  that a product of too few columns is zero-padded instead of dropped, for FluxTools' wider img_in). Its
  FLUX model is backend/nn/flux.py (BFL names) under `diffusion_model.` (backend/modules/k_model.py), text
  encoders backend/patcher/clip.py `JointTextEncoder({"clip_l", "t5xxl"})` of backend/nn/clip.py
  (`transformer.text_model.…`) and backend/nn/t5.py (ComfyUI's T5 names); `ModelPatcher.add_patches`
  keeps only patches whose target is one of the model's parameters.

The model's weights are written here from the FLUX.1 architecture (`bfl_flux_shapes`, BFL's `FluxParams`)
and the text encoders' configs, not from our own diffusers → BFL conversion, so the test checks that too.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import torch

from tests.helpers.webui_keys import LORA_CLIP_MAP  # comfy/lora.py's: the CLIP layers with kohya names

Shapes = dict[str, tuple[int, ...]]
UI = Literal["ComfyUI", "Forge"]

# What else load_lora consumes for a key of the map with a `.lora_up.weight` (we write none of these).
_EXTRAS = (".lora_mid.weight", ".dora_scale")


# ---------------------------------------------------------------------------------------------------------
# The model both UIs patch: BFL's FLUX transformer, ComfyUI's / Forge's CLIP-L and T5 modules
# ---------------------------------------------------------------------------------------------------------


def _linear(out: Shapes, path: str, in_features: int, out_features: int, bias: bool = True) -> None:
    out[f"{path}.weight"] = (out_features, in_features)
    if bias:
        out[f"{path}.bias"] = (out_features,)


def bfl_flux_shapes(
    *,
    hidden: int,
    heads: int,
    depth: int,
    depth_single: int,
    in_channels: int,
    out_channels: int,
    vec_in_dim: int,
    context_in_dim: int,
    guidance_embed: bool,
    mlp_ratio: float = 4.0,
) -> Shapes:
    """Every parameter of BFL's `Flux(FluxParams)` (flux/model.py, modules/layers.py; ComfyUI's and Forge's
    copies keep the names), key → shape, without the `diffusion_model.` prefix. Patch size 1 (the 2x2
    packing is in the channels)."""
    mlp = int(hidden * mlp_ratio)
    head_dim = hidden // heads
    out: Shapes = {}
    _linear(out, "img_in", in_channels, hidden)
    for embedder, width in (("time_in", 256), ("vector_in", vec_in_dim), ("guidance_in", 256)):
        if embedder == "guidance_in" and not guidance_embed:
            continue
        _linear(out, f"{embedder}.in_layer", width, hidden)  # MLPEmbedder
        _linear(out, f"{embedder}.out_layer", hidden, hidden)
    _linear(out, "txt_in", context_in_dim, hidden)
    for i in range(depth):  # DoubleStreamBlock
        for stream in ("img", "txt"):
            b = f"double_blocks.{i}.{stream}"
            _linear(out, f"{b}_mod.lin", hidden, 6 * hidden)  # Modulation(double=True)
            _linear(out, f"{b}_attn.qkv", hidden, 3 * hidden)  # SelfAttention(qkv_bias=True)
            out[f"{b}_attn.norm.query_norm.scale"] = (head_dim,)
            out[f"{b}_attn.norm.key_norm.scale"] = (head_dim,)
            _linear(out, f"{b}_attn.proj", hidden, hidden)
            _linear(out, f"{b}_mlp.0", hidden, mlp)
            _linear(out, f"{b}_mlp.2", mlp, hidden)
    for i in range(depth_single):  # SingleStreamBlock
        b = f"single_blocks.{i}"
        _linear(out, f"{b}.linear1", hidden, 3 * hidden + mlp)
        _linear(out, f"{b}.linear2", hidden + mlp, hidden)
        out[f"{b}.norm.query_norm.scale"] = (head_dim,)
        out[f"{b}.norm.key_norm.scale"] = (head_dim,)
        _linear(out, f"{b}.modulation.lin", hidden, 3 * hidden)  # Modulation(double=False)
    _linear(out, "final_layer.linear", hidden, out_channels)  # LastLayer
    _linear(out, "final_layer.adaLN_modulation.1", hidden, 2 * hidden)
    return out


def bfl_shapes_of(config: Mapping) -> Shapes:
    """`bfl_flux_shapes` of the model a diffusers FluxTransformer2DModel config describes."""
    return bfl_flux_shapes(
        hidden=config["num_attention_heads"] * config["attention_head_dim"],
        heads=config["num_attention_heads"],
        depth=config["num_layers"],
        depth_single=config["num_single_layers"],
        in_channels=config["in_channels"],
        out_channels=config["patch_size"] ** 2 * (config["out_channels"] or config["in_channels"]),
        vec_in_dim=config["pooled_projection_dim"],
        context_in_dim=config["joint_attention_dim"],
        guidance_embed=config["guidance_embeds"],
    )


def clip_l_shapes(hidden: int, intermediate: int, layers: int) -> Shapes:
    """The Linears of the CLIP-L encoder layers, as `clip_l.transformer.text_model.encoder.layers.N.…`."""
    out: Shapes = {}
    for b in range(layers):
        prefix = f"clip_l.transformer.text_model.encoder.layers.{b}"
        for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
            _linear(out, f"{prefix}.self_attn.{name}", hidden, hidden)
        _linear(out, f"{prefix}.mlp.fc1", hidden, intermediate)
        _linear(out, f"{prefix}.mlp.fc2", intermediate, hidden)
    return out


def t5_shapes(d_model: int, d_kv: int, heads: int, d_ff: int, layers: int, vocab: int = 32128) -> Shapes:
    """Every parameter of ComfyUI's (and Forge's) gated T5 encoder, as `t5xxl.transformer.…`."""
    inner = d_kv * heads
    out: Shapes = {"t5xxl.transformer.shared.weight": (vocab, d_model)}
    for i in range(layers):
        b = f"t5xxl.transformer.encoder.block.{i}.layer"
        for name in "qkvo":
            in_f, out_f = (inner, d_model) if name == "o" else (d_model, inner)
            _linear(out, f"{b}.0.SelfAttention.{name}", in_f, out_f, bias=False)
        out[f"{b}.0.layer_norm.weight"] = (d_model,)
        _linear(out, f"{b}.1.DenseReluDense.wi_0", d_model, d_ff, bias=False)
        _linear(out, f"{b}.1.DenseReluDense.wi_1", d_model, d_ff, bias=False)
        _linear(out, f"{b}.1.DenseReluDense.wo", d_ff, d_model, bias=False)
        out[f"{b}.1.layer_norm.weight"] = (d_model,)
    out["t5xxl.transformer.encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"] = (
        32,
        heads,
    )
    out["t5xxl.transformer.encoder.final_layer_norm.weight"] = (d_model,)
    return out


# ---------------------------------------------------------------------------------------------------------
# The key maps
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class UiModel:
    ui: UI
    unet_map: dict[str, str]  # LoRA key (no suffix) → the model weight it patches
    clip_map: dict[str, str]
    weights: Shapes  # the model's parameters (`diffusion_model.…`, `clip_l.…`, `t5xxl.…`)


def model_lora_keys_unet(sdk: Shapes) -> dict[str, str]:
    key_map = {}
    for k in sdk:
        if k.startswith("diffusion_model.") and k.endswith(".weight"):
            key_lora = k[len("diffusion_model.") : -len(".weight")].replace(".", "_")
            key_map[f"lora_unet_{key_lora}"] = k
            key_map[k[: -len(".weight")]] = k  # "generic lora format without any weird key names"
    return key_map


def model_lora_keys_clip(sdk: Shapes, ui: UI) -> dict[str, str]:
    key_map = {}
    clip_l_present = False
    for b in range(32):
        for c, name in LORA_CLIP_MAP.items():
            k = f"clip_l.transformer.text_model.encoder.layers.{b}.{c}.weight"
            if k in sdk:
                key_map[f"lora_te_text_model_encoder_layers_{b}_{name}"] = k
                key_map[f"lora_te1_text_model_encoder_layers_{b}_{name}"] = k
                key_map[f"text_encoder.text_model.encoder.layers.{b}.{c}"] = k
                clip_l_present = True
    for k in sdk:
        if k.endswith(".weight") and k.startswith("t5xxl.transformer."):
            l_key = k[len("t5xxl.transformer.") : -len(".weight")].replace(".", "_")
            if ui == "ComfyUI":  # t5_index: 1, +1 for clip_l (FLUX has no clip_g) → te2 and te3
                indices = (2, 3) if clip_l_present else (1,)
            else:  # Forge: te3 and te2 in its ComfyUI copy, te1..te3 in backend/patcher/lora.py
                indices = (1, 2, 3)
            for index in indices:
                key_map[f"lora_te{index}_{l_key}"] = k
    return key_map


def ui_model(ui: UI, transformer: Shapes, text_encoders: Shapes) -> UiModel:
    """The key maps `ui` builds for FLUX.1 with these weights (`transformer` without its prefix)."""
    weights = {f"diffusion_model.{k}": v for k, v in transformer.items()} | dict(text_encoders)
    return UiModel(ui, model_lora_keys_unet(weights), model_lora_keys_clip(weights, ui), weights)


# ---------------------------------------------------------------------------------------------------------
# Loading a file and applying it
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Patch:
    up: torch.Tensor
    down: torch.Tensor
    alpha: float | None


def load_lora(lora: Mapping[str, torch.Tensor], model: UiModel) -> tuple[dict[str, Patch], list[str]]:
    """(patches by target weight, keys of the file left unloaded). ComfyUI loads against one map, the UNet
    and clip maps together; Forge loads the UNet map first, then what is left against the clip map. Both
    then drop patches whose target the model does not have (`add_patches`); those keys count as unloaded."""
    maps = [model.unet_map | model.clip_map] if model.ui == "ComfyUI" else [model.unet_map, model.clip_map]
    remaining = dict(lora)
    patches: dict[str, Patch] = {}
    dropped: list[str] = []
    for key_map in maps:
        loaded: set[str] = set()
        for x, target in key_map.items():
            alpha = None
            if f"{x}.alpha" in remaining:
                alpha = remaining[f"{x}.alpha"].item()
                loaded.add(f"{x}.alpha")
            if f"{x}.lora_up.weight" in remaining:
                # load_lora indexes the down weight unconditionally: a file without it would raise here.
                up, down = remaining[f"{x}.lora_up.weight"], remaining[f"{x}.lora_down.weight"]
                loaded |= {f"{x}.lora_up.weight", f"{x}.lora_down.weight"}
                if target in model.weights:
                    patches[target] = Patch(up, down, alpha)
                else:
                    dropped.append(x)
                extras = _EXTRAS + ((".reshape_weight",) if model.ui == "ComfyUI" else ())
                loaded |= {f"{x}{suffix}" for suffix in extras if f"{x}{suffix}" in remaining}
        remaining = {k: v for k, v in remaining.items() if k not in loaded}
    return patches, sorted([*remaining, *dropped])


def patched_weight(ui: UI, weight: torch.Tensor, patch: Patch, strength: float = 1.0) -> torch.Tensor:
    """The weight after the patch (fp32), or ValueError where ComfyUI logs "ERROR lora …" and skips it."""
    scale = patch.alpha / patch.down.shape[0] if patch.alpha is not None else 1.0
    diff = patch.up.flatten(start_dim=1).float() @ patch.down.flatten(start_dim=1).float()
    weight = weight.float().clone()
    if diff.numel() != weight.numel():
        if ui == "Forge" and diff.shape[0] == weight.shape[0] and diff.shape[1] < weight.shape[1]:
            diff = torch.nn.functional.pad(diff, (0, weight.shape[1] - diff.shape[1]))
        else:
            raise ValueError(f"{tuple(diff.shape)} does not reshape to {tuple(weight.shape)}")
    return weight + strength * scale * diff.reshape(weight.shape)
