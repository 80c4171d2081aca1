"""peft LoRA weights → the kohya/sd-scripts key layout that A1111, ComfyUI and diffusers all load.

Layout per adapted module (e.g. UNet `down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q`):
    lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight  [r, in]
    lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_up.weight    [out, r]
    lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.alpha             [] (scalar)
Convs (1x1 proj_in/proj_out of SD 1.x; LoCon's 3x3 resnet and sampler convs) keep 4-D weights:
    lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight  [r, in, 3, 3]
    lora_unet_down_blocks_0_resnets_0_conv1.lora_up.weight    [out, r, 1, 1]
SDXL's UNet modules go by their sgm paths instead, as sd-scripts writes them (export/sdxl_keys.py):
    lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_down.weight
The file holds nothing else: diffusers converts a kohya file only when every key has these prefixes.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from peft.tuners.lora import LoraLayer
from peft.tuners.lycoris_utils import LycorisLayer
from torch import nn

from lora_scripts.export.fused import FusedPart, PartLora, fuse
from lora_scripts.export.lycoris import (
    DORA_KEY,
    LOHA_KEYS,
    LOKR_KEYS,
    dora_scale_shape,
    factor_kind,
    factors_rank,
)

# The adapter name every trained network carries (peft's default).
ADAPTER_NAME = "default"
# The attribute of a peft LoRA layer holding its DoRA magnitudes (models/dora.py), a ParameterDict by adapter.
DORA_PARAMETER = "lora_dora_scale"


@dataclass(frozen=True)
class LoraNetwork:
    """One model component carrying a peft LoRA adapter, and how its modules are named in kohya files.

    `kohya_prefix` is "lora_unet" or "lora_te" (SDXL: "lora_te1"/"lora_te2"). A module's kohya name is the
    prefix, "_", and its `kohya_path` with dots made underscores. The kohya path is the module path with
    `name_prefix` prepended (transformers ≥ 5's CLIPTextModel has no `.text_model` submodule, but A1111 and
    ComfyUI only recognise `lora_te_text_model_…` keys: see `clip_name_prefix`), or, when given, `key_map` of
    the module path: a layout whose files name modules otherwise than the model does (SDXL's UNet: sgm paths,
    export/sdxl_keys.py). One or the other, not both.
    """

    kohya_prefix: str
    module: nn.Module
    name_prefix: str = ""
    adapter_name: str = ADAPTER_NAME
    key_map: Callable[[str], str] | None = None
    # The diffusers component files name the module by ("" : from kohya_prefix, lora_reader's
    # DIFFUSERS_COMPONENT); FLUX's transformer is "transformer".
    component: str = ""
    # For a layout that fuses layers (FLUX's BFL names): the fused layer a module path is a part of, or None.
    fusion: Callable[[str], FusedPart | None] | None = None

    def __post_init__(self) -> None:
        if self.key_map is not None and self.name_prefix:
            raise ValueError("LoraNetwork takes a name_prefix or a key_map, not both")

    def kohya_path(self, module_path: str) -> str:
        """The dotted path kohya files name the module at `module_path` of `module` by."""
        if self.key_map is not None:
            return self.key_map(module_path)
        return self.name_prefix + module_path

    def kohya_name(self, module_path: str) -> str:
        return f"{self.kohya_prefix}_{self.kohya_path(module_path).replace('.', '_')}"

    def file_path(self, module_path: str) -> str:
        """The dotted path of the module kohya files store the layer at `module_path` in: its fused layer's
        for a part of one (FLUX's `double_blocks.0.img_attn.qkv`), else `kohya_path`."""
        part = self.fusion(module_path) if self.fusion is not None else None
        return part.path if part is not None else self.kohya_path(module_path)

    def file_name(self, module_path: str) -> str:
        """`kohya_name`, or for a part of a fused layer the fused layer's name."""
        return f"{self.kohya_prefix}_{self.file_path(module_path).replace('.', '_')}"


def clip_name_prefix(text_encoder: nn.Module) -> str:
    """The `name_prefix` a transformers CLIP text encoder needs for kohya names: "text_model." when its
    module paths lack it (transformers ≥ 5's CLIPTextModel), else "" (CLIPTextModelWithProjection, and
    CLIPTextModel before transformers 5)."""
    return "" if hasattr(text_encoder, "text_model") else "text_model."


def lora_layers(network: LoraNetwork) -> list[tuple[str, LoraLayer | LycorisLayer]]:
    """(module path, peft layer) for every layer of the network's module carrying its adapter: a LoraLayer
    (LoRA, LoCon, DoRA) or a LycorisLayer (peft's LoHa, LoKr)."""
    return [
        (path, layer)
        for path, layer in network.module.named_modules()
        if (isinstance(layer, LoraLayer) and network.adapter_name in layer.lora_A)
        or (isinstance(layer, LycorisLayer) and network.adapter_name in layer._available_adapters)
    ]


def lycoris_tensors(layer: LoraLayer | LycorisLayer, adapter: str) -> tuple[dict[str, torch.Tensor], float]:
    """A LoHa / LoKr / DoRA layer's tensors by file suffix (export/lycoris.py) and the alpha to write, such
    that the update the UIs compute from them is the layer's. peft's LoHa and LoKr tensors are LyCORIS' (peft
    ported them), at peft's scale alpha / r; a LoKr whose factors are both full matrices is applied at scale 1
    by every loader, so peft's scale is folded into its first factor. A DoRA layer: its LoRA and the
    magnitude as [1, in(, 1, 1)]."""
    if isinstance(layer, LoraLayer):
        down, up = layer.lora_A[adapter].weight.detach(), layer.lora_B[adapter].weight.detach()
        magnitude = getattr(layer, DORA_PARAMETER)[adapter].detach()
        shape = dora_scale_shape(tuple(layer.get_base_layer().weight.shape))
        tensors = {"lora_down.weight": down, "lora_up.weight": up, DORA_KEY: magnitude.reshape(shape)}
        return tensors, float(layer.lora_alpha[adapter])
    tensors = {
        name: getattr(layer, name)[adapter].detach()
        for name in layer.adapter_layer_names
        if adapter in getattr(layer, name)
    }
    unknown = set(tensors) - set(LOHA_KEYS) - set(LOKR_KEYS)
    if unknown:  # Tucker factors (use_effective_conv2d), which we never ask peft for
        raise ValueError(f"{type(layer).__name__}: no file layout for {sorted(unknown)}")
    kind = factor_kind(set(tensors))
    alpha = float(layer.alpha[adapter])
    if kind == "lokr" and factors_rank(kind, tensors) is None:
        tensors["lokr_w1"] = tensors["lokr_w1"] * layer.scaling[adapter]
        alpha = 1.0
    return tensors, alpha


def kohya_state_dict(
    networks: list[LoraNetwork], dtype: torch.dtype = torch.float16
) -> dict[str, torch.Tensor]:
    """Every network's LoRA weights as a kohya state dict on CPU in `dtype`.

    Each module's alpha is its own peft layer's (`lora_alpha[adapter]`), so LoCon convs carry conv_alpha;
    kohya files store it in the file's dtype, as sd-scripts does. Linear: down [r, in], up [out, r];
    Conv2d (1x1 and 3x3): down [r, in, kh, kw], up [out, r, 1, 1].
    """
    out: dict[str, torch.Tensor] = {}
    for net in networks:
        adapter = net.adapter_name
        fused: dict[str, tuple[FusedPart, dict[int, PartLora]]] = {}
        for path, layer in lora_layers(net):
            if isinstance(layer, LycorisLayer) or getattr(layer, DORA_PARAMETER, None) is not None:
                if net.fusion is not None and net.fusion(path) is not None:
                    raise ValueError(f"{path}: only plain LoRA is written for a fused layer")
                tensors, alpha = lycoris_tensors(layer, adapter)
                cast = {suffix: tensor.to("cpu", dtype) for suffix, tensor in tensors.items()}
                write_lycoris_module(out, net.kohya_name(path), cast, alpha)
                continue
            rank, alpha = layer.r[adapter], float(layer.lora_alpha[adapter])
            # kohya's scale is alpha / rank; DoRA, rsLoRA or a bias would not survive the format.
            plain = not layer.use_dora.get(adapter, False) and not layer.lora_bias.get(adapter, False)
            if not plain or not math.isclose(layer.scaling[adapter], alpha / rank):
                raise ValueError(
                    f"{path}: only plain LoRA (scale alpha / rank) can be exported to kohya keys"
                )
            down, up = layer.lora_A[adapter].weight.detach(), layer.lora_B[adapter].weight.detach()
            part = net.fusion(path) if net.fusion is not None else None
            if part is not None:  # written below, with the other parts of its fused layer
                fused.setdefault(part.path, (part, {}))[1][part.index] = PartLora(down.cpu(), up.cpu(), alpha)
                continue
            write_module(out, net.kohya_name(path), PartLora(down, up, alpha), dtype)
        for fused_path, (part, parts) in fused.items():
            name = f"{net.kohya_prefix}_{fused_path.replace('.', '_')}"
            write_module(out, name, fuse(parts, part.sizes), dtype)
    return out


def write_module(out: dict[str, torch.Tensor], name: str, lora: PartLora, dtype: torch.dtype) -> None:
    """A module's kohya keys: `name.lora_down.weight`, `.lora_up.weight`, `.alpha`, on the CPU in `dtype`."""
    out[f"{name}.lora_down.weight"] = lora.down.to("cpu", dtype).contiguous()
    out[f"{name}.lora_up.weight"] = lora.up.to("cpu", dtype).contiguous()
    out[f"{name}.alpha"] = torch.tensor(lora.alpha, dtype=dtype)


def write_lycoris_module(
    out: dict[str, torch.Tensor], name: str, tensors: dict[str, torch.Tensor], alpha: float
) -> None:
    """A LoHa / LoKr / DoRA module's keys (export/lycoris.py): `name.<suffix>` for each tensor, on the CPU
    in its own dtype, and `name.alpha` in the first one's."""
    dtype = next(iter(tensors.values())).dtype
    for suffix, tensor in tensors.items():
        out[f"{name}.{suffix}"] = tensor.detach().to("cpu").contiguous()
    out[f"{name}.alpha"] = torch.tensor(alpha, dtype=dtype)


def count_modules(state_dict: dict[str, torch.Tensor]) -> int:
    """Number of adapted modules in a kohya state dict."""
    return sum(1 for k in state_dict if k.endswith(".alpha"))
