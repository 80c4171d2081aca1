"""Frozen base weights stored in 8 bits (config key `quantize_base`), through optimum-quanto.

Why quanto and not bitsandbytes: bitsandbytes' 8-bit layers replace nn.Linear only, and most of SD 1.5's
UNet is convolutions (589 M of its 860 M parameters). quanto quantizes the weights of nn.Linear and nn.Conv2d
alike (one scale per output channel) and dequantizes them where they are used, in the forward and the
backward. Its layers stay nn.Linear / nn.Conv2d subclasses, so peft wraps them with LoRA as it wraps the
originals; ai-toolkit trains its LoRAs on quanto-quantized models the same way.
"""

from __future__ import annotations

import importlib.util

import torch
from torch import nn

QUANTO_PACKAGE = "optimum.quanto"
INSTALL_HINT = "pip install optimum-quanto"


def quanto_available() -> bool:
    """optimum-quanto can be imported (checked without importing it)."""
    try:
        return importlib.util.find_spec(QUANTO_PACKAGE) is not None
    except ModuleNotFoundError:  # `optimum` itself is missing
        return False


def stored_bytes(module: nn.Module) -> int:
    """Bytes held by `module`'s parameters and buffers, counting a quantized weight by what it stores (its
    8-bit data and its scales), not by the float tensor it stands for."""
    return sum(_tensor_bytes(t) for t in (*module.parameters(), *module.buffers()))


def _tensor_bytes(tensor: torch.Tensor) -> int:
    if not hasattr(type(tensor), "__tensor_flatten__"):
        return tensor.numel() * tensor.element_size()
    names, _ = tensor.__tensor_flatten__()  # a tensor subclass (quanto's): the tensors it is made of
    return sum(_tensor_bytes(getattr(tensor, name)) for name in names)


def quantize_frozen(module: nn.Module, kind: str) -> None:
    """Replace the weights of the frozen nn.Linear and nn.Conv2d layers inside `module` by `kind` ones
    ("int8" or "float8", e4m3) with a scale per output channel, in place. Layers with a trainable parameter
    (the LoRA's, when it is already added) keep theirs. Biases and norms keep their dtype.

    Call it after LoRA is added: peft builds a conv LoRA's down layer with the type of the layer it wraps,
    which would be quanto's QConv2d, without weights, on a model quantized first."""
    from optimum.quanto import freeze, qfloat8, qint8, quantize

    trainable = {
        name
        for name, layer in module.named_modules()
        if any(p.requires_grad for p in layer.parameters(recurse=False))
    }
    quantize(module, weights={"int8": qint8, "float8": qfloat8}[kind], exclude=sorted(trainable) or None)
    freeze(module)  # quantize the weights now (quanto otherwise keeps the float ones until the first call)
    # quanto's quantized weights are new Parameters with requires_grad=True: freeze them again (else the
    # optimizer would be handed the 8-bit base weights).
    from optimum.quanto.nn import QLinear

    for layer_name, layer in module.named_modules():
        if layer_name not in trainable:
            for param in layer.parameters(recurse=False):
                param.requires_grad_(False)
        if isinstance(layer, QLinear):
            layer.register_forward_pre_hook(_contiguous_on_cpu)


def _contiguous_on_cpu(layer: nn.Module, args: tuple) -> tuple | None:
    """quanto's CPU kernel for bf16 inputs (`torch._weight_int8pack_mm`) refuses an input whose last
    dimension is strided: "A must be contiguous on the last dimension". SDXL's linear proj_in gets one (the
    feature map permuted to [B, H*W, C], a view), so bf16 training with int8 weights failed on a CPU. Other
    devices and dtypes take any layout; the copy is made only where it is needed."""
    x = args[0]
    if x.device.type == "cpu" and x.dim() > 0 and x.stride(-1) != 1:
        return (x.contiguous(), *args[1:])
    return None
