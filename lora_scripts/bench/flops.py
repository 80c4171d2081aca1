"""FLOPs of one LoRA training step, counted on the meta device: shapes only, no memory, no weights (seconds
on a CPU), so the per-image figures of docs/performance.md need no GPU. Any model family: the step goes
through the family's own `encode_prompts`, `image_conditioning` and `predict`.

    python -m lora_scripts.bench.flops --model sdxl            # SDXL at 1024², the bench's rank-4 LoRA
    python -m lora_scripts.bench.flops --model sd15 --resolution 256 --gradient-checkpointing
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from lora_scripts.bench.measure import count_flops
from lora_scripts.bench.workspace import BENCH_TARGETS, BUILT_IN_MODELS
from lora_scripts.models.family import LoraTargets, ModelFamily
from lora_scripts.models.lora import LoraSpec

CAPTION = "ink wash painting of a mountain peak, monochrome"  # padded to 77 tokens like every caption
TIMESTEP = 500


def meta_family(model: str) -> ModelFamily:
    """A built-in model ("tiny", "tiny-sdxl", "sd15", "sdxl") on the meta device: every shape, no memory
    (the tiny SDXL stays on the CPU: see `tiny_sdxl_family`)."""
    with torch.device("meta"):
        return BUILT_IN_MODELS[model].build()


def step_conditioning(family: ModelFamily, resolution: int) -> dict[str, torch.Tensor]:
    """What the training step passes to `predict` for one caption and one square `resolution`² image: the
    text encoders' outputs (what the text-encoder cache holds) and the image's size conditioning."""
    device = _device_of(family)
    with torch.no_grad():
        cond = family.encode_prompts([CAPTION], device)
    sizes = torch.tensor([[resolution, resolution, 0, 0, resolution, resolution]], device=device)
    return cond | family.image_conditioning(sizes)


def step_flops_per_image(
    family: ModelFamily, resolution: int, *, gradient_checkpointing: bool = False, rank: int = 4
) -> int:
    """FLOPs of the denoiser's forward + backward for one image at `resolution`² with a rank-`rank` LoRA on
    the bench's attention targets (added to `family` here): the cached training step. SD 1.5 at 512²: 1.714
    TFLOP (the issue quotes ~1.71). With checkpointing the recomputed forward adds to it."""
    family.add_lora(LoraTargets(BENCH_TARGETS, None), LoraSpec(rank=rank, alpha=rank))
    denoiser = family.denoiser
    if gradient_checkpointing:
        denoiser.enable_gradient_checkpointing()
    denoiser.train()
    cond = step_conditioning(family, resolution)
    side = resolution // 8
    latents = torch.randn(1, family.vae.config.latent_channels, side, side, device=_device_of(family))
    timesteps = torch.tensor([TIMESTEP], device=latents.device)

    def step() -> None:
        prediction = family.predict(latents, timesteps, cond)
        F.mse_loss(prediction.float(), latents).backward()

    return count_flops(step)


def encode_flops_per_image(family: ModelFamily, resolution: int) -> dict[str, int]:
    """FLOPs the uncached step (the reference loop, `--no-cache`) spends per image before the denoiser, and
    caching saves: {"vae_encode": the VAE encoder with its posterior sample at `resolution`²,
    "text_encoders": every text encoder on one 77-token caption}."""
    device = _device_of(family)
    pixels = torch.randn(1, 3, resolution, resolution, device=device)
    with torch.no_grad():
        vae = count_flops(lambda: family.sample_latents(family.encode_images(pixels)))
        text = count_flops(lambda: family.encode_prompts([CAPTION], device))
    return {"vae_encode": vae, "text_encoders": text}


def _device_of(family: ModelFamily) -> torch.device:
    return next(family.denoiser.parameters()).device


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="FLOPs per image of one LoRA training step (meta device)")
    parser.add_argument("--model", choices=list(BUILT_IN_MODELS), default="sdxl")
    parser.add_argument("--resolution", type=int, help="image size (default: the bench's for the model)")
    parser.add_argument("--rank", type=int, default=4, help="LoRA rank on the bench's attention targets")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    args = parser.parse_args(argv)
    resolution = args.resolution or BUILT_IN_MODELS[args.model].resolution
    family = meta_family(args.model)
    encode = encode_flops_per_image(family, resolution)
    step = step_flops_per_image(
        meta_family(args.model),
        resolution,
        gradient_checkpointing=args.gradient_checkpointing,
        rank=args.rank,
    )
    print(f"{args.model} at {resolution}², FLOPs per image:")
    print(f"  {family.denoiser_name} forward + backward (rank-{args.rank} LoRA): {_scaled(step)}")
    print(f"  VAE encode: {_scaled(encode['vae_encode'])}")
    print(f"  text encoders: {_scaled(encode['text_encoders'])}")
    print(f"  uncached step (all three): {_scaled(step + sum(encode.values()))}")


def _scaled(flops: int) -> str:
    return f"{flops / 1e12:.4f} TFLOP" if flops >= 1e11 else f"{flops / 1e9:.4f} GFLOP"


if __name__ == "__main__":
    main()
