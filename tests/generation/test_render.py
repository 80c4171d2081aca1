"""`render_image` (generation/pipeline.py): in fp32 the very image the diffusers pipeline makes itself; the
VAE decodes in its own dtype with a caller's autocast off (training samples under fp16 autocast would decode
SDXL's VAE in fp16, which overflows to black images); `load_pipeline` in fp16 keeps a force_upcast VAE in
fp32."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from lora_scripts.generation.pipeline import SamplingSettings, load_pipeline, render_image
from lora_scripts.generation.samplers import make_scheduler, resolve_sampler
from lora_scripts.models.tiny import build_tiny_sdxl

CPU = torch.device("cpu")
PROMPT = "ink wash painting of a heron, misty lake, morning light"


@pytest.fixture(scope="module")
def xl_dir(tmp_path_factory) -> Path:
    return build_tiny_sdxl(tmp_path_factory.mktemp("render_xl") / "tiny-sdxl")


@pytest.fixture
def model_dirs(tiny_dir, xl_dir) -> dict[str, Path]:
    return {"sd": tiny_dir, "xl": xl_dir}


def _settings(negative_prompt: str = "") -> SamplingSettings:
    return SamplingSettings(
        sampler=resolve_sampler("euler_a"), steps=3, width=64, height=48, negative_prompt=negative_prompt
    )


def _load(path: Path, dtype: torch.dtype = torch.float32):
    return load_pipeline(str(path), resolve_sampler("euler_a"), device=CPU, dtype=dtype).pipe


@pytest.mark.parametrize("family", ["sd", "xl"])
@pytest.mark.parametrize("negative_prompt", ["", "blurry, lowres"])
def test_fp32_image_is_the_pipelines_own(model_dirs, family, negative_prompt):
    """Our decode (and the text path for prompts of one chunk) changes no pixel: the pipeline called as
    render_image called it before, decoding itself, gives the same bytes."""
    pipe = _load(model_dirs[family])
    settings = _settings(negative_prompt)
    ours = np.asarray(render_image(pipe, PROMPT, settings, seed=5, progress=False))
    config = pipe.scheduler.config
    pipe.scheduler = make_scheduler(settings.sampler, config, config.get("prediction_type", "epsilon"))
    theirs = pipe(
        prompt=PROMPT,
        negative_prompt=negative_prompt or None,
        num_inference_steps=settings.steps,
        guidance_scale=settings.cfg_scale,
        width=settings.width,
        height=settings.height,
        generator=torch.Generator(device="cpu").manual_seed(5),
        output_type="pil",
    ).images[0]
    assert ours.shape == (48, 64, 3)
    assert np.array_equal(ours, np.asarray(theirs))


def _decode_dtypes(pipe) -> tuple[list[torch.dtype], list[torch.dtype]]:
    """Record the dtype the VAE decoder's first conv reads and its last conv writes."""
    read: list[torch.dtype] = []
    written: list[torch.dtype] = []
    decoder = pipe.vae.decoder
    decoder.conv_in.register_forward_pre_hook(lambda module, args: read.append(args[0].dtype))
    decoder.conv_out.register_forward_hook(lambda module, args, output: written.append(output.dtype))
    return read, written


def test_the_vae_decodes_in_its_own_dtype_under_half_autocast(xl_dir):
    """Under bf16 autocast (CPU's half autocast; training's fp16 one on GPU works alike) the UNet runs in
    bf16, but the fp32 VAE decodes in fp32. The pipeline's own decode runs the decoder in bf16 there."""
    pipe = _load(xl_dir)
    assert pipe.vae.dtype == torch.float32
    read, written = _decode_dtypes(pipe)
    unet_out: list[torch.dtype] = []
    pipe.unet.conv_out.register_forward_hook(lambda module, args, output: unet_out.append(output.dtype))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        image = render_image(pipe, PROMPT, _settings(), seed=1, progress=False)
        assert unet_out and set(unet_out) == {torch.bfloat16}  # autocast was on
        assert read == written == [torch.float32]
        pipe(prompt=PROMPT, num_inference_steps=1, width=64, height=48, output_type="pil")
    assert read[1:] == written[1:] == [torch.bfloat16]  # what the fix avoids
    assert np.asarray(image).std() > 0


@pytest.mark.parametrize("family", ["sd", "xl"])
def test_fp16_load_keeps_a_force_upcast_vae_in_fp32_and_bf16_casts_it(model_dirs, family):
    fp32 = _load(model_dirs[family])
    fp16 = _load(model_dirs[family], torch.float16)
    assert fp16.vae.config.force_upcast
    assert fp16.vae.dtype == torch.float32
    assert all(torch.equal(a, b) for a, b in zip(fp16.vae.parameters(), fp32.vae.parameters(), strict=True))
    encoders = [fp16.text_encoder, getattr(fp16, "text_encoder_2", None)]
    assert {m.dtype for m in [fp16.unet, *encoders] if m is not None} == {torch.float16}
    bf16 = _load(model_dirs[family], torch.bfloat16)
    assert bf16.vae.dtype == bf16.unet.dtype == torch.bfloat16  # bf16 does not overflow: no upcast
