"""SDXL's kohya key layout: UNet modules named by their sgm (Stability generative-models / LDM) paths.

sd-scripts trains SDXL on its own copy of the sgm UNet, so its LoRA files name UNet modules
`lora_unet_` + sgm path with '.' → '_' (`lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q`), where
its SD 1.x/2.x files use diffusers paths. A1111 looks those sgm names up directly; its diffusers → LDM
conversion (`convert_diffusers_name_to_compvis`) hard-codes SD 1.x's up blocks and sends SDXL's
`up_blocks.0.upsamplers.0.conv` to `output_blocks.2.1.conv` (the attention, which has no conv), and it has
no rule for `add_embedding`, so diffusers-spelled SDXL keys lose those layers there. We write sgm names.

A diffusers UNet2DConditionModel path maps as follows (n counts the sgm blocks: input block 0 is conv_in, then
each down resnet with its attention and each downsampler is one input block; each up resnet with its
attention, plus the block's upsampler after its last resnet, is one output block):

    conv_in                                    input_blocks.0.0
    time_embedding.linear_1 / .linear_2        time_embed.0 / time_embed.2
    add_embedding.linear_1 / .linear_2         label_emb.0.0 / label_emb.0.2
    down_blocks.i.resnets.j.conv1              input_blocks.n.0.in_layers.2   (conv2: out_layers.3,
                                               time_emb_proj: emb_layers.1, conv_shortcut: skip_connection)
    down_blocks.i.attentions.j.<rest>          input_blocks.n.1.<rest>        (transformer names are shared)
    down_blocks.i.downsamplers.0.conv          input_blocks.n.0.op
    mid_block.resnets.0 / attentions.0 / resnets.1     middle_block.0 / .1 / .2
    up_blocks.i.resnets.j / attentions.j       output_blocks.n.0 / output_blocks.n.1
    up_blocks.i.upsamplers.0.conv              output_blocks.n.2.conv (n.1.conv in a block without attention)
    conv_norm_out / conv_out                   out.0 / out.2

SDXL base: `down_blocks.1.attentions.0` → `input_blocks.4.1`, `up_blocks.0.upsamplers.0.conv` →
`output_blocks.2.2.conv`, `mid_block.resnets.0.conv1` → `middle_block.0.in_layers.2`. Text encoders need no
map: `lora_te1_` / `lora_te2_` + the transformers path with `text_model.` (sd-scripts' names; the
`clip_name_prefix` of export/kohya.py).
"""

from __future__ import annotations

from collections.abc import ItemsView, Mapping, Sequence
from types import MappingProxyType

from torch import nn

from lora_scripts.export.kohya import LoraNetwork, clip_name_prefix

# ResnetBlock2D child → LDM ResBlock's (in_layers = [norm, act, conv], out_layers = [norm, act, drop, conv]).
_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_EMBEDDING = {"linear_1": "0", "linear_2": "2"}  # TimestepEmbedding → LDM's Sequential(Linear, SiLU, Linear)

# A block: (diffusers path, sgm path, renames of its direct children).
_Block = tuple[str, str, Mapping[str, str]]


def _blocks(unet: nn.Module) -> list[_Block]:
    """The UNet's blocks with their sgm paths, from the live module structure (any block count, resnets per
    block and transformer depth)."""
    blocks: list[_Block] = [
        ("conv_in", "input_blocks.0.0", {}),
        ("time_embedding", "time_embed", _EMBEDDING),
        ("add_embedding", "label_emb.0", _EMBEDDING),  # SDXL's text_time embedding (pooled text + sizes)
        ("class_embedding", "label_emb.0", _EMBEDDING),  # SD 2.x unCLIP's; never beside add_embedding
        ("conv_norm_out", "out.0", {}),
        ("conv_out", "out.2", {}),
    ]
    n = 1
    for i, block in enumerate(unet.down_blocks):
        for j in range(len(block.resnets)):
            blocks.append((f"down_blocks.{i}.resnets.{j}", f"input_blocks.{n}.0", _RESNET))
            if getattr(block, "attentions", None):
                blocks.append((f"down_blocks.{i}.attentions.{j}", f"input_blocks.{n}.1", {}))
            n += 1
        if getattr(block, "downsamplers", None):
            blocks.append((f"down_blocks.{i}.downsamplers.0", f"input_blocks.{n}.0", {"conv": "op"}))
            n += 1
    # The middle block runs resnet 0, attention 0, resnet 1, ...: sgm numbers them in that order.
    mid = unet.mid_block
    for j in range(len(mid.resnets) if mid is not None else 0):
        blocks.append((f"mid_block.resnets.{j}", f"middle_block.{2 * j}", _RESNET))
        if j < len(getattr(mid, "attentions", None) or ()):
            blocks.append((f"mid_block.attentions.{j}", f"middle_block.{2 * j + 1}", {}))
    n = 0
    for i, block in enumerate(unet.up_blocks):
        attentions = bool(getattr(block, "attentions", None))
        for j in range(len(block.resnets)):
            blocks.append((f"up_blocks.{i}.resnets.{j}", f"output_blocks.{n}.0", _RESNET))
            if attentions:
                blocks.append((f"up_blocks.{i}.attentions.{j}", f"output_blocks.{n}.1", {}))
            if j == len(block.resnets) - 1 and getattr(block, "upsamplers", None):
                slot = 2 if attentions else 1  # after the resnet and, when there is one, the attention
                blocks.append((f"up_blocks.{i}.upsamplers.0", f"output_blocks.{n}.{slot}", {}))
            n += 1
    return blocks


def adaptable_layer_paths(module: nn.Module) -> list[str]:
    """Paths of every Linear/Conv2d of `module`, as before LoRA: layers peft wraps count once, by their own
    path (not `.base_layer`, not the `lora_A`/`lora_B` layers)."""
    paths = []
    for name, layer in module.named_modules():
        if isinstance(layer, (nn.Linear, nn.Conv2d)) and name and ".lora_" not in f".{name}":
            paths.append(name.removesuffix(".base_layer"))
    return paths


class SgmUnetMap:
    """diffusers UNet module path → sgm module path, for every Linear/Conv2d of one UNet (a bijection).

    Callable, so a LoraNetwork takes it as its `key_map`: `LoraNetwork("lora_unet", unet, key_map=m)` names
    each module `lora_unet_` + sgm path. `to_diffusers` goes back (for reading sd-scripts' SDXL files).
    """

    def __init__(self, to_sgm: Mapping[str, str]):
        self._to_sgm = MappingProxyType(dict(to_sgm))
        self._to_diffusers = MappingProxyType({sgm: path for path, sgm in self._to_sgm.items()})
        if len(self._to_diffusers) != len(self._to_sgm):
            raise ValueError("two UNet modules map to one sgm path")

    @classmethod
    def from_unet(cls, unet: nn.Module) -> SgmUnetMap:
        """The map of a diffusers UNet2DConditionModel, with or without peft LoRA layers in it. Raises
        ValueError for a layer the sgm layout has no place for (a UNet that is not SD-shaped)."""
        blocks = sorted(_blocks(unet), key=lambda b: len(b[0]), reverse=True)  # longest prefix first
        to_sgm = {}
        for path in adaptable_layer_paths(unet):
            block = next((b for b in blocks if path == b[0] or path.startswith(b[0] + ".")), None)
            if block is None:
                raise ValueError(f"UNet module '{path}' has no place in the sgm layout")
            prefix, sgm_prefix, renames = block
            rest = path[len(prefix) + 1 :].split(".") if path != prefix else []
            if rest:
                rest[0] = renames.get(rest[0], rest[0])
            to_sgm[path] = ".".join([sgm_prefix, *rest])
        return cls(to_sgm)

    def __call__(self, path: str) -> str:
        """The sgm path of diffusers module `path`; KeyError naming it when the UNet has no such layer."""
        try:
            return self._to_sgm[path]
        except KeyError:
            raise KeyError(f"'{path}' is not a Linear/Conv2d of this UNet") from None

    def to_diffusers(self, sgm_path: str) -> str:
        """The diffusers path of sgm module `sgm_path`; KeyError naming it when there is none."""
        try:
            return self._to_diffusers[sgm_path]
        except KeyError:
            raise KeyError(f"'{sgm_path}' is not a Linear/Conv2d of this UNet's sgm layout") from None

    def items(self) -> ItemsView[str, str]:
        """(diffusers path, sgm path) for every Linear/Conv2d, in the UNet's module order."""
        return self._to_sgm.items()

    def __len__(self) -> int:
        return len(self._to_sgm)


def sdxl_networks(unet: nn.Module, text_encoders: Sequence[nn.Module | None] = ()) -> list[LoraNetwork]:
    """The networks of an SDXL LoRA in save order, named as sd-scripts names them: `lora_unet` (sgm paths),
    then, when trained, `lora_te1` (CLIP ViT-L) and `lora_te2` (OpenCLIP bigG, in transformers' layout).

    text_encoders: () for a UNet-only LoRA, else [te1, te2] with None for one that is not trained.
    """
    if len(text_encoders) not in (0, 2):
        raise ValueError(f"SDXL has two text encoders, got {len(text_encoders)}")
    networks = [LoraNetwork("lora_unet", unet, key_map=SgmUnetMap.from_unet(unet))]
    prefixes = ("lora_te1", "lora_te2") if text_encoders else ()
    for prefix, text_encoder in zip(prefixes, text_encoders, strict=True):
        if text_encoder is not None:
            networks.append(LoraNetwork(prefix, text_encoder, clip_name_prefix(text_encoder)))
    return networks
