"""A diffusers pipeline around a base model (StableDiffusionPipeline for SD 1.x/2.x, StableDiffusionXLPipeline
for SDXL), and rendering one image with it.

Two ways in, both through the model family's `sampling_pipeline` (models/inference.py):
- `load_pipeline(base_model, …)` loads a base model offline (single file, diffusers folder or cached hub id,
  as its family: `load_family`) and moves it to the device in the inference dtype (the `generate` command);
- sampling during training asks the family being trained for its pipeline (training/sampling.py), over
  modules already loaded and placed, whose UNet carries the adapter being trained.
Either way `render_image` draws one picture for one seed, so image i of a batch with seed s is the image
`render_image(…, seed=s + i)` gives alone.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler
from PIL import Image

from lora_scripts.devices import pick_device
from lora_scripts.errors import UserError
from lora_scripts.generation.options import DeviceName, Precision
from lora_scripts.generation.samplers import SamplerSpec, make_scheduler
from lora_scripts.models.flux import FluxLoad
from lora_scripts.models.registry import load_family
from lora_scripts.models.sd_loading import SDComponents
from lora_scripts.models.sdxl_loading import SDXLComponents

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
    clip_skip: int = 1  # A1111's numbering: 1 = the family's own layer (SD's last), 2 = the one before


@dataclass
class LoadedPipeline:
    """A ready pipeline and what is known about its base model (for infotext and scheduler changes)."""

    pipe: DiffusionPipeline  # StableDiffusionPipeline or StableDiffusionXLPipeline
    components: SDComponents | SDXLComponents  # the same modules the pipe holds (moved and cast)
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


def load_pipeline(
    base_model: str,
    sampler: SamplerSpec,
    *,
    device: torch.device,
    dtype: torch.dtype,
    config_dir: str | None = None,
    v_parameterization: bool | None = None,
    flux: FluxLoad | None = None,
) -> LoadedPipeline:
    """Load `base_model` offline and build its family's pipeline with `sampler`, on `device` in `dtype`
    (`flux`: a FLUX.1 single file's vae / clip_l / t5xxl files). Raises the loaders' UserError for a model
    that is none of SD 1.x, 2.x, SDXL and FLUX.1."""
    family = load_family(
        base_model,
        config_dir=Path(config_dir) if config_dir else None,
        v_parameterization=v_parameterization,
        flux=flux,
    )
    schedule = dict(family.schedule_config)
    if family.info.zero_terminal_snr:  # a `ztsnr` file (NoobAI v-pred) samples as ComfyUI samples it
        schedule["rescale_betas_zero_snr"] = True
    scheduler = make_scheduler(sampler, schedule, family.info.prediction_type)
    pipe = family.sampling_pipeline(scheduler).pipe
    # Cast on the CPU before moving (no fp32 copy on the GPU). A VAE that overflows in fp16 (SDXL's; diffusers
    # marks it `force_upcast`, and its SDXL pipeline upcasts it for each decode) stays fp32, as training keeps
    # it: render_image decodes in the VAE's own dtype.
    if dtype != torch.float32:
        keep_vae_fp32 = dtype == torch.float16 and pipe.vae.config.get("force_upcast", False)
        for module in pipe.components.values():
            if isinstance(module, torch.nn.Module) and not (keep_vae_fp32 and module is pipe.vae):
                module.to(dtype=dtype)
    pipe.to(device)
    return LoadedPipeline(pipe=pipe, components=family.components, device=device, dtype=dtype)


def enable_memory_savers(
    pipe: DiffusionPipeline, *, attention_slicing: bool, vae_slicing: bool, vae_tiling: bool
) -> None:
    """Trade speed for memory: attention in slices, the VAE one image at a time, the VAE in tiles."""
    if attention_slicing:
        pipe.enable_attention_slicing()
    if vae_slicing:
        pipe.vae.enable_slicing()
    if vae_tiling:
        pipe.vae.enable_tiling()


def render_image(
    pipe: DiffusionPipeline,
    prompt: str,
    settings: SamplingSettings,
    seed: int,
    *,
    progress: bool = True,
    on_step: Callable[[int, int], None] | None = None,
    embeddings: dict[str, torch.Tensor] | None = None,
) -> Image.Image:
    """One image for `prompt` (LoRA tags already removed) and `seed`, with the pipeline's LoRAs as set.
    `embeddings`: the family's conditioning of `prompt`, computed before (`encode_prompts`), for a pipeline
    whose text encoders have left the device (ModelFamily.samples_from_embeddings).

    `on_step(done, total)` is called after each denoising step (`total`: the sampler's steps, which for Heun
    are not the steps asked for); an exception it raises stops the image there and propagates.

    The pipeline gets a fresh scheduler for `settings.sampler` (same noise schedule and prediction type), so
    no sampler state carries over from the previous image.

    The initial noise and the ancestral samplers' noise come from a CPU generator seeded with `seed`, so a
    seed gives the same picture on CPU and GPU (up to kernel rounding).

    Prompts longer than 75 tokens are read in chunks as A1111 reads them (`prompt_arguments`). The pipeline
    stops at the latents and `decode_latents` decodes them in the VAE's dtype with autocast off, so a caller's
    fp16 autocast (training samples) does not decode in fp16; in fp32 the image is the pipeline's own.
    """
    # Imported here: diffusers' pipeline modules load only when something renders.
    from lora_scripts.models.inference import decode_latents, embedding_arguments, prompt_arguments

    config = pipe.scheduler.config
    flow = isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler)  # FLUX.1
    pipe.scheduler = make_scheduler(
        settings.sampler, config, "flow" if flow else config.get("prediction_type", "epsilon")
    )
    pipe.set_progress_bar_config(disable=not progress, leave=False)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    step_callback = {}
    if on_step is not None:

        def after_step(pipe: DiffusionPipeline, index: int, timestep: object, tensors: dict) -> dict:
            on_step(index + 1, pipe.num_timesteps)
            return tensors

        step_callback = {"callback_on_step_end": after_step}
    if embeddings is None:
        arguments = prompt_arguments(pipe, prompt, settings.negative_prompt, settings.clip_skip)
    else:
        arguments = embedding_arguments(pipe, embeddings)
    latents = pipe(
        **arguments,
        num_inference_steps=settings.steps,
        guidance_scale=settings.cfg_scale,
        width=settings.width,
        height=settings.height,
        generator=generator,
        output_type="latent",
        **step_callback,
    ).images
    return decode_latents(pipe, latents, (settings.height, settings.width))[0]
