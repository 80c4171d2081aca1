"""DoRA as LyCORIS writes it and A1111, Forge and ComfyUI apply it: a LoRA whose merged weight is rescaled,
per input channel, to a learned magnitude (Liu et al. 2024, "DoRA: Weight-Decomposed Low-Rank Adaptation";
LyCORIS' `dora_wd`, `wd_on_output=False`): W' = (W + ΔW) · m / ‖W + ΔW‖, the norm per input channel.

Why not peft's `use_dora`: peft normalises per *output* channel, and a file with that axis means something
else in each UI (A1111 normalises per input channel whatever the file's shape; ComfyUI divides by the norm of
the original weight on that axis), so its files could not load the same everywhere. Per input channel, the
rescaling is a scaling of the layer's input: (W + ΔW)·diag(m / n)·x = (W + ΔW)·(c ⊙ x) with c = m / n, also
for a convolution (c per input channel). A forward pre-hook on peft's LoRA layer (lora.Linear / lora.Conv2d)
makes the layer compute exactly that, whatever it does next (its base layer, dropout, the LoRA path). As in
the paper and peft, the norm n is taken without gradient (the magnitude and the LoRA still learn through c).
"""

from __future__ import annotations

import torch
from peft.tuners.lora import LoraLayer
from torch import nn

from lora_scripts.export.kohya import DORA_PARAMETER
from lora_scripts.export.lycoris import input_norms


def dense_weight(layer: nn.Module) -> torch.Tensor:
    """A base layer's weight as a plain tensor (a quantize_base 8-bit weight dequantized). A meta weight (the
    shapes-only network `lora-scripts check` builds) is returned as it is: dequantize has no meta kernel."""
    weight = layer.weight
    if weight.is_meta:
        return weight
    return weight.dequantize() if hasattr(weight, "dequantize") else weight


def add_dora(module: nn.Module, adapter: str) -> None:
    """Give every peft LoRA layer of `module` carrying `adapter` a DoRA magnitude (`<layer>.lora_dora_scale
    .<adapter>`, [in], trainable, initialised to the base weight's input-channel norms so that training starts
    from the base model) and the pre-hook that applies it."""
    for layer in module.modules():
        if not isinstance(layer, LoraLayer) or adapter not in layer.lora_A:
            continue
        with torch.no_grad():
            norms = input_norms(dense_weight(layer.get_base_layer()).float()).flatten()
        magnitudes = nn.ParameterDict({adapter: nn.Parameter(norms.clone())})
        setattr(layer, DORA_PARAMETER, magnitudes)
        layer.register_forward_pre_hook(_DoraInput(adapter))


def dora_magnitude(layer: nn.Module, adapter: str) -> nn.Parameter | None:
    """The DoRA magnitude [in] of a peft LoRA layer, or None for a plain LoRA layer."""
    magnitudes = getattr(layer, DORA_PARAMETER, None)
    return None if magnitudes is None or adapter not in magnitudes else magnitudes[adapter]


class _DoraInput:
    """The pre-hook: the layer's input times c = m / ‖W + ΔW‖ (per input channel; the norm without grad)."""

    def __init__(self, adapter: str):
        self.adapter = adapter

    def __call__(self, layer: LoraLayer, args: tuple) -> tuple | None:
        if getattr(layer, "disable_adapters", False) or self.adapter not in layer.active_adapters:
            return None
        magnitude = dora_magnitude(layer, self.adapter)
        x = args[0]
        with torch.no_grad():
            weight = dense_weight(layer.get_base_layer()).float()
            delta = layer.get_delta_weight(self.adapter).float()
            norms = input_norms(weight + delta.to(weight.device)).flatten()
        scale = magnitude / norms.to(magnitude.device)
        shape = (-1,) if isinstance(layer.get_base_layer(), nn.Linear) else (1, -1, *([1] * (x.dim() - 2)))
        return (x * scale.reshape(shape).to(x.dtype), *args[1:])
