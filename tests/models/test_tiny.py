"""The tiny model: deterministic bytes, SD's shapes and module names, loadable by diffusers' pipeline."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import torch

from lora_scripts.models.tiny import build_tiny_sd, build_tiny_sd_components


def digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def test_same_seed_same_bytes(tmp_path, tiny_sd_dir):
    start = time.perf_counter()
    again = build_tiny_sd(tmp_path / "again")
    assert time.perf_counter() - start < 2.0
    assert digest(again) == digest(tiny_sd_dir)
    assert digest(build_tiny_sd(tmp_path / "other", seed=1)) != digest(tiny_sd_dir)
    assert {
        "model_index.json",
        "unet/config.json",
        "tokenizer/vocab.json",
        "scheduler/scheduler_config.json",
    } <= set(digest(again))


def test_building_leaves_the_callers_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_tiny_sd_components(seed=5)
    assert torch.equal(torch.rand(3), expected)


def test_sd_shapes_and_names(tiny_sd):
    with torch.no_grad():
        latents = tiny_sd.vae.encode(torch.zeros(1, 3, 64, 64)).latent_dist.mean
        assert latents.shape == (1, 4, 8, 8)  # 8x down, 4 channels, as SD
        ids = tiny_sd.tokenizer("a photo of a cat", padding="max_length", return_tensors="pt").input_ids
        context = tiny_sd.text_encoder(ids).last_hidden_state
        assert context.shape == (1, 77, 32)
        assert tiny_sd.unet(latents, 999, encoder_hidden_states=context).sample.shape == (1, 4, 8, 8)
    names = {name for name, _ in tiny_sd.unet.named_modules()}
    for leaf in ("to_q", "to_k", "to_v", "to_out.0"):
        assert f"down_blocks.0.attentions.0.transformer_blocks.0.attn2.{leaf}" in names
        assert f"up_blocks.1.attentions.1.transformer_blocks.0.attn1.{leaf}" in names
    assert tiny_sd.vae.config.scaling_factor == 0.18215
    assert tiny_sd.text_encoder.config.vocab_size == 49408


def test_diffusers_pipeline_generates_from_the_folder(tiny_sd_dir):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_dir, safety_checker=None, local_files_only=True)
    image = pipe("a photo of a cat", num_inference_steps=2, height=64, width=64, output_type="np").images
    assert image.shape == (1, 64, 64, 3)
