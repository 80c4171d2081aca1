"""A LoRA file in memory, whatever layout it came in: its modules, each with the model component and layer it
adapts (named as diffusers names them), its down / up weights and its alpha. Read into it with
`resolve_modules` (from `lora_reader.file_modules` and a `module_index` of the family's modules); write it out
with export/lora_layouts.py. The post-training tools (merge, resize, extract, convert, inspect) and
`generate` work on this model, so no command parses keys on its own.

The update a module makes to its layer's weight W is `scale · up @ down` with `scale = alpha / rank`, as
kohya's, A1111's, ComfyUI's and peft's loaders apply it (a multiplier m makes it `m · scale · up @ down`).
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field

import torch
from torch import nn

from lora_scripts.export.fused import PartLora, split
from lora_scripts.export.lora_reader import FileModule, FusedRef, ModuleRef
from lora_scripts.export.lycoris import (
    dora_scale_shape,
    dora_weight,
    factor_kind,
    factors_rank,
    factors_scale,
    factors_shape,
    factors_update,
)

COMPONENTS = ("unet", "transformer", "text_encoder", "text_encoder_2")  # diffusers' names, in save order
DENOISERS = ("unet", "transformer")  # the components that are not text encoders (UNet, FLUX's transformer)


@dataclass
class LoraModule:
    """One adapted layer. down: [r, in] (Linear) or [r, in, kh, kw] (Conv2d, LoCon's 3x3 too); up: [out, r]
    or [out, r, 1, 1]; any dtype, as stored. A LyCORIS LoHa / LoKr module has no down / up: its tensors are
    in `factors` (by file suffix, export/lycoris.py) and `shape` is its layer's weight shape; a DoRA module is
    a LoRA with a `dora_scale` [1, in(, 1, 1)]."""

    component: str  # "unet", "text_encoder", "text_encoder_2"
    path: str  # the layer's path in the diffusers/transformers layout (CLIP paths start with "text_model.")
    down: torch.Tensor | None
    up: torch.Tensor | None
    alpha: float
    source: str = ""  # the module's name in the file it was read from (its stem), for reports
    factors: dict[str, torch.Tensor] = field(default_factory=dict)
    dora_scale: torch.Tensor | None = None
    shape: tuple[int, ...] = ()  # the layer's weight shape (LoHa / LoKr: their 2-D factors do not tell it)

    @property
    def kind(self) -> str:
        """ "lora", "loha" or "lokr"."""
        return factor_kind(set(self.factors)) or "lora"

    @property
    def network_type(self) -> str:
        """The config's network_type this module is of: "lora" (LoCon's convs included), "loha", "lokr" or
        "dora"."""
        return "dora" if self.dora_scale is not None else self.kind

    @property
    def plain(self) -> bool:
        """A plain LoRA (or LoCon) module: `scale · up @ down`, what every layout and tool handles."""
        return self.kind == "lora" and self.dora_scale is None

    @property
    def rank(self) -> int:
        """The rank (a LoKr with no decomposed factor: 0)."""
        if self.down is not None:
            return int(self.down.shape[0])
        return factors_rank(self.kind, self.factors) or 0

    @property
    def scale(self) -> float:
        if self.factors:
            return factors_scale(self.kind, self.factors, self.alpha)
        return self.alpha / self.rank

    @property
    def is_conv(self) -> bool:
        return len(self.weight_shape) == 4

    @property
    def name(self) -> str:
        """`component.path`: how messages and reports name the module."""
        return f"{self.component}.{self.path}"

    @property
    def weight_shape(self) -> tuple[int, ...]:
        """The shape of the weight this module updates."""
        if self.down is None or self.up is None:
            return self.shape
        return (self.up.shape[0], *self.down.shape[1:])

    def parameter_count(self) -> int:
        """The numbers the module stores (alpha aside)."""
        tensors = [
            *self.factors.values(),
            *(t for t in (self.down, self.up, self.dora_scale) if t is not None),
        ]
        return sum(t.numel() for t in tensors)

    def update(self, dtype: torch.dtype = torch.float32, weight: torch.Tensor | None = None) -> torch.Tensor:
        """The change the module makes to its layer's weight, in the weight's shape, computed in `dtype`:
        `scale · up @ down` for LoRA, export/lycoris.py's formulas for LoHa and LoKr. DoRA's depends on the
        layer's own `weight` (required then): the DoRA weight minus `weight`."""
        if self.factors:
            delta = factors_update(self.kind, self.factors, self.alpha, self.weight_shape, dtype)
        else:
            up = self.up.to(dtype).flatten(1)
            down = self.down.to(dtype).flatten(1)
            delta = ((up @ down) * self.scale).reshape(self.weight_shape)
        if self.dora_scale is None:
            return delta
        if weight is None:
            raise ValueError(f"{self.name}: a DoRA module's update needs the layer's weight")
        return (dora_weight(weight, delta, self.dora_scale) - weight.float()).to(dtype)


@dataclass
class LoraModel:
    """A whole LoRA file: its modules in file order, the family it is for (lora_reader's SD_FAMILY /
    SDXL_FAMILY), the layout it was read from ("kohya", "diffusers") and its string metadata."""

    family: str
    modules: list[LoraModule]
    metadata: dict[str, str] = field(default_factory=dict)
    layout: str = "kohya"

    def components(self) -> list[str]:
        """The components the LoRA adapts, in save order."""
        present = {m.component for m in self.modules}
        return [c for c in COMPONENTS if c in present]

    @property
    def network_type(self) -> str:
        """The config's network_type of the file's modules: "lora", "loha", "lokr" or "dora" (the most
        frequent, should a file mix them)."""
        return Counter(m.network_type for m in self.modules).most_common(1)[0][0]

    @property
    def plain(self) -> bool:
        """Every module a plain LoRA / LoCon one."""
        return all(m.plain for m in self.modules)

    def common_rank_and_alpha(self) -> tuple[int, float]:
        """The most frequent (rank, alpha) pair: what a file's network_dim / network_alpha say."""
        (pair, _), *_ = Counter((m.rank, m.alpha) for m in self.modules).most_common(1)
        return pair


@dataclass
class Resolution:
    """The file's modules resolved against a model's layers: found, and the stems that have no layer of that
    name (`missing`) or whose layer has another shape (`wrong_shape`)."""

    modules: list[LoraModule] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    wrong_shape: list[str] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        return not self.missing and not self.wrong_shape


def resolve_modules(file_modules: list[FileModule], index: dict[str, ModuleRef | FusedRef]) -> Resolution:
    """Each file module on the layer `index` names (see `lora_reader.module_index`): its component, its path
    in the diffusers layout, and its tensors as stored (a 1x1 conv stored as a matrix gets its 1x1 dims back;
    a module without alpha gets alpha = rank, as every loader does)."""
    result = Resolution()
    for module in file_modules:
        ref = index.get(module.stem)
        if ref is None:
            result.missing.append(module.stem)
            continue
        if isinstance(ref, FusedRef):
            _resolve_fused(module, ref, result)
            continue
        layer = getattr(ref.layer, "base_layer", ref.layer)  # a layer that carries an adapter already
        if module.factors:
            _resolve_factors(module, ref, layer, result)
            continue
        down, up = module.down, module.up
        if isinstance(layer, nn.Conv2d) and down.dim() == 2:
            down, up = down[:, :, None, None], up[:, :, None, None]
        if not fits(layer, down, up):
            result.wrong_shape.append(module.stem)
            continue
        dora_scale = module.dora_scale
        if dora_scale is not None:
            if dora_scale.numel() != layer.weight.shape[1]:
                result.wrong_shape.append(module.stem)
                continue
            dora_scale = dora_scale.reshape(dora_scale_shape(tuple(layer.weight.shape)))
        alpha = float(down.shape[0]) if module.alpha is None else module.alpha
        path = ref.network.name_prefix + ref.path
        result.modules.append(
            LoraModule(
                ref.component,
                path,
                down,
                up,
                alpha,
                source=module.stem,
                dora_scale=dora_scale,
                shape=tuple(layer.weight.shape),
            )
        )
    return result


def _resolve_factors(module: FileModule, ref: ModuleRef, layer: nn.Module, result: Resolution) -> None:
    """A LoHa / LoKr module on its layer, when its factors make an update of the layer's size."""
    weight_shape = tuple(layer.weight.shape)
    flat = (weight_shape[0], math.prod(weight_shape[1:]))
    if factors_shape(module.kind, module.factors) != flat:
        result.wrong_shape.append(module.stem)
        return
    dora_scale = module.dora_scale
    if dora_scale is not None:
        if dora_scale.numel() != weight_shape[1]:
            result.wrong_shape.append(module.stem)
            return
        dora_scale = dora_scale.reshape(dora_scale_shape(weight_shape))
    alpha = float(factors_rank(module.kind, module.factors) or 1) if module.alpha is None else module.alpha
    path = ref.network.name_prefix + ref.path
    result.modules.append(
        LoraModule(
            ref.component,
            path,
            None,
            None,
            alpha,
            source=module.stem,
            factors=dict(module.factors),
            dora_scale=dora_scale,
            shape=weight_shape,
        )
    )


def _resolve_fused(module: FileModule, ref: FusedRef, result: Resolution) -> None:
    """A file module on a fused layer (FLUX's `qkv`, `linear1`), split into its parts (export/fused.py)."""
    layers = [getattr(part.layer, "base_layer", part.layer) for part in ref.parts]
    if module.factors or module.dora_scale is not None:  # only a plain LoRA splits into its parts exactly
        result.wrong_shape.append(module.stem)
        return
    down, up = module.down, module.up
    rows = sum(ref.sizes)
    if (
        down.dim() != 2
        or up.dim() != 2
        or up.shape != (rows, down.shape[0])
        or down.shape[1] != layers[0].weight.shape[1]
    ):
        result.wrong_shape.append(module.stem)
        return
    alpha = float(down.shape[0]) if module.alpha is None else module.alpha
    for index, lora in split(PartLora(down, up, alpha), ref.sizes).items():
        part = ref.parts[index]
        path = part.network.name_prefix + part.path
        result.modules.append(
            LoraModule(part.component, path, lora.down, lora.up, lora.alpha, source=module.stem)
        )


def fits(layer: nn.Module, down: torch.Tensor, up: torch.Tensor) -> bool:
    """Whether `up @ down` has the shape of `layer`'s weight (a Linear, or a Conv2d of the down's kernel)."""
    weight = layer.weight
    if isinstance(layer, nn.Conv2d):
        return (
            down.dim() == 4
            and up.dim() == 4
            and down.shape[1] == weight.shape[1]
            and tuple(down.shape[2:]) == tuple(weight.shape[2:])
            and up.shape[0] == weight.shape[0]
            and up.shape[1] == down.shape[0]
            and tuple(up.shape[2:]) == (1, 1)
        )
    return (
        down.dim() == 2
        and up.dim() == 2
        and down.shape[1] == weight.shape[1]
        and up.shape[0] == weight.shape[0]
        and up.shape[1] == down.shape[0]
    )
