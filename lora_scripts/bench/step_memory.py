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
    python -m lora_scripts.bench.step_memory --model flux-dev --resolution 1024 --fake --blocks-to-swap 18

`--fake` runs the step on torch's fake tensors (`FakeTensorMode`): every tensor has its shape, dtype and
device but no memory and no values, and no arithmetic is done, so FLUX.1-dev's 12 B-parameter step is counted
in a minute on a machine with less RAM than its weights. MemTracker adds up the same bytes as for real
tensors (tests/bench/test_step_memory.py compares both on the tiny models); there is no loss to report.
With `--blocks-to-swap` the swapped weights wait on the meta device, standing for the CPU, and the count is
of the device's tensors.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.weak import WeakIdKeyDictionary

from lora_scripts.bench.flops import TIMESTEP, meta_family, step_conditioning
from lora_scripts.bench.workspace import BUILT_IN_MODELS
from lora_scripts.models.block_swap import BlockSwap
from lora_scripts.models.family import LoraTargets, ModelFamily
from lora_scripts.models.lora import LoraSpec
from lora_scripts.models.lora_presets import FLUX_PRESETS, UNET_PRESETS
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
    blocks_to_swap: int = 0  # FLUX.1: blocks whose frozen weights stay off the device (config key)
    fake: bool = (
        False  # count with fake tensors: shapes only, no memory, no arithmetic (see count_step_memory)
    )


def materialize(module: nn.Module, dtype: torch.dtype) -> None:
    """A module built on the meta device (or anywhere: its tensors are replaced) → new CPU tensors of `dtype`,
    initialised as its layers initialise themselves, from seed 0 (speed and memory do not depend on the
    values, but NaN or denormal garbage could). Under a FakeTensorMode the new tensors are fake."""
    for layer in module.modules():  # (not module.to_empty: it cannot swap a real tensor for a fake one)
        for name, param in layer._parameters.items():
            if param is not None:
                new = torch.empty(param.shape, dtype=_cast(param, dtype), device="cpu")
                layer._parameters[name] = nn.Parameter(new, requires_grad=param.requires_grad)
        for name, buffer in layer._buffers.items():
            if buffer is not None:
                layer._buffers[name] = torch.empty(buffer.shape, dtype=_cast(buffer, dtype), device="cpu")
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


def _cast(tensor: torch.Tensor, dtype: torch.dtype) -> torch.dtype:
    return dtype if tensor.is_floating_point() else tensor.dtype


def prepare_step(settings: StepMemorySettings) -> tuple[ModelFamily, dict[str, torch.Tensor], torch.Tensor]:
    """The family with its denoiser on the CPU (LoRA added, frozen weights cast or quantized, checkpointing
    as asked) and the step's inputs: conditioning and latents for one image, batch 1."""
    family = meta_family(settings.model)
    cond_shapes = step_conditioning(family, settings.resolution)
    lora = LoraTargets(settings.target_modules, None), LoraSpec(rank=settings.rank, alpha=settings.rank)
    if not settings.fake:
        materialize(family.denoiser, WEIGHT_DTYPES[settings.weights])
        family.add_lora(*lora)
        return _prepare(settings, family, cond_shapes)
    from torch._subclasses.fake_tensor import FakeTensorMode

    # The model, its LoRA and its conditioning's shapes are made with real (meta) tensors first: a scheduler
    # reads values as it is made, and peft's layers cannot move fake tensors; only then does the denoiser
    # become fake (its LoRA's values are then the layers' own initialisation, which a count does not read).
    family.add_lora(*lora)
    with FakeTensorMode(allow_non_fake_inputs=True):
        materialize(family.denoiser, WEIGHT_DTYPES[settings.weights])
        return _prepare(settings, family, cond_shapes)


def _prepare(
    settings: StepMemorySettings, family: ModelFamily, cond_shapes: dict[str, torch.Tensor]
) -> tuple[ModelFamily, dict[str, torch.Tensor], torch.Tensor]:
    denoiser = family.denoiser
    for param in denoiser.parameters():
        if param.requires_grad:
            param.data = param.data.float()  # as attach_lora: the LoRA trains in fp32
    if settings.quantize_base != "no":
        quantize_frozen(denoiser, settings.quantize_base)
    if settings.blocks_to_swap:
        if not settings.fake:
            raise ValueError("blocks_to_swap is counted with fake tensors (the host is then the meta device)")
        # The count's device is the CPU; the host, where the swapped weights wait, is the meta device.
        blocks = family.swap_blocks(family.denoiser, settings.blocks_to_swap)
        with BlockSwap(blocks, "cpu", host="meta").held_back():
            pass
    if settings.gradient_checkpointing:
        denoiser.enable_gradient_checkpointing()
    denoiser.train()
    generator = torch.Generator().manual_seed(0)
    cond = {
        name: torch.randn(shape.shape, generator=generator).to(shape.dtype)
        for name, shape in cond_shapes.items()
    }
    side = settings.resolution // 8
    latents = torch.randn(1, family.vae.config.latent_channels, side, side, generator=generator)
    return family, cond, latents


def _peak_tracker() -> object:
    """A MemTracker (torch's private tool, imported here: torch 2.1, our floor, lacks it) that keeps only the
    device-wide peak."""
    from torch.distributed._tools.mem_tracker import _TOTAL_KEY, MemTracker

    class PeakTracker(MemTracker):
        """MemTracker keeping only the device-wide peak. Its own keeps one per module too, walking every
        module after every operation: hours for FLUX.1's thousands of modules; this count needs minutes."""

        def _update_peak_stats(self, peak_state: object) -> None:
            for device, snapshot in self._curr_mem_snap.items():
                if self._peak_mem.get(device, 0) < snapshot[_TOTAL_KEY]:
                    self._peak_mem[device] = snapshot[_TOTAL_KEY]
                    self._peak_mem_snap[device] = dict(snapshot)

    return PeakTracker()


class _NoHook:
    def remove(self) -> None:
        pass


class _FrozenHaveHooks(WeakIdKeyDictionary):
    def get(self, key: torch.Tensor, default: object = None) -> object:
        if not key.requires_grad:
            return (_NoHook(), _NoHook())
        return super().get(key, default)


def count_step_memory(settings: StepMemorySettings) -> dict:
    """Bytes by kind at the counted step's peak ({"Parameter", "Gradient", "Activation", "Temp", "Optstate",
    ..., "Total"}), the LoRA's parameter count, the loss and the counted step's seconds (with tracking)."""
    family, cond, latents = prepare_step(settings)
    if not settings.fake:
        return _count(settings, family, cond, latents)
    # The fake tensors' own mode (the one they were made in): their arithmetic runs in it.
    with next(iter(family.denoiser.parameters())).fake_mode:
        return _count(settings, family, cond, latents)


def _count(
    settings: StepMemorySettings, family: ModelFamily, cond: dict[str, torch.Tensor], latents: torch.Tensor
) -> dict:
    denoiser = family.denoiser
    optimizer = torch.optim.AdamW([p for p in denoiser.parameters() if p.requires_grad], lr=1e-4)
    tracker = _peak_tracker()
    # MemTracker hooks every parameter's gradient, and a frozen weight cannot take a hook: it is told that
    # they (and the lent copies block swap puts in the modules as they run) have theirs already.
    tracker._param_to_grad_hook_handles = _FrozenHaveHooks()
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
        "loss": None if settings.fake else loss.item(),
        "counted_step_s": round(seconds, 1),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Peak tensor memory of one LoRA training step, on the CPU")
    parser.add_argument("--model", choices=list(BUILT_IN_MODELS), default="sdxl")
    parser.add_argument("--resolution", type=int, help="image size (default: the bench's for the model)")
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank (default 16)")
    parser.add_argument(
        "--target-modules",
        choices=sorted({*UNET_PRESETS, *FLUX_PRESETS}),
        default="kohya",
        help="LoRA layers",
    )
    parser.add_argument("--weights", choices=sorted(WEIGHT_DTYPES), default="bf16", help="frozen weights")
    parser.add_argument("--no-gradient-checkpointing", action="store_true")
    parser.add_argument("--quantize-base", choices=["no", "int8", "float8"], default="no")
    parser.add_argument(
        "--blocks-to-swap", type=int, default=0, help="FLUX.1's blocks_to_swap (needs --fake)"
    )
    parser.add_argument(
        "--fake", action="store_true", help="count with fake tensors: no memory or arithmetic (FLUX.1-dev)"
    )
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
        blocks_to_swap=args.blocks_to_swap,
        fake=args.fake,
    )
    result = count_step_memory(settings)
    peak = result.pop("peak_bytes")
    print(json.dumps({**result, "peak_mib": {kind: round(n / 2**20, 1) for kind, n in peak.items()}}))


if __name__ == "__main__":
    main()
