"""Where each Linear/Conv2d weight of a base model's UNet and text encoders lives in its single-file
checkpoint, in the layout users download: CompVis/LDM for SD 1.x/2.x, Stability's sgm for SDXL, Black
Forest Labs' for FLUX.1.

    UNet (all versions)   model.diffusion_model.<sgm path>.weight        (export/sdxl_keys.py SgmUnetMap)
    SD 1.x CLIP ViT-L     cond_stage_model.transformer.<transformers path>.weight
    SD 2.x OpenCLIP ViT-H cond_stage_model.model.<open_clip name>
    SDXL CLIP ViT-L       conditioner.embedders.0.transformer.<transformers path>.weight
    SDXL OpenCLIP bigG    conditioner.embedders.1.model.<open_clip name>
    FLUX.1 transformer    <BFL path>.weight (flux1-dev.safetensors), under model.diffusion_model. in
                          ComfyUI's all-in-one files; q/k/v are rows of `qkv`, a single block's q/k/v/MLP
                          input rows of `linear1` (export/flux_keys.py: the names FLUX LoRA files use)
    FLUX.1 CLIP-L, T5-XXL text_encoders.clip_l.transformer.<transformers path>.weight and
                          text_encoders.t5xxl.transformer.<path>.weight (all-in-one files only)

OpenCLIP keeps open_clip's names (`transformer.resblocks.<i>.mlp.c_fc.weight`, ...) and fuses a layer's
q/k/v projections into one `attn.in_proj_weight` [3d, d]: q is rows [0:d], k [d:2d], v [2d:3d]. bigG's
`text_projection` is stored as the matrix P of `x @ P`, the transpose of the Linear's weight.

The map is built from the family's modules (models/meta_modules.py, meta device: names and shapes only), so
it names the layers a LoRA file resolves to (`LoraModule.name`: "unet.down_blocks.0...", "text_encoder.
text_model.encoder..."). A file is checked against it (`CheckpointLayout.check`) before anything is written.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType

import torch
from torch import nn

from lora_scripts.errors import UserError
from lora_scripts.export.kohya import LoraNetwork
from lora_scripts.export.lora_layouts import component_networks
from lora_scripts.export.sdxl_keys import SgmUnetMap
from lora_scripts.models.detect import (
    CLIP_PREFIX,
    COMFY_CLIP_L_PREFIX,
    COMFY_T5XXL_PREFIX,
    LDM_UNET_PREFIX,
    OPEN_CLIP_PREFIX,
    SGM_CLIP_PREFIX,
    SGM_OPEN_CLIP_PREFIX,
    ModelVersion,
    flux_prefix,
)
from lora_scripts.models.meta_modules import MetaModel

# Each text encoder's storage, per version: (open_clip names?, the prefix its keys start with).
TEXT_ENCODER_STORAGE: dict[ModelVersion, dict[str, tuple[bool, str]]] = {
    "sd_v1": {"text_encoder": (False, CLIP_PREFIX)},
    "sd_v2": {"text_encoder": (True, OPEN_CLIP_PREFIX)},
    "sdxl": {"text_encoder": (False, SGM_CLIP_PREFIX), "text_encoder_2": (True, SGM_OPEN_CLIP_PREFIX)},
    "flux1": {"text_encoder": (False, COMFY_CLIP_L_PREFIX), "text_encoder_2": (False, COMFY_T5XXL_PREFIX)},
}
# A transformers CLIP encoder layer's children → open_clip's names (q/k/v: see OPEN_CLIP_QKV).
OPEN_CLIP_LAYER = {
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
    "self_attn.out_proj": "attn.out_proj",
}
OPEN_CLIP_QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")  # in in_proj's row order
OPEN_CLIP_TOP = {
    "embeddings.token_embedding.weight": "token_embedding.weight",
    "embeddings.position_embedding.weight": "positional_embedding",
    "final_layer_norm.weight": "ln_final.weight",
    "final_layer_norm.bias": "ln_final.bias",
}
_ENCODER_LAYER = re.compile(r"encoder\.layers\.(\d+)\.(.+)\.(weight|bias)")


def open_clip_name(key: str) -> tuple[str, int | None] | None:
    """A transformers CLIP text model parameter (`encoder.layers.3.mlp.fc1.weight`, without `text_model.`)
    → (its open_clip name, None), or for q/k/v (`transformer.resblocks.3.attn.in_proj_weight`, 0 / 1 / 2:
    which third of the fused rows); None for what open_clip does not store (position_ids, ...)."""
    if key in OPEN_CLIP_TOP:
        return OPEN_CLIP_TOP[key], None
    match = _ENCODER_LAYER.fullmatch(key)
    if match is None:
        return None
    index, child, kind = match.groups()
    block = f"transformer.resblocks.{index}."
    if child in OPEN_CLIP_QKV:
        return f"{block}attn.in_proj_{kind}", OPEN_CLIP_QKV.index(child)
    if child in OPEN_CLIP_LAYER:
        return f"{block}{OPEN_CLIP_LAYER[child]}.{kind}", None
    return None


@dataclass(frozen=True)
class WeightLocation:
    """Where one layer's weight is stored. shape: the weight's as diffusers/transformers hold it; rows: the
    row range it takes in a fused tensor (None: the whole tensor); transposed: stored as its transpose."""

    key: str
    shape: tuple[int, ...]
    rows: tuple[int, int] | None = None
    transposed: bool = False

    def fits(self, stored: tuple[int, ...]) -> bool:
        """Whether a stored tensor of shape `stored` holds this weight (a 1x1 conv and a Linear of the same
        size count as one: files of either kind exist for the same layer)."""
        if self.rows is not None:
            start, stop = self.rows
            return (
                len(stored) == len(self.shape)
                and stored[0] >= stop
                and (stop - start, *stored[1:]) == self.shape
            )
        if self.transposed:
            return stored == self.shape[::-1]
        return _as_matrix(stored) == _as_matrix(self.shape)

    def weight(self, stored: torch.Tensor) -> torch.Tensor:
        """The layer's weight (a view) from the stored tensor, in the layer's shape."""
        if self.rows is not None:
            return stored[self.rows[0] : self.rows[1]]
        if self.transposed:
            return stored.T
        return stored.reshape(self.shape)

    def add(self, stored: torch.Tensor, update: torch.Tensor) -> None:
        """Add `update` (the layer's shape) to its place in the stored tensor, in place."""
        if self.rows is not None:
            stored[self.rows[0] : self.rows[1]] += update.reshape(self.shape)
        elif self.transposed:
            stored += update.reshape(self.shape).T
        else:
            stored += update.reshape(stored.shape)


def _as_matrix(shape: tuple[int, ...]) -> tuple[int, ...]:
    return shape[:2] if len(shape) == 4 and shape[2:] == (1, 1) else shape


@dataclass(frozen=True)
class CheckpointLayout:
    """The single-file location of every Linear/Conv2d weight of a version's UNet and text encoders, by
    the layer's `LoraModule.name` ("unet.<diffusers path>", "text_encoder.text_model.<path>", ...)."""

    version: ModelVersion
    locations: Mapping[str, WeightLocation]

    @classmethod
    def of(cls, model: MetaModel, keys: Iterable[str] = ()) -> CheckpointLayout:
        """The layout of `model`'s version, with `model`'s layer names and shapes. keys: the file's tensor
        names, where the layout has two places for its denoiser (a FLUX.1 transformer bare or in an
        all-in-one file)."""
        locations: dict[str, WeightLocation] = {}
        storage = TEXT_ENCODER_STORAGE[model.version]
        for component, net in component_networks(list(model.networks)).items():
            if component in DENOISER_LOCATIONS:
                for path, where in DENOISER_LOCATIONS[component](net, list(keys)).items():
                    locations[f"{component}.{path}"] = where
                continue
            open_clip, prefix = storage[component]
            for name, layer in net.module.named_modules():
                if not isinstance(layer, nn.Linear):
                    continue
                path = net.name_prefix + name
                if open_clip:
                    where = _open_clip_location(path, layer, prefix)
                else:
                    where = WeightLocation(f"{prefix}{path}.weight", tuple(layer.weight.shape))
                if where is not None:
                    locations[f"{component}.{path}"] = where
        return cls(model.version, MappingProxyType(locations))

    def __getitem__(self, name: str) -> WeightLocation:
        try:
            return self.locations[name]
        except KeyError:
            raise KeyError(f"'{name}' is not a Linear/Conv2d of this {self.version} model") from None

    def check(self, shapes: Mapping[str, tuple[int, ...]], names: Iterable[str], *, what: str) -> None:
        """UserError naming each layer of `names` whose weight `shapes` (a checkpoint's header: key →
        shape) lacks or holds in another shape; `what` names the file in the messages ("--base x")."""
        problems = []
        for name in names:
            where = self.locations.get(name)
            if where is None:
                problems.append(f"{what}: {name} has no place in an {self.version} checkpoint.")
                continue
            stored = shapes.get(where.key)
            if stored is None:
                problems.append(
                    f"{what}: the file has no '{where.key}', where {name} is stored in {self.version} "
                    "checkpoints; it is not the base model this needs."
                )
            elif not where.fits(tuple(stored)):
                problems.append(
                    f"{what}: '{where.key}' has shape {list(stored)}, which does not hold {name} "
                    f"{list(where.shape)}; it is not the base model this needs."
                )
        if problems:
            raise UserError(problems)


def _sgm_unet_locations(net: LoraNetwork, keys: list[str]) -> dict[str, WeightLocation]:
    out = {}
    for path, sgm in SgmUnetMap.from_unet(net.module).items():
        shape = tuple(net.module.get_submodule(path).weight.shape)
        out[path] = WeightLocation(f"{LDM_UNET_PREFIX}{sgm}.weight", shape)
    return out


def _bfl_transformer_locations(net: LoraNetwork, keys: list[str]) -> dict[str, WeightLocation]:
    """FLUX.1's transformer by the names its LoRA files use (the network's key map and fused layers), bare
    or under the all-in-one prefix, whichever `keys` has (bare when they say nothing)."""
    prefix = flux_prefix(keys) or ""
    out = {}
    for path, layer in net.module.named_modules():
        if not isinstance(layer, nn.Linear):
            continue
        shape = tuple(layer.weight.shape)
        part = net.fusion(path) if net.fusion is not None else None
        if part is not None:
            start = sum(part.sizes[: part.index])
            out[path] = WeightLocation(f"{prefix}{part.path}.weight", shape, (start, start + shape[0]))
            continue
        try:
            out[path] = WeightLocation(f"{prefix}{net.kohya_path(path)}.weight", shape)
        except ValueError:  # the final norm's modulation: BFL stores its halves swapped, and no LoRA names it
            continue
    return out


# How each denoiser component's layers are stored, by component (the text encoders: TEXT_ENCODER_STORAGE).
DENOISER_LOCATIONS = {"unet": _sgm_unet_locations, "transformer": _bfl_transformer_locations}


def _open_clip_location(path: str, layer: nn.Linear, prefix: str) -> WeightLocation | None:
    shape = tuple(layer.weight.shape)
    if path == "text_projection":  # CLIPTextModelWithProjection's; open_clip multiplies x @ P
        return WeightLocation(f"{prefix}text_projection", shape, transposed=True)
    found = open_clip_name(path.removeprefix("text_model.") + ".weight")
    if found is None:
        return None
    name, third = found
    rows = None if third is None else (third * shape[0], (third + 1) * shape[0])
    return WeightLocation(prefix + name, shape, rows)
