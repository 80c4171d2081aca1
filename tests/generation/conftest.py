"""Fixtures for generation tests: the tiny model (folder and single file) and kohya LoRA files for it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lora_scripts.generation.pipeline import load_pipeline
from lora_scripts.generation.samplers import resolve_sampler
from lora_scripts.models.tiny import build_tiny_sd, build_tiny_sd_components
from tests.generation.kohya_files import (
    TEXT_ENCODER,
    UNET_ATTENTION,
    UNET_CONV,
    KohyaModule,
    make_modules,
    write_kohya_file,
)
from tests.helpers.compvis import write_compvis_checkpoint


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    return build_tiny_sd(tmp_path_factory.mktemp("gen_model") / "tiny-sd")


@pytest.fixture(scope="session")
def tiny_file(tmp_path_factory) -> Path:
    """The tiny model as a single CompVis .safetensors checkpoint (what WebUI users have)."""
    tiny = build_tiny_sd_components()
    path = tmp_path_factory.mktemp("gen_file") / "tiny-v1.safetensors"
    return write_compvis_checkpoint(path, tiny.unet, tiny.vae, tiny.text_encoder)


def make_pipe(tiny_dir: Path):
    """A fresh fp32 CPU pipeline of the tiny model (each test may load LoRAs into / fuse its own)."""
    loaded = load_pipeline(
        str(tiny_dir), resolve_sampler("euler_a"), device=torch.device("cpu"), dtype=torch.float32
    )
    return loaded.pipe


@pytest.fixture(scope="session")
def lora_modules(tiny_dir) -> dict[str, list[KohyaModule]]:
    """The tensors of three LoRA files: a style LoRA (UNet attention + TE), a LoCon (conv + attention with
    its own rank and alpha) and a UNet-only one."""
    pipe = make_pipe(tiny_dir)
    return {
        "ink": make_modules(pipe, UNET_ATTENTION, TEXT_ENCODER, rank=4, alpha=2.0, seed=1),
        "locon": make_modules(pipe, UNET_CONV, [], rank=2, alpha=1.0, seed=2)
        + make_modules(pipe, UNET_ATTENTION[:2], [], rank=4, alpha=4.0, seed=3),
        "unet_only": make_modules(pipe, UNET_ATTENTION[:1], [], rank=8, alpha=8.0, seed=4),
    }


@pytest.fixture(scope="session")
def lora_dir(tmp_path_factory, lora_modules) -> Path:
    """A LoRA folder: `ink_style.safetensors` (ss_output_name `ink_painting_v1`), `styles/locon.safetensors`,
    `unet-only.v2.safetensors`."""
    folder = tmp_path_factory.mktemp("loras")
    write_kohya_file(folder / "ink_style.safetensors", lora_modules["ink"], output_name="ink_painting_v1")
    write_kohya_file(folder / "styles" / "locon.safetensors", lora_modules["locon"])
    write_kohya_file(folder / "unet-only.v2.safetensors", lora_modules["unet_only"])
    return folder
