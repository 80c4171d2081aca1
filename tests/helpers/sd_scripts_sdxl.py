"""sd-scripts' SDXL UNet (the sgm layout) and its LoRA naming rule, ported for tests.

From kohya-ss/sd-scripts (stored commit 48d368fa):

* library/sdxl_original_unet.py, `SdxlUNet2DConditionModel`: the module tree sd-scripts trains SDXL on (the
  sgm/LDM openaimodel layout, so that its state dict is the checkpoint's `model.diffusion_model.*`). Rebuilt
  here with the same module names, classes (by name) and shapes; no forward pass. Levels: channels 320 / 640
  / 1280, transformer depth 0 / 2 / 10, two ResBlocks per level down and three up, linear proj_in/proj_out.
* networks/lora.py, `LoRANetwork.create_modules`: for every module whose class name is a target, every
  descendant whose class name is "Linear" or "Conv2d" becomes `prefix + "." + name + "." + child_name` with
  "." → "_". Targets: UNET_TARGET_REPLACE_MODULE = ["Transformer2DModel"], plus
  UNET_TARGET_REPLACE_MODULE_CONV2D_3X3 = ["ResnetBlock2D", "Downsample2D", "Upsample2D"] when conv_dim is
  set (then 3x3 convs get conv_dim, and the blocks' Linear / 1x1 convs the network dim);
  TEXT_ENCODER_TARGET_REPLACE_MODULE = ["CLIPAttention", "CLIPSdpaAttention", "CLIPMLP"] with prefixes
  "lora_te1" / "lora_te2" on the two SDXL text encoders (transformers CLIPTextModel and
  CLIPTextModelWithProjection; sd-scripts converts OpenCLIP bigG to the latter).
"""

from __future__ import annotations

import torch
from torch import nn

MODEL_CHANNELS = 320
TIME_EMBED_DIM = 1280
ADM_IN_CHANNELS = 2816  # pooled bigG text embedding (1280) + 6 size/crop ids × 256
CONTEXT_DIM = 2048  # CLIP-L (768) + bigG (1280) hidden states
LEVELS = ((1, 0), (2, 2), (4, 10))  # (channel multiplier, transformer depth) per resolution

UNET_TARGETS = ("Transformer2DModel",)
UNET_CONV_TARGETS = ("ResnetBlock2D", "Downsample2D", "Upsample2D")
TEXT_ENCODER_TARGETS = ("CLIPAttention", "CLIPSdpaAttention", "CLIPMLP")


class ResnetBlock2D(nn.Module):
    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.in_layers = nn.Sequential(
            nn.GroupNorm(32, in_channels), nn.SiLU(), nn.Conv2d(in_channels, out_channels, 3, padding=1)
        )
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(TIME_EMBED_DIM, out_channels))
        self.out_layers = nn.Sequential(
            nn.GroupNorm(32, out_channels),
            nn.SiLU(),
            nn.Identity(),  # LDM's dropout slot
            nn.Conv2d(out_channels, out_channels, 3, padding=1),
        )
        same = in_channels == out_channels
        self.skip_connection = nn.Identity() if same else nn.Conv2d(in_channels, out_channels, 1)


class CrossAttention(nn.Module):
    def __init__(self, dim: int, context_dim: int):
        super().__init__()
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(context_dim, dim, bias=False)
        self.to_v = nn.Linear(context_dim, dim, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim)])


class GEGLU(nn.Module):
    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.proj = nn.Linear(dim, inner * 2)


class FeedForward(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.net = nn.ModuleList([GEGLU(dim, 4 * dim), nn.Identity(), nn.Linear(4 * dim, dim)])


class BasicTransformerBlock(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.attn1 = CrossAttention(dim, dim)
        self.ff = FeedForward(dim)
        self.attn2 = CrossAttention(dim, CONTEXT_DIM)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)


class Transformer2DModel(nn.Module):
    def __init__(self, channels: int, depth: int):
        super().__init__()
        self.norm = nn.GroupNorm(32, channels, eps=1e-6)
        self.proj_in = nn.Linear(channels, channels)
        self.transformer_blocks = nn.ModuleList([BasicTransformerBlock(channels) for _ in range(depth)])
        self.proj_out = nn.Linear(channels, channels)


class Downsample2D(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)


class Upsample2D(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)


class SdxlUNet2DConditionModel(nn.Module):
    """The module tree of sd-scripts' SDXL UNet (2,567,463,684 parameters, as the released UNet)."""

    def __init__(self):
        super().__init__()
        mc = MODEL_CHANNELS
        self.time_embed = nn.Sequential(nn.Linear(mc, TIME_EMBED_DIM), nn.SiLU(), nn.Linear(1280, 1280))
        self.label_emb = nn.Sequential(
            nn.Sequential(nn.Linear(ADM_IN_CHANNELS, TIME_EMBED_DIM), nn.SiLU(), nn.Linear(1280, 1280))
        )
        self.input_blocks = nn.ModuleList([nn.Sequential(nn.Conv2d(4, mc, 3, padding=1))])
        skips, channels = [mc], mc  # the channels each input block hands to the output blocks
        for level, (mult, depth) in enumerate(LEVELS):
            for _ in range(2):
                layers: list[nn.Module] = [ResnetBlock2D(channels, mult * mc)]
                channels = mult * mc
                if depth:
                    layers.append(Transformer2DModel(channels, depth))
                self.input_blocks.append(nn.ModuleList(layers))
                skips.append(channels)
            if level < len(LEVELS) - 1:
                self.input_blocks.append(nn.Sequential(Downsample2D(channels)))
                skips.append(channels)
        middle = [ResnetBlock2D(channels, channels), Transformer2DModel(channels, 10)]
        self.middle_block = nn.ModuleList([*middle, ResnetBlock2D(channels, channels)])
        self.output_blocks = nn.ModuleList([])
        for level, (mult, depth) in reversed(list(enumerate(LEVELS))):
            for i in range(3):
                layers = [ResnetBlock2D(channels + skips.pop(), mult * mc)]
                channels = mult * mc
                if depth:
                    layers.append(Transformer2DModel(channels, depth))
                if level > 0 and i == 2:
                    layers.append(Upsample2D(channels))
                self.output_blocks.append(nn.ModuleList(layers))
        self.out = nn.ModuleList([nn.GroupNorm(32, mc), nn.SiLU(), nn.Conv2d(mc, 4, 3, padding=1)])


def meta_sgm_unet() -> SdxlUNet2DConditionModel:
    with torch.device("meta"):
        return SdxlUNet2DConditionModel()


def create_modules_names(root: nn.Module, prefix: str, targets: tuple[str, ...]) -> list[str]:
    """The LoRA names `LoRANetwork.create_modules` gives `root`'s layers (in its order; a rank for each)."""
    names = []
    for name, module in root.named_modules():
        if type(module).__name__ in targets:
            for child_name, child in module.named_modules():
                if type(child).__name__ in ("Linear", "Conv2d"):
                    names.append(f"{prefix}.{name}.{child_name}".replace(".", "_"))
    return names


def with_text_model(text_encoder: nn.Module) -> nn.Module:
    """A transformers CLIP text encoder as sd-scripts (transformers 4) sees it: module paths under
    `text_model.` (transformers 5's CLIPTextModel lost that submodule; CLIPTextModelWithProjection has it)."""
    if hasattr(text_encoder, "text_model"):
        return text_encoder
    holder = nn.Module()
    holder.text_model = text_encoder
    return holder
