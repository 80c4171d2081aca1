"""diffusers inference pipelines over a family's modules as they are: no copy, move or cast.

Each family's `sampling_pipeline` builds its pipeline here, for sampling during training (the modules carry
the adapter being trained) and for the `generate` command (the modules just loaded). The modules stay
shared: LoRAs loaded into the pipeline are loaded into them.

What the pipelines do not do as A1111 does is done here, per pipeline:
- `prompt_arguments`: prompts longer than 75 tokens (and clip skip) as A1111 reads them, as embeddings;
- `decode_latents`: the VAE decode with autocast off, in the VAE's own dtype.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from diffusers import (
    DiffusionPipeline,
    FluxPipeline,
    SchedulerMixin,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
)
from PIL import Image
from torch import nn

from lora_scripts.models.long_prompts import chunk_input_ids, prompt_chunks

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


def flux_pipeline(
    transformer: nn.Module,
    vae: nn.Module,
    text_encoders: tuple[nn.Module, nn.Module],
    tokenizers: tuple[object, object],
    scheduler: SchedulerMixin,
) -> FluxPipeline:
    """A FLUX.1 FluxPipeline: text_encoders / tokenizers are (CLIP-L, T5-XXL)."""
    return FluxPipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoders[0],
        tokenizer=tokenizers[0],
        text_encoder_2=text_encoders[1],
        tokenizer_2=tokenizers[1],
        transformer=transformer,
    )


def unwrapped(module: nn.Module) -> nn.Module:
    """The `unwrap` of modules that no accelerate wrapper holds (the `generate` command's)."""
    return module


def prompt_arguments(
    pipe: DiffusionPipeline, prompt: str, negative_prompt: str, clip_skip: int
) -> dict[str, Any]:
    """The prompt arguments of a `pipe(...)` call for `prompt` and `negative_prompt` ("" for none) at
    `clip_skip` (A1111's numbering: 1 is the family's own layer).

    When every text fits in one chunk of 75 tokens and clip_skip is 1, the texts themselves: the pipeline
    encodes them, and the images are diffusers' own. Otherwise the pipeline's embeddings, computed here as
    A1111 computes them: each text in chunks of 75 tokens (models/long_prompts.py), each chunk encoded on its
    own and all its 77 states kept, the shorter text padded with empty chunks; the layer read as the
    pipeline reads it for the prompt, and for the negative prompt as well. (diffusers 0.42 reads the
    negative prompt at the family's own layer whatever the clip skip, and its SD clip skip fails on
    transformers 5's CLIPTextModel, which has no `text_model`.)
    """
    if isinstance(pipe, FluxPipeline):
        # FLUX.1-dev is guidance-distilled: the pipeline's guidance_scale is its guidance input, and a
        # negative prompt would need true CFG (two passes), which neither sd-scripts' samples nor ComfyUI's
        # default do. T5 reads up to the family's length (the tokenizer's, set by the family).
        return {"prompt": prompt, "max_sequence_length": min(pipe.tokenizer_2.model_max_length, 512)}
    tokenizers = [t for t in (pipe.tokenizer, getattr(pipe, "tokenizer_2", None)) if t is not None]
    fits = all(len(prompt_chunks(t, text)) == 1 for t in tokenizers for text in (prompt, negative_prompt))
    if fits and clip_skip <= 1:
        return {"prompt": prompt, "negative_prompt": negative_prompt or None}
    encode = _prompt_encoder(pipe)
    with torch.no_grad():
        return encode(pipe, prompt, negative_prompt, clip_skip)


def embedding_arguments(pipe: DiffusionPipeline, embeddings: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The prompt arguments of a `pipe(...)` call from a family's conditioning (`encode_prompts`) instead
    of the text: FluxPipeline's prompt_embeds (T5's states) and pooled_prompt_embeds (CLIP-L's)."""
    if not isinstance(pipe, FluxPipeline):
        raise ValueError(f"{type(pipe).__name__} renders from its prompts, not from embeddings")
    return {
        "prompt_embeds": embeddings["encoder_hidden_states"],
        "pooled_prompt_embeds": embeddings["pooled_projections"],
    }


def sd_prompt_embeds(
    pipe: StableDiffusionPipeline, prompt: str, negative_prompt: str, clip_skip: int
) -> dict[str, torch.Tensor]:
    """{"prompt_embeds", "negative_prompt_embeds"}: each [1, n * 77, C], n the chunk count of the longer
    text. Clip skip as StableDiffusionPipeline.encode_prompt: the last layer's output, or the clip_skip-th
    hidden state from the end through the final layer norm."""
    encoder, tokenizer = pipe.text_encoder, pipe.tokenizer
    chunks = [prompt_chunks(tokenizer, text) for text in (prompt, negative_prompt)]
    num_chunks = max(len(c) for c in chunks)

    def encode(ids: torch.Tensor) -> torch.Tensor:
        out = encoder(ids.unsqueeze(0).to(encoder.device), output_hidden_states=clip_skip > 1)
        if clip_skip <= 1:
            return out[0]
        # transformers 5's CLIPTextModel holds final_layer_norm itself; 4.x's under text_model.
        norm = getattr(encoder, "text_model", encoder).final_layer_norm
        return norm(out.hidden_states[-clip_skip])

    positive, negative = (
        torch.cat([encode(ids) for ids in chunk_input_ids(tokenizer, c, num_chunks)], dim=1) for c in chunks
    )
    return {"prompt_embeds": positive, "negative_prompt_embeds": negative}


def sdxl_prompt_embeds(
    pipe: StableDiffusionXLPipeline, prompt: str, negative_prompt: str, clip_skip: int
) -> dict[str, torch.Tensor]:
    """{"prompt_embeds", "negative_prompt_embeds"}: [1, n * 77, C1 + C2], both encoders' states side by side
    as the pipeline joins them; {"pooled_prompt_embeds", "negative_pooled_prompt_embeds"}: [1, P], encoder 2's
    pooled projection of the text's first chunk (A1111's choice). Layer as StableDiffusionXLPipeline.
    encode_prompt reads it: clip skip counted from the penultimate, no final layer norm. An empty negative
    prompt is zeros when the pipeline's `force_zeros_for_empty_prompt` says so (SDXL base, A1111's "force
    zero negative prompt")."""
    encoders = (pipe.text_encoder, pipe.text_encoder_2)
    tokenizers = (pipe.tokenizer, pipe.tokenizer_2)
    texts = (prompt, negative_prompt)
    chunks = [[prompt_chunks(tokenizer, text) for text in texts] for tokenizer in tokenizers]
    num_chunks = max(len(c) for per_encoder in chunks for c in per_encoder)
    states: list[list[torch.Tensor]] = [[], []]  # [text][encoder]: [1, n * 77, C]
    pooled: list[torch.Tensor] = []  # [text]: [1, P]
    for encoder, tokenizer, per_text in zip(encoders, tokenizers, chunks, strict=True):
        for t, text_chunks in enumerate(per_text):
            outputs = [
                encoder(ids.unsqueeze(0).to(encoder.device), output_hidden_states=True)
                for ids in chunk_input_ids(tokenizer, text_chunks, num_chunks)
            ]
            states[t].append(torch.cat([out.hidden_states[-(clip_skip + 1)] for out in outputs], dim=1))
            if encoder is pipe.text_encoder_2:
                pooled.append(outputs[0].text_embeds)
    embeds = [torch.cat(per_encoder, dim=-1) for per_encoder in states]
    if not negative_prompt and pipe.config.force_zeros_for_empty_prompt:
        embeds[1], pooled[1] = torch.zeros_like(embeds[0]), torch.zeros_like(pooled[0])
    return {
        "prompt_embeds": embeds[0],
        "negative_prompt_embeds": embeds[1],
        "pooled_prompt_embeds": pooled[0],
        "negative_pooled_prompt_embeds": pooled[1],
    }


PromptEncoder = Callable[[Any, str, str, int], dict[str, torch.Tensor]]
_PROMPT_ENCODERS: tuple[tuple[type, PromptEncoder], ...] = (
    (StableDiffusionXLPipeline, sdxl_prompt_embeds),
    (StableDiffusionPipeline, sd_prompt_embeds),
)


def _prompt_encoder(pipe: DiffusionPipeline) -> PromptEncoder:
    for pipeline_type, encode in _PROMPT_ENCODERS:
        if isinstance(pipe, pipeline_type):
            return encode
    raise TypeError(f"no prompt encoder for {type(pipe).__name__}")


def decode_latents(
    pipe: DiffusionPipeline, latents: torch.Tensor, size: tuple[int, int] | None = None
) -> list[Image.Image]:
    """What a pipeline called with output_type="latent" returned ([B, 4, H/8, W/8]; FLUX.1's packed
    [B, tokens, 64] with `size` = (height, width) in pixels) → B PIL images, as the pipelines decode them
    (un-normalize with the VAE config's latents_mean / latents_std where it has them, else divide by
    scaling_factor, then add shift_factor where it has one; decode; to 8-bit RGB), but always in the VAE's
    own dtype with autocast off. Under a caller's fp16 autocast (training samples) the pipelines would decode
    in fp16, and SDXL's VAE overflows there (NaN: black images) even with its weights kept in fp32."""
    vae = pipe.vae
    config = vae.config
    if latents.dim() == 3:  # FLUX.1's packed tokens [B, h/2 * w/2, 4C]: back to [B, C, h, w] for the VAE
        height, width = size  # type: ignore[misc] - packed latents come with their image size
        latents = FluxPipeline._unpack_latents(latents, height, width, pipe.vae_scale_factor)
    with torch.no_grad(), torch.autocast(vae.device.type, enabled=False):
        latents = latents.to(vae.device, vae.dtype)
        mean, std = getattr(config, "latents_mean", None), getattr(config, "latents_std", None)
        if mean is not None and std is not None:
            channels = latents.shape[1]
            mean = torch.tensor(mean).view(1, channels, 1, 1).to(latents.device, latents.dtype)
            std = torch.tensor(std).view(1, channels, 1, 1).to(latents.device, latents.dtype)
            latents = latents * std / config.scaling_factor + mean
        else:
            latents = latents / config.scaling_factor
        shift = getattr(config, "shift_factor", None)  # FLUX.1's VAE: latents = (z - shift) * scale
        if shift is not None:
            latents = latents + shift
        image = vae.decode(latents, return_dict=False)[0]
    # No safety checker: every image is un-normalized from [-1, 1] (SD's do_denormalize).
    return pipe.image_processor.postprocess(image, output_type="pil", do_denormalize=[True] * image.shape[0])
