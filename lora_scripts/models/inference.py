"""diffusers inference pipelines over a family's modules as they are: no copy, move or cast.

Each family's `sampling_pipeline` builds its pipeline here, for sampling during training (the modules carry
the adapter being trained) and for the `generate` command (the modules just loaded). The modules stay
shared: LoRAs loaded into the pipeline are loaded into them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from diffusers import DiffusionPipeline, SchedulerMixin, StableDiffusionPipeline, StableDiffusionXLPipeline
from torch import nn

# Takes off accelerate's wrappers (DDP, compile), e.g. `accelerator.unwrap_model`.
Unwrap = Callable[[nn.Module], nn.Module]


@dataclass(frozen=True)
class SamplingPipeline:
    """A ready pipeline, the modules it runs (what to put in eval mode while it renders) and the clip skip
    it renders with (A1111's numbering: 1 is the family's own layer, e.g. SDXL's penultimate)."""

    pipe: DiffusionPipeline
    modules: tuple[nn.Module, ...]
    clip_skip: int = 1


def sd_pipeline(
    unet: nn.Module, vae: nn.Module, text_encoder: nn.Module, tokenizer: object, scheduler: SchedulerMixin
) -> StableDiffusionPipeline:
    """An SD 1.x/2.x StableDiffusionPipeline, without safety checker."""
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


def sdxl_pipeline(
    unet: nn.Module,
    vae: nn.Module,
    text_encoders: tuple[nn.Module, nn.Module],
    tokenizers: tuple[object, object],
    scheduler: SchedulerMixin,
) -> StableDiffusionXLPipeline:
    """An SDXL StableDiffusionXLPipeline: text_encoders / tokenizers are (CLIP ViT-L, OpenCLIP bigG).

    Its defaults are what A1111 and ComfyUI do: size conditioning original = target = (height, width) with
    crop (0, 0), and an empty negative prompt as zero embeddings (SDXL base's `force_zeros_for_empty_prompt`,
    A1111's "force zero negative prompt"). No invisible watermark: A1111 adds none either.
    """
    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoders[0],
        text_encoder_2=text_encoders[1],
        tokenizer=tokenizers[0],
        tokenizer_2=tokenizers[1],
        unet=unet,
        scheduler=scheduler,
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )


def unwrapped(module: nn.Module) -> nn.Module:
    """The `unwrap` of modules that no accelerate wrapper holds (the `generate` command's)."""
    return module
