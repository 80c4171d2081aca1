"""A diffusers StableDiffusionPipeline around an SD 1.x/2.x model, and rendering one image with it.

Two ways in:
- `load_pipeline(base_model, …)` loads a base model offline (single file, diffusers folder or cached hub id,
  through `load_sd_components`) and moves it to the device in the inference dtype (the `generate` command);
- `pipeline_from_modules(unet, vae, text_encoder, tokenizer, scheduler)` wraps modules that are already
  loaded and placed (sampling during training, where the UNet carries the adapter being trained).
Either way `render_image` draws one picture for one seed, so image i of a batch with seed s is the image
`render_image(…, seed=s + i)` gives alone.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import SchedulerMixin, StableDiffusionPipeline
from PIL import Image

from lora_scripts.devices import pick_device
from lora_scripts.errors import UserError
from lora_scripts.generation.options import DeviceName, Precision
from lora_scripts.generation.samplers import SamplerSpec, make_scheduler
from lora_scripts.models.sd_loading import SDComponents, load_sd_components

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SamplingSettings:
    """Everything about one picture except the prompt and the seed. Sizes in pixels (multiples of 8)."""

    sampler: SamplerSpec
    steps: int = 30
    cfg_scale: float = 7.0
    width: int = 512
    height: int = 512
    negative_prompt: str = ""
    clip_skip: int = 1  # A1111's numbering: 1 = the text encoder's last layer, 2 = the penultimate


@dataclass
class LoadedPipeline:
    """A ready pipeline and what is known about its base model (for infotext and scheduler changes)."""

    pipe: StableDiffusionPipeline
    components: SDComponents  # the same modules the pipe holds (moved and cast)
    device: torch.device
    dtype: torch.dtype


def resolve_device(name: DeviceName) -> torch.device:
    """`auto`: CUDA, else Apple MPS, else CPU. UserError for a device this machine does not have."""
    return pick_device(None if name == "auto" else name)


def resolve_dtype(precision: Precision, device: torch.device) -> torch.dtype:
    """`auto`: fp16 on a GPU (half the memory, same pictures in practice), fp32 on CPU.

    fp16 on CPU is refused: many CPU kernels have no half-precision version, or a very slow one.
    """
    if precision == "auto":
        return torch.float32 if device.type == "cpu" else torch.float16
    if precision == "fp16" and device.type == "cpu":
        raise UserError("--precision fp16 is not supported on CPU; use fp32 (or bf16).")
    return DTYPES[precision]


def pipeline_from_modules(
    unet: torch.nn.Module,
    vae: torch.nn.Module,
    text_encoder: torch.nn.Module,
    tokenizer: object,
    scheduler: SchedulerMixin,
) -> StableDiffusionPipeline:
    """A StableDiffusionPipeline over these modules as they are: no copy, move or cast, no safety checker.

    The modules stay shared: LoRAs loaded into the pipeline are loaded into them.
    """
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def load_pipeline(
    base_model: str,
    sampler: SamplerSpec,
    *,
    device: torch.device,
    dtype: torch.dtype,
    config_dir: str | None = None,
    v_parameterization: bool | None = None,
) -> LoadedPipeline:
    """Load `base_model` offline and build its pipeline with `sampler`, on `device` in `dtype`."""
    components = load_sd_components(
        base_model,
        config_dir=Path(config_dir) if config_dir else None,
        v_parameterization=v_parameterization,
    )
    scheduler = make_scheduler(sampler, components.noise_scheduler.config, components.prediction_type)
    pipe = pipeline_from_modules(
        components.unet, components.vae, components.text_encoder, components.tokenizer, scheduler
    )
    # Cast on the CPU before moving (no fp32 copy on the GPU); skip the no-op cast, which makes diffusers
    # warn about fp32-only modules that SD's models do not have.
    if dtype != torch.float32:
        pipe.to(dtype=dtype)
    pipe.to(device)
    return LoadedPipeline(pipe=pipe, components=components, device=device, dtype=dtype)


def enable_memory_savers(
    pipe: StableDiffusionPipeline, *, attention_slicing: bool, vae_slicing: bool, vae_tiling: bool
) -> None:
    """Trade speed for memory: attention in slices, the VAE one image at a time, the VAE in tiles."""
    if attention_slicing:
        pipe.enable_attention_slicing()
    if vae_slicing:
        pipe.vae.enable_slicing()
    if vae_tiling:
        pipe.vae.enable_tiling()


def render_image(
    pipe: StableDiffusionPipeline,
    prompt: str,
    settings: SamplingSettings,
    seed: int,
    *,
    progress: bool = True,
) -> Image.Image:
    """One image for `prompt` (LoRA tags already removed) and `seed`, with the pipeline's LoRAs as set.

    The pipeline gets a fresh scheduler for `settings.sampler` (same noise schedule and prediction type), so
    no sampler state carries over from the previous image.

    The initial noise and the ancestral samplers' noise come from a CPU generator seeded with `seed`, so a
    seed gives the same picture on CPU and GPU (up to kernel rounding).
    """
    config = pipe.scheduler.config
    pipe.scheduler = make_scheduler(settings.sampler, config, config.get("prediction_type", "epsilon"))
    pipe.set_progress_bar_config(disable=not progress, leave=False)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    result = pipe(
        prompt=prompt,
        negative_prompt=settings.negative_prompt or None,
        num_inference_steps=settings.steps,
        guidance_scale=settings.cfg_scale,
        width=settings.width,
        height=settings.height,
        generator=generator,
        output_type="pil",
        # diffusers counts the layers skipped (A1111's 2 is diffusers' 1); None keeps the last layer.
        clip_skip=settings.clip_skip - 1 if settings.clip_skip > 1 else None,
    )
    return result.images[0]
