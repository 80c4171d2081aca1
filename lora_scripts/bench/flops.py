"""FLOPs of one SD 1.5 LoRA training step counted on the meta device: shapes only, no memory, no weights
(~6 s on a CPU), so the per-image figure of docs/performance.md needs no GPU."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from lora_scripts.bench.workspace import BENCH_TARGETS, random_sd15_components
from lora_scripts.models.family import LoraTargets
from lora_scripts.models.lora import LoraSpec
from lora_scripts.models.stable_diffusion import StableDiffusionFamily


def sd15_flops_per_image(
    resolution: int = 512, *, gradient_checkpointing: bool = False, rank: int = 4
) -> int:
    """FLOPs of the UNet forward + backward for one image at `resolution`² with a rank-`rank` attention
    LoRA (the bench's targets). The issue quotes ~1.71 TFLOP at 512² without checkpointing; we count
    1.714. With checkpointing the recomputed forward adds to it (diffusers checkpoints the blocks)."""
    with torch.device("meta"):
        family = StableDiffusionFamily(random_sd15_components())
        family.add_lora(LoraTargets(BENCH_TARGETS, None), LoraSpec(rank=rank, alpha=rank))
        unet = family.unet
        if gradient_checkpointing:
            unet.enable_gradient_checkpointing()
        unet.train()
        side = resolution // 8
        latents = torch.randn(1, 4, side, side)
        hidden = torch.randn(1, 77, unet.config.cross_attention_dim)
        with FlopCounterMode(display=False) as counter:
            prediction = unet(latents, torch.tensor([500]), hidden).sample
            F.mse_loss(prediction.float(), latents).backward()
    return counter.get_total_flops()


def sd15_encode_flops_per_image(resolution: int = 512) -> int:
    """FLOPs the reference loop spends per image before the UNet, and caching saves: the VAE encoder with
    its posterior sample at `resolution`², plus the text encoder on 77 tokens. At 512² that is 1.13 TFLOP,
    two thirds of the UNet's training step (sd15_flops_per_image)."""
    with torch.device("meta"):
        components = random_sd15_components()
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            components.vae.encode(torch.randn(1, 3, resolution, resolution)).latent_dist.sample()
            components.text_encoder(torch.zeros(1, 77, dtype=torch.long))
    return counter.get_total_flops()
