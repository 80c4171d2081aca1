"""Write LoRA files the way kohya sd-scripts does, for real modules of the tiny model, and compute what
applying them must do to each weight.

sd-scripts' layout: `lora_unet_<module path with _>` / `lora_te_text_model_<path>` with `.lora_down.weight`
[rank, in] (LoCon conv: [rank, in, kh, kw]), `.lora_up.weight` [out, rank] ([out, rank, 1, 1]) and a scalar
`.alpha`, all in fp16, plus `ss_*` and `sshs_*` metadata.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import safetensors.torch
import torch

from lora_scripts.export.hashes import precalculate_hashes

# Modules of the tiny SD-1.x model (diffusers names) a "LoRA" / "LoCon" file adapts.
UNET_ATTENTION = [
    "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
    "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k",
    "up_blocks.1.attentions.1.transformer_blocks.0.attn1.to_out.0",
    "down_blocks.0.attentions.0.proj_in",  # a 1x1 Conv2d in SD 1.x, stored 4-D like sd-scripts does
]
TEXT_ENCODER = ["encoder.layers.0.self_attn.q_proj"]  # only q_proj: the case diffusers' own conversion fails
UNET_CONV = [
    "down_blocks.0.resnets.0.conv1",
    "up_blocks.1.resnets.0.conv1",
    "up_blocks.1.resnets.0.conv_shortcut",
]


@dataclass(frozen=True)
class KohyaModule:
    component: str  # "unet" / "text_encoder"
    name: str  # diffusers / transformers module name
    down: torch.Tensor
    up: torch.Tensor
    alpha: float

    def delta(self) -> torch.Tensor:
        """`(alpha / rank) * up @ down` in the module weight's shape (fp32)."""
        down, up = self.down.float(), self.up.float()
        product = up.flatten(1) @ down.flatten(1)
        if down.dim() == 4:
            product = product.reshape(up.shape[0], *down.shape[1:])
        return (self.alpha / down.shape[0]) * product


def kohya_key(component: str, name: str) -> str:
    if component == "unet":
        return "lora_unet_" + name.replace(".", "_")
    return "lora_te_" + ("text_model." + name.removeprefix("text_model.")).replace(".", "_")


def make_modules(
    pipe,
    unet_names: list[str],
    te_names: list[str],
    *,
    rank: int,
    alpha: float,
    seed: int,
    scale: float = 0.3,
) -> list[KohyaModule]:
    """Random fp16 down/up pairs for the named modules of `pipe` (shapes from the modules themselves)."""
    generator = torch.Generator().manual_seed(seed)
    modules = []
    for component, names in (("unet", unet_names), ("text_encoder", te_names)):
        model = getattr(pipe, component)
        for name in names:
            weight = model.get_submodule(name).weight
            if weight.dim() == 4:
                down_shape, up_shape = (
                    (rank, weight.shape[1], *weight.shape[2:]),
                    (weight.shape[0], rank, 1, 1),
                )
            else:
                down_shape, up_shape = (rank, weight.shape[1]), (weight.shape[0], rank)
            down = (torch.randn(down_shape, generator=generator) * scale).half()
            up = (torch.randn(up_shape, generator=generator) * scale).half()
            modules.append(KohyaModule(component, name, down, up, alpha))
    return modules


def write_kohya_file(path: Path, modules: list[KohyaModule], *, output_name: str | None = None) -> Path:
    """Save `modules` in sd-scripts' layout with its metadata (sshs hashes computed as sd-scripts does)."""
    tensors = {}
    for module in modules:
        key = kohya_key(module.component, module.name)
        tensors[f"{key}.lora_down.weight"] = module.down.contiguous()
        tensors[f"{key}.lora_up.weight"] = module.up.contiguous()
        tensors[f"{key}.alpha"] = torch.tensor(module.alpha, dtype=torch.float16)
    metadata = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(modules[0].down.shape[0]),
        "ss_network_alpha": str(modules[0].alpha),
        "ss_output_name": output_name or path.stem,
    }
    metadata["sshs_model_hash"], metadata["sshs_legacy_hash"] = precalculate_hashes(tensors, metadata)
    path.parent.mkdir(parents=True, exist_ok=True)
    safetensors.torch.save_file(tensors, str(path), metadata=metadata)
    return path
