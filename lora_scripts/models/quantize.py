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
    flatten = getattr(type(tensor), "__tensor_flatten__", None)
    if flatten is None:
        return tensor.numel() * tensor.element_size()
    names, _ = tensor.__tensor_flatten__()  # a tensor subclass (quanto's): the tensors it is made of
    return sum(_tensor_bytes(getattr(tensor, name)) for name in names)


def quantize_frozen(module: nn.Module, kind: str) -> None:
    """Replace the weights of the nn.Linear and nn.Conv2d layers inside `module` by `kind` ones ("int8" or
    "float8", e4m3) with a scale per output channel, in place. Call it on the frozen model before LoRA is
    added: the LoRA layers added afterwards stay in full precision. Biases and norms keep their dtype."""
    from optimum.quanto import freeze, qfloat8, qint8, quantize

    weights = {"int8": qint8, "float8": qfloat8}[kind]
    quantize(module, weights=weights)
    freeze(module)  # quantize the weights now (quanto otherwise keeps the float ones until the first call)
