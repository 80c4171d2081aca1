"""FLUX.1 LoRA names as sd-scripts writes them and ComfyUI, Forge and diffusers load them: the transformer's
modules by their BFL paths (`lora_unet_double_blocks_0_img_attn_qkv`, `lora_unet_single_blocks_3_linear1`),
CLIP-L as `lora_te1_`, T5-XXL as `lora_te3_` (sd-scripts' networks/lora_flux.py prefixes).

Training adapts diffusers' FluxTransformer2DModel, whose attention has separate q, k and v Linears (and, in a
single block, a separate MLP input) where the BFL layout has one fused Linear; those modules are written as
parts of the fused layer (export/fused.py). The map is the inverse of diffusers' own BFL conversion
(`convert_flux_transformer_checkpoint_to_diffusers`): every other module is renamed one to one.
"""

from __future__ import annotations

import re

from torch import nn

from lora_scripts.export.fused import FusedPart
from lora_scripts.export.kohya import LoraNetwork, clip_name_prefix

TRANSFORMER_COMPONENT = "transformer"
_DOUBLE = re.compile(r"^transformer_blocks\.(\d+)\.(.+)$")
_SINGLE = re.compile(r"^single_transformer_blocks\.(\d+)\.(.+)$")
# diffusers path inside a double block → BFL path inside double_blocks.N
_DOUBLE_RENAMES = {
    "norm1.linear": "img_mod.lin",
    "norm1_context.linear": "txt_mod.lin",
    "attn.to_out.0": "img_attn.proj",
    "attn.to_add_out": "txt_attn.proj",
    "ff.net.0.proj": "img_mlp.0",
    "ff.net.2": "img_mlp.2",
    "ff_context.net.0.proj": "txt_mlp.0",
    "ff_context.net.2": "txt_mlp.2",
}
_DOUBLE_FUSED = {  # → (BFL path, part index); parts in BFL's output order
    "attn.to_q": ("img_attn.qkv", 0),
    "attn.to_k": ("img_attn.qkv", 1),
    "attn.to_v": ("img_attn.qkv", 2),
    "attn.add_q_proj": ("txt_attn.qkv", 0),
    "attn.add_k_proj": ("txt_attn.qkv", 1),
    "attn.add_v_proj": ("txt_attn.qkv", 2),
}
_DOUBLE_PARTS = {
    "img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
}
_SINGLE_RENAMES = {"norm.linear": "modulation.lin", "proj_out": "linear2"}
_SINGLE_FUSED = {
    "attn.to_q": ("linear1", 0),
    "attn.to_k": ("linear1", 1),
    "attn.to_v": ("linear1", 2),
    "proj_mlp": ("linear1", 3),
}
_SINGLE_PARTS = {"linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")}
# Outside the blocks (sd-scripts trains these only when asked, its `in_dims` / `train_t5xxl` options).
_TOP_RENAMES = {
    "x_embedder": "img_in",
    "context_embedder": "txt_in",
    "time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
    "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
    "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
    "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
    "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
    "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
    "proj_out": "final_layer.linear",
}


class FluxTransformerNames:
    """`key_map` and `fusion` of the transformer's network, with the fused layers' part sizes read from the
    live (or meta-device) transformer."""

    def __init__(self, transformer: nn.Module) -> None:
        self.transformer = transformer
        self._sizes: dict[str, tuple[int, ...]] = {}

    def bfl_path(self, path: str) -> str:
        """The BFL path a non-fused module is named by; ValueError for one with no BFL counterpart (the
        final norm's modulation, whose halves BFL stores swapped)."""
        if match := _DOUBLE.match(path):
            block, rest = match.groups()
            if rest in _DOUBLE_RENAMES:
                return f"double_blocks.{block}.{_DOUBLE_RENAMES[rest]}"
        elif match := _SINGLE.match(path):
            block, rest = match.groups()
            if rest in _SINGLE_RENAMES:
                return f"single_blocks.{block}.{_SINGLE_RENAMES[rest]}"
        elif path in _TOP_RENAMES:
            return _TOP_RENAMES[path]
        raise ValueError(f"{path}: FLUX LoRA files have no name for this layer")

    def fusion(self, path: str) -> FusedPart | None:
        if match := _DOUBLE.match(path):
            block, rest = match.groups()
            if rest in _DOUBLE_FUSED:
                fused, index = _DOUBLE_FUSED[rest]
                parts = [f"transformer_blocks.{block}.{p}" for p in _DOUBLE_PARTS[fused]]
                return FusedPart(f"double_blocks.{block}.{fused}", index, self._part_sizes(parts))
        elif match := _SINGLE.match(path):
            block, rest = match.groups()
            if rest in _SINGLE_FUSED:
                fused, index = _SINGLE_FUSED[rest]
                parts = [f"single_transformer_blocks.{block}.{p}" for p in _SINGLE_PARTS[fused]]
                return FusedPart(f"single_blocks.{block}.{fused}", index, self._part_sizes(parts))
        return None

    def _part_sizes(self, paths: list[str]) -> tuple[int, ...]:
        key = paths[0]
        if key not in self._sizes:
            sizes = []
            for path in paths:
                layer = self.transformer.get_submodule(path)
                layer = getattr(layer, "base_layer", layer)  # a layer peft has wrapped
                sizes.append(int(layer.out_features))
            self._sizes[key] = tuple(sizes)
        return self._sizes[key]


def flux_networks(transformer: nn.Module | None, text_encoders: list[nn.Module | None]) -> list[LoraNetwork]:
    """The networks FLUX LoRA files name these modules by: `lora_unet` (the transformer, BFL names),
    `lora_te1` (CLIP-L) and `lora_te3` (T5-XXL); None entries (a frozen encoder) are left out."""
    networks = []
    if transformer is not None:
        names = FluxTransformerNames(transformer)
        networks.append(
            LoraNetwork(
                "lora_unet",
                transformer,
                key_map=names.bfl_path,
                component=TRANSFORMER_COMPONENT,
                fusion=names.fusion,
            )
        )
    for prefix, component, encoder in zip(
        ("lora_te1", "lora_te3"), ("text_encoder", "text_encoder_2"), text_encoders, strict=False
    ):
        if encoder is not None:
            name_prefix = clip_name_prefix(encoder) if prefix == "lora_te1" else ""
            networks.append(LoraNetwork(prefix, encoder, name_prefix, component=component))
    return networks
