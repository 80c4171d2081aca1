"""FLUX.1's parts from the single files ComfyUI users have, as diffusers/transformers modules (flux_loading's
helpers).

The files: BFL's transformer (`double_blocks.*`, bare or under `model.diffusion_model.`, fp16/bf16 or fp8),
BFL's `ae.safetensors` VAE (the LDM VAE layout, no quant convs), ComfyUI's `clip_l.safetensors` (transformers'
CLIPTextModel layout) and `t5xxl_*.safetensors` (transformers' T5EncoderModel layout), and ComfyUI's
all-in-one checkpoints holding all four under prefixes. Each part is read on its own (a .safetensors file
lazily, key by key) and cast to the load dtype tensor by tensor, so no part is held twice at full size.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import init_empty_weights
from diffusers.loaders.single_file_utils import (
    convert_flux_transformer_checkpoint_to_diffusers,
    convert_ldm_vae_checkpoint,
)
from safetensors import safe_open

from lora_scripts.errors import UserError
from lora_scripts.models.detect import (
    COMFY_CLIP_L_PREFIX,
    COMFY_T5XXL_PREFIX,
    LDM_UNET_PREFIX,
    SGM_PREFIX,
    VAE_PREFIX,
    checkpoint_shapes,
    flux_prefix,
    read_checkpoint,
)
from lora_scripts.models.sd_loading import load_into

FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
# diffusers' converter splits each single block's fused linear1 (q, k, v, mlp) at FLUX.1's widths (3072 and
# 4 * 3072), so we split it at the config's widths ourselves and hand the converter stand-ins of its size.
FLUX1_INNER_DIM = 3072
BFL_VAE_MARKER = "decoder.conv_out.weight"  # LDM/BFL layout and diffusers' layout alike
CLIP_MARKER = "embeddings.token_embedding.weight"
T5_MARKER = "encoder.block.0.layer.0.SelfAttention.q.weight"
# What a user's file is, by a key only that kind of file has (for "clip_l: '...' is a VAE, not ...").
_KINDS = (
    ("a LoRA", ("lora_unet_", "lora_te", "lora_transformer_")),
    ("a Stable Diffusion checkpoint", (LDM_UNET_PREFIX + "input_blocks.", SGM_PREFIX, "cond_stage_model.")),
)


@dataclass
class PartFile:
    """One single file given for a FLUX.1 part (`key`: the config key that named it, for messages): its
    header, and its tensors by prefix. A .safetensors file is read lazily; another format whole, once."""

    path: Path
    key: str
    shapes: dict[str, Any] = field(init=False)
    _tensors: dict[str, torch.Tensor] | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        if not self.path.is_file():
            raise UserError(
                f"{self.key}: '{self.path}' does not exist; check the path (relative paths start from the "
                "current directory)."
            )
        if self.path.suffix.lower() == ".safetensors":
            try:
                self.shapes = checkpoint_shapes(self.path)
                return
            except UserError:
                pass  # read_checkpoint below words the error with this key
        self._tensors = read_checkpoint(self.path, self.key)
        self.shapes = dict(self._tensors)

    def has(self, prefix: str) -> bool:
        return any(name.startswith(prefix) for name in self.shapes)

    def tensors(self, prefix: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """The tensors under `prefix`, prefix removed, each cast to `dtype` (fp8 upcast) as it is read."""
        names = [name for name in self.shapes if name.startswith(prefix)]
        if self._tensors is not None:
            return {name[len(prefix) :]: _cast(self._tensors[name], dtype) for name in names}
        with safe_open(self.path, framework="pt") as handle:
            return {name[len(prefix) :]: _cast(handle.get_tensor(name), dtype) for name in names}

    def kind(self) -> str | None:
        """What the file is when it is a whole model or a LoRA ("a FLUX.1 checkpoint", ...), else None."""
        if flux_prefix(self.shapes.keys()) is not None:
            return "a FLUX.1 transformer checkpoint"
        for kind, prefixes in _KINDS:
            if any(name.startswith(prefixes) for name in self.shapes):
                return kind
        return None


def _cast(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return tensor.to(dtype) if tensor.is_floating_point() else tensor


def transformer_weights(
    file: PartFile, config: dict[str, Any], dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """The FLUX.1 transformer of a BFL-layout file as FluxTransformer2DModel tensors in `dtype`, converted
    by diffusers' `convert_flux_transformer_checkpoint_to_diffusers` (single blocks' linear1 split at the
    config's width, see FLUX1_INNER_DIM)."""
    prefix = flux_prefix(file.shapes.keys())
    checkpoint = file.tensors(prefix or "", dtype)
    inner_dim = config["num_attention_heads"] * config["attention_head_dim"]
    fused = {}
    for name in [n for n in checkpoint if n.startswith("single_blocks.") and ".linear1." in n]:
        tensor = checkpoint.pop(name)
        if tensor.shape[0] < 3 * inner_dim:
            raise UserError(
                f"{file.key}: '{file.path}' has a FLUX transformer whose '{name}' is "
                f"{tuple(tensor.shape)}, too small for the {inner_dim}-wide config; the file is damaged or "
                "not FLUX.1."
            )
        fused[name] = tensor
        stand_in = (7 * FLUX1_INNER_DIM,) + ((0,) if tensor.dim() == 2 else ())
        checkpoint[name] = torch.empty(stand_in, device="meta")
    try:
        converted = convert_flux_transformer_checkpoint_to_diffusers(checkpoint)
    except KeyError as err:
        raise UserError(
            f"{file.key}: '{file.path}' lacks the FLUX.1 transformer weight {err}; the file is damaged or an "
            "unsupported variant."
        ) from err
    for name, tensor in fused.items():
        block = "single_transformer_blocks." + name.split(".")[1] + "."
        kind = name.rsplit(".", 1)[1]
        sizes = (inner_dim, inner_dim, inner_dim, tensor.shape[0] - 3 * inner_dim)
        for part, piece in zip(
            ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"), tensor.split(sizes), strict=True
        ):
            converted[f"{block}{part}.{kind}"] = piece.contiguous()
    return converted


def vae_prefix(file: PartFile) -> str | None:
    """Where a file keeps FLUX's VAE: "" (ae.safetensors, or a diffusers-layout VAE file), VAE_PREFIX (an
    all-in-one checkpoint) or "vae." ; None when it has none."""
    for prefix in ("", VAE_PREFIX, "vae."):
        if prefix + BFL_VAE_MARKER in file.shapes:
            return prefix
    return None


def vae_weights(
    file: PartFile, prefix: str, vae_config: dict[str, Any], dtype: torch.dtype
) -> dict[str, Any]:
    """AutoencoderKL tensors from BFL's/LDM's VAE layout, converted by diffusers' `convert_ldm_vae_checkpoint`
    (what its from_single_file uses for FLUX's VAE); a diffusers-layout file passes through."""
    tensors = file.tensors(prefix, dtype)
    if any(name.startswith("encoder.down_blocks.") for name in tensors):
        return tensors
    return convert_ldm_vae_checkpoint(tensors, vae_config)


def clip_prefix(file: PartFile) -> str | None:
    """The prefix before CLIP's `embeddings.*` (e.g. "text_model.", "transformer.text_model.", "" or the
    all-in-one's COMFY_CLIP_L_PREFIX + "text_model."); None when the file has no CLIP text encoder."""
    found = [name[: -len(CLIP_MARKER)] for name in file.shapes if name.endswith(CLIP_MARKER)]
    if COMFY_CLIP_L_PREFIX + "text_model." in found:
        return COMFY_CLIP_L_PREFIX + "text_model."
    return found[0] if len(found) == 1 else None


def clip_weights(file: PartFile, prefix: str, model: torch.nn.Module, dtype: torch.dtype) -> dict[str, Any]:
    """CLIPTextModel tensors named as `model` names them (transformers >= 5.6 dropped `text_model.`); the
    projection and logit scale some files carry (CLIP's full model) and `position_ids` are dropped."""
    outer = prefix.removesuffix("text_model.")
    wrapped = any(name.startswith("text_model.") for name in model.state_dict())
    weights = {}
    for name, tensor in file.tensors(outer, dtype).items():
        bare = name.removeprefix("text_model.")
        if bare.startswith(("text_projection", "logit_scale", "vision_model.", "visual_projection")):
            continue
        if bare.endswith("position_ids"):
            continue
        weights["text_model." + bare if wrapped else bare] = tensor
    return weights


def t5_prefix(file: PartFile) -> str | None:
    """The prefix before T5's `encoder.block.*` ("" or the all-in-one's COMFY_T5XXL_PREFIX); None if none."""
    found = [name[: -len(T5_MARKER)] for name in file.shapes if name.endswith(T5_MARKER)]
    if COMFY_T5XXL_PREFIX in found:
        return COMFY_T5XXL_PREFIX
    return found[0] if len(found) == 1 else None


def t5_weights(file: PartFile, prefix: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """T5EncoderModel tensors: the token embedding as both `shared.weight` and `encoder.embed_tokens.weight`
    (files store either or both; the model ties them); a full T5's decoder and LM head are dropped."""
    weights = {
        name: tensor
        for name, tensor in file.tensors(prefix, dtype).items()
        if not name.startswith(("decoder.", "lm_head."))
    }
    embedding = weights.get("shared.weight", weights.get("encoder.embed_tokens.weight"))
    if embedding is not None:
        weights["shared.weight"] = weights["encoder.embed_tokens.weight"] = embedding
    return weights


def assign_weights(
    build: Any, weights: dict[str, torch.Tensor], file: PartFile, component: str
) -> torch.nn.Module:
    """`build()` on the meta device, then `weights` assigned strictly (no copy); a mismatch is a UserError
    naming `file.key`, the file and the first offending tensor."""
    with init_empty_weights():
        module = build()
    load_into(module, weights, file.path, component, key=file.key)
    return module
