"""LyCORIS LoHa / LoKr and DoRA files applied as AUTOMATIC1111's WebUI and ComfyUI apply them: each layer's
weight is patched in place to `W + Σ w · ΔW`, summed over the active files, where ΔW is the module's
`LoraModule.update(float32, weight=W)` (export/lora_model.py; DoRA's is its DoRA weight minus W, so the
multiplier w scales the whole DoRA change, as both UIs scale it) and w the file's text-encoder or UNet weight.

diffusers and peft cannot load these files (peft's LoHa / LoKr / DoRA layers are other parametrisations), so
unlike plain LoRAs (generation/lora_apply.py) they change no module structure: only weights. The math is fp32
from the original weight and the result is cast back to the weight's dtype. The original of every patched
layer is kept on the CPU (as A1111 keeps its backups: no second copy on the GPU) in a store on the pipeline
itself, so every change of weights (a weight grid's next column) patches again from the originals, and
`restore_layers` puts them back bit for bit; a layer is in the store exactly while it is patched.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from diffusers import DiffusionPipeline
from torch import nn

from lora_scripts.export.lora_model import DENOISERS, LoraModule

# The pipeline attribute that holds {layer: original weight (CPU, its own dtype)} while layers are patched.
_STORE = "_lora_scripts_original_weights"


@dataclass(frozen=True, eq=False)
class LayerPatch:
    """One module of a file on the live layer it changes (a Linear or Conv2d; under a peft wrapper, its base
    layer), its tensors already on the layer's device."""

    layer: nn.Module
    module: LoraModule


def module_on(module: LoraModule, device: torch.device) -> LoraModule:
    """`module` with its tensors moved to `device` (they are small: ΔW is computed there, at each patch)."""

    def moved(tensor: torch.Tensor | None) -> torch.Tensor | None:
        return None if tensor is None else tensor.to(device)

    return LoraModule(
        module.component,
        module.path,
        moved(module.down),
        moved(module.up),
        module.alpha,
        source=module.source,
        factors={name: tensor.to(device) for name, tensor in module.factors.items()},
        dora_scale=moved(module.dora_scale),
        shape=module.shape,
    )


def patchable(layer: nn.Module) -> bool:
    """Whether the layer's weight is a plain floating-point tensor in memory (not a quantized one, nor one
    an offloading hook keeps on the meta device), which a patch can rewrite and restore."""
    weight = getattr(layer, "weight", None)
    return (
        isinstance(weight, torch.Tensor)
        and type(weight.data) is torch.Tensor
        and weight.dtype.is_floating_point
        and weight.device.type != "meta"
    )


def patch_weights(
    pipe: DiffusionPipeline, active: Sequence[tuple[Sequence[LayerPatch], float, float]]
) -> None:
    """Make every patched layer `W + Σ w · ΔW` over `active` (each file's patches at (te_weight,
    unet_weight)); a layer no active file changes, or only at weight 0, gets its original weight back."""
    terms: dict[nn.Module, list[tuple[LoraModule, float]]] = {}
    for patches, te_weight, unet_weight in active:
        for patch in patches:
            weight = unet_weight if patch.module.component in DENOISERS else te_weight
            terms.setdefault(patch.layer, [])
            if weight != 0:
                terms[patch.layer].append((patch.module, weight))
    store = _originals(pipe)
    restore_layers(pipe, [layer for layer in store if not terms.get(layer)])
    for layer, modules in terms.items():
        if modules:
            _patch(layer, modules, store)


def restore_layers(pipe: DiffusionPipeline, layers: Iterable[nn.Module]) -> None:
    """Give these layers (those of them that are patched) their original weights back, bit for bit."""
    store = _originals(pipe)
    with torch.no_grad():
        for layer in layers:
            original = store.pop(layer, None)
            if original is not None:
                layer.weight.copy_(original)


def _patch(
    layer: nn.Module, modules: list[tuple[LoraModule, float]], store: dict[nn.Module, torch.Tensor]
) -> None:
    weight = layer.weight
    if layer not in store:
        store[layer] = weight.detach().to("cpu", copy=True)
    base = store[layer].to(weight.device, torch.float32)
    patched = base.clone()
    for module, multiplier in modules:
        patched += multiplier * module.update(torch.float32, weight=base)
    with torch.no_grad():
        weight.copy_(patched.to(weight.dtype))


def _originals(pipe: DiffusionPipeline) -> dict[nn.Module, torch.Tensor]:
    store = pipe.__dict__.get(_STORE)
    if store is None:
        store = {}
        setattr(pipe, _STORE, store)
    return store
