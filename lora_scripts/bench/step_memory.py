"""Peak tensor memory of one LoRA training step, counted on the CPU: what a GPU's
`torch.cuda.max_memory_allocated` would show, for machines without one.

The tool is torch's `MemTracker` (`torch.distributed._tools`, a private tool), which adds up the bytes of
every live tensor by kind (weights, gradients, activations, optimizer state). The step is train()'s cached
one: latents and text-encoder outputs come from the cache, so only the denoiser is on the device; a UNet
LoRA in fp32 (default: rank 16 on the `kohya` layers, as configs/sdxl_character.yaml); AdamW; batch 1. The
second of two steps is the one counted (the first, at 64², creates the optimizer state). The denoiser alone is
built, with random weights, straight in the frozen weights' dtype; the rest of the model stays on the meta
device and only gives the conditioning's shapes.

    python -m lora_scripts.bench.step_memory --model sdxl --resolution 1024
    python -m lora_scripts.bench.step_memory --model sdxl --resolution 1024 --quantize-base int8
    python -m lora_scripts.bench.step_memory --model sd15 --resolution 512 --rank 4 --target-modules attn
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lora_scripts.bench.flops import TIMESTEP, meta_family, step_conditioning
from lora_scripts.bench.workspace import BUILT_IN_MODELS
from lora_scripts.models.family import LoraTargets, ModelFamily
from lora_scripts.models.lora import LoraSpec
from lora_scripts.models.lora_presets import UNET_PRESETS
from lora_scripts.models.quantize import quantize_frozen

WEIGHT_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class StepMemorySettings:
    """One counted step. The defaults are `memory_profile: low` on a CPU: bf16 frozen weights under bf16
    autocast, gradient checkpointing, batch 1 (AdamW: the 8-bit one needs CUDA)."""

    model: str = "sdxl"
    resolution: int = 1024
    rank: int = 16
    target_modules: str = "kohya"  # a UNet preset (lora_presets.UNET_PRESETS: attn, attn-ff, kohya)
    weights: str = "bf16"  # the frozen weights' dtype, and the autocast dtype when not fp32
    gradient_checkpointing: bool = True
    quantize_base: str = "no"  # "int8" / "float8": the frozen weights in 8 bits (config key quantize_base)


def materialize(module: nn.Module, dtype: torch.dtype) -> None:
    """A module built on the meta device (or anywhere: its tensors are replaced) → new CPU tensors of `dtype`,
    initialised as its layers initialise themselves, from seed 0 (speed and memory do not depend on the
    values, but NaN or denormal garbage could)."""
    module.to(dtype=dtype).to_empty(device="cpu")
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        for layer in module.modules():
            if hasattr(layer, "reset_parameters"):
                layer.reset_parameters()
    untouched = [
        name
        for name, layer in module.named_modules()
        if not hasattr(layer, "reset_parameters") and any(True for _ in layer.parameters(recurse=False))
    ]
    if untouched:
        raise RuntimeError(f"no initialiser for the parameters of {untouched[:3]}")


def prepare_step(settings: StepMemorySettings) -> tuple[ModelFamily, dict[str, torch.Tensor], torch.Tensor]:
    """The family with its denoiser on the CPU (LoRA added, frozen weights cast or quantized, checkpointing
    as asked) and the step's inputs: conditioning and latents for one image, batch 1."""
    family = meta_family(settings.model)
    cond_shapes = step_conditioning(family, settings.resolution)
    denoiser = family.denoiser
    materialize(denoiser, WEIGHT_DTYPES[settings.weights])
    targets = LoraTargets(settings.target_modules, None)
    family.add_lora(targets, LoraSpec(rank=settings.rank, alpha=settings.rank))
    for param in denoiser.parameters():
        if param.requires_grad:
            param.data = param.data.float()  # as attach_lora: the LoRA trains in fp32
    if settings.quantize_base != "no":
        quantize_frozen(denoiser, settings.quantize_base)
    if settings.gradient_checkpointing:
        denoiser.enable_gradient_checkpointing()
    denoiser.train()
    generator = torch.Generator().manual_seed(0)
    cond = {
        name: torch.randn(shape.shape, generator=generator).to(shape.dtype)
        for name, shape in cond_shapes.items()
    }
    side = settings.resolution // 8
    latents = torch.randn(1, denoiser.config.in_channels, side, side, generator=generator)
    return family, cond, latents


class _NoHook:
    def remove(self) -> None:
        pass


def count_step_memory(settings: StepMemorySettings) -> dict:
    """Bytes by kind at the counted step's peak ({"Parameter", "Gradient", "Activation", "Temp", "Optstate",
    ..., "Total"}), the LoRA's parameter count, the loss and the counted step's seconds (with tracking)."""
    from torch.distributed._tools.mem_tracker import MemTracker

    family, cond, latents = prepare_step(settings)
    denoiser = family.denoiser
    optimizer = torch.optim.AdamW([p for p in denoiser.parameters() if p.requires_grad], lr=1e-4)
    tracker = MemTracker()
    for param in denoiser.parameters():  # MemTracker hooks every gradient; a frozen weight cannot take a hook
        if not param.requires_grad:
            tracker._param_to_grad_hook_handles[param] = (_NoHook(), _NoHook())
    tracker.track_external(denoiser, optimizer)
    autocast = settings.weights != "fp32"
    timesteps = torch.tensor([TIMESTEP])
    # The first step only creates the optimizer's state, whose size does not depend on the image's: it runs
    # on 8x8 latents (64² pixels), so that only the counted step pays for the full resolution.
    with tracker:
        for step, step_latents in enumerate((latents[:, :, :8, :8], latents)):
            start = time.perf_counter()
            with torch.autocast("cpu", dtype=WEIGHT_DTYPES[settings.weights], enabled=autocast):
                prediction = family.predict(step_latents, timesteps, cond)
            loss = F.mse_loss(prediction.float(), step_latents)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            seconds = time.perf_counter() - start
            if step == 0:
                tracker.reset_mod_stats()
    peak = tracker.get_tracker_snapshot("peak")[torch.device("cpu")]
    return {
        "settings": asdict(settings),
        # MemTracker's kinds: Parameter, Buffer, Gradient, Activation, Temp, Optstate, Other, Total
        "peak_bytes": {getattr(kind, "value", kind): value for kind, value in peak.items()},
        "lora_parameters": sum(p.numel() for p in denoiser.parameters() if p.requires_grad),
        "loss": loss.item(),
        "counted_step_s": round(seconds, 1),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Peak tensor memory of one LoRA training step, on the CPU")
    parser.add_argument("--model", choices=list(BUILT_IN_MODELS), default="sdxl")
    parser.add_argument("--resolution", type=int, help="image size (default: the bench's for the model)")
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank (default 16)")
    parser.add_argument("--target-modules", choices=UNET_PRESETS, default="kohya", help="UNet LoRA layers")
    parser.add_argument("--weights", choices=sorted(WEIGHT_DTYPES), default="bf16", help="frozen weights")
    parser.add_argument("--no-gradient-checkpointing", action="store_true")
    parser.add_argument("--quantize-base", choices=["no", "int8", "float8"], default="no")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    settings = StepMemorySettings(
        model=args.model,
        resolution=args.resolution or BUILT_IN_MODELS[args.model].resolution,
        rank=args.rank,
        target_modules=args.target_modules,
        weights=args.weights,
        gradient_checkpointing=not args.no_gradient_checkpointing,
        quantize_base=args.quantize_base,
    )
    result = count_step_memory(settings)
    peak = result.pop("peak_bytes")
    print(json.dumps({**result, "peak_mib": {kind: round(n / 2**20, 1) for kind, n in peak.items()}}))


if __name__ == "__main__":
    main()
