"""LoRA files with random weights for any model's layer set (full size on the meta device, or a tiny model's
configs): the post-training tools' inputs, built in milliseconds without training."""

from __future__ import annotations

import torch
from torch import nn

from lora_scripts.export.lora_layouts import component_networks
from lora_scripts.models.meta_modules import MetaModel

UNET_ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")
CLIP_ATTENTION = ("q_proj", "k_proj", "v_proj", "out_proj")


def synthetic_kohya(
    base: MetaModel,
    *,
    rank: int = 4,
    alpha: float = 2.0,
    text_encoder: bool = True,
    conv_rank: int | None = None,
    conv_alpha: float = 1.0,
    odd_alpha_every: int = 5,
    dtype: torch.dtype = torch.float16,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """A kohya state dict on `base`'s attention layers (and its 3x3 convs with `conv_rank`: LoCon), named as
    the family names them; every `odd_alpha_every`-th module gets alpha + 1 (per-module alphas)."""
    generator = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    count = 0
    for component, net in component_networks(list(base.networks)).items():
        if component != "unet" and not text_encoder:
            continue
        targets = UNET_ATTENTION if component == "unet" else CLIP_ATTENTION
        for path, layer in net.module.named_modules():
            if isinstance(layer, nn.Linear) and path.endswith(targets):
                down_shape, up_shape, r, a = (
                    (rank, layer.in_features),
                    (layer.out_features, rank),
                    rank,
                    alpha,
                )
            elif (
                component == "unet"
                and conv_rank
                and isinstance(layer, nn.Conv2d)
                and layer.kernel_size == (3, 3)
            ):
                k = layer.kernel_size
                down_shape, up_shape = (
                    (conv_rank, layer.in_channels, *k),
                    (layer.out_channels, conv_rank, 1, 1),
                )
                r, a = conv_rank, conv_alpha
            else:
                continue
            count += 1
            name = net.kohya_name(path)
            out[f"{name}.lora_down.weight"] = (torch.randn(down_shape, generator=generator) / r).to(dtype)
            out[f"{name}.lora_up.weight"] = (torch.randn(up_shape, generator=generator) * 0.05).to(dtype)
            out[f"{name}.alpha"] = torch.tensor(a + (1 if count % odd_alpha_every == 0 else 0), dtype=dtype)
    return out
