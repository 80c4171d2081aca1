"""peft LoRA weights → the kohya/sd-scripts key layout that A1111, ComfyUI and diffusers all load.

Layout per adapted module (e.g. UNet `down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q`):
    lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight  [r, in]
    lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_up.weight    [out, r]
    lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.alpha             [] (scalar)
The file holds nothing else: diffusers converts a kohya file only when every key has these prefixes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from peft.utils import get_peft_model_state_dict
from torch import nn


@dataclass(frozen=True)
class LoraNetwork:
    """One model component carrying a peft LoRA adapter, and how its modules are named in kohya files.

    `kohya_prefix` is "lora_unet" or "lora_te" (SDXL: "lora_te1"/"lora_te2"). `name_prefix` is prepended to
    the module path before the dots become underscores: transformers ≥ 5's CLIPTextModel has no `.text_model`
    submodule, but A1111 and ComfyUI only recognise `lora_te_text_model_…` keys, so the text encoder's
    family passes "text_model." when its module paths lack it.
    """

    kohya_prefix: str
    module: nn.Module
    name_prefix: str = ""
    adapter_name: str = "default"

    def kohya_name(self, module_path: str) -> str:
        return f"{self.kohya_prefix}_{(self.name_prefix + module_path).replace('.', '_')}"


def kohya_state_dict(
    networks: list[LoraNetwork], alpha: float, dtype: torch.dtype = torch.float16
) -> dict[str, torch.Tensor]:
    """Every network's LoRA weights as a kohya state dict on CPU in `dtype` (alpha too, as sd-scripts)."""
    out: dict[str, torch.Tensor] = {}
    for net in networks:
        peft_sd = get_peft_model_state_dict(
            net.module, adapter_name=net.adapter_name, save_embedding_layers=False
        )
        for key, tensor in peft_sd.items():
            module_path, sep, kind = key.rpartition(".lora_")
            if not sep or kind not in ("A.weight", "B.weight"):
                raise ValueError(f"unexpected LoRA tensor {key!r} (only plain LoRA is exported)")
            name = net.kohya_name(module_path)
            suffix = "lora_down.weight" if kind == "A.weight" else "lora_up.weight"
            out[f"{name}.{suffix}"] = tensor.detach().to("cpu", dtype).contiguous()
            out[f"{name}.alpha"] = torch.tensor(float(alpha), dtype=dtype)
    return out


def count_modules(state_dict: dict[str, torch.Tensor]) -> int:
    """Number of adapted modules in a kohya state dict."""
    return sum(1 for k in state_dict if k.endswith(".lora_down.weight"))
