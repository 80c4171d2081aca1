"""What a benchmark trains on, built in a temporary folder: a base model (tiny, SD 1.5-shaped with random
weights, or the user's), generated images with captions, and a config for the real training code."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from lora_scripts.config import TrainConfig, load_config
from lora_scripts.demo import draw_ink_image
from lora_scripts.models.family import ModelFamily
from lora_scripts.models.locate import BaseModelLocation
from lora_scripts.models.registry import load_family
from lora_scripts.models.sd_loading import (
    SDComponents,
    load_clip_tokenizer,
    make_noise_scheduler,
    shipped_config_dir,
)
from lora_scripts.models.stable_diffusion import StableDiffusionFamily
from lora_scripts.models.tiny import build_tiny_sd

# The reference figure (1.71 TFLOP/image at 512²) is for a rank-4 LoRA on the attention layers.
BENCH_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
DEFAULT_RESOLUTION = {"tiny": 64, "sd15": 512}
_SUBJECTS = ["mountain peak", "pine tree", "temple", "river", "moon", "bamboo", "boat", "bridge"]


@dataclass(frozen=True)
class BenchSettings:
    """The knobs of one benchmark run; `resolution` None means the model's default (64 tiny, 512 others)."""

    model: str = "tiny"
    steps: int = 10
    warmup: int = 2
    batch_size: int = 4
    resolution: int | None = None
    precision: str = "no"
    cache: bool = True
    gradient_checkpointing: bool = False
    torch_compile: bool = False  # our loop only: diffusers' LoRA script has no compile option
    # "low": train()'s memory_profile in both loops; it chooses precision, checkpointing and the optimizer
    # unless asked for here, and splits the batch into steps of 1 image with as many accumulated.
    memory_profile: str = "default"
    quantize_base: str = "no"  # both loops: the same model, as 8-bit weights (config key quantize_base)
    device: str = "auto"
    num_images: int | None = None  # None: 4 batches' worth, so a timed run sees several distinct batches

    @property
    def image_size(self) -> int:
        return self.resolution or DEFAULT_RESOLUTION.get(self.model, 512)

    @property
    def image_count(self) -> int:
        return self.num_images or 4 * self.batch_size


def make_images(folder: Path, count: int, size: int) -> None:
    """`count` PNGs of `size`² (the demo's ink paintings) and a metadata.csv with one caption each."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(count):
        name = f"img_{i:03d}.png"
        draw_ink_image(i, seed=i, size=size).save(folder / name)
        rows.append((name, f"{_SUBJECTS[i % len(_SUBJECTS)]} number {i}, ink wash painting, monochrome"))
    with open(folder / "metadata.csv", "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["file_name", "text"])
        writer.writerows(rows)


def write_config(
    root: Path, settings: BenchSettings, base_model: str, *, cache: bool, reference: bool = False
) -> TrainConfig:
    """A training config over the bench data; `cache` turns latent and text-encoder caching on or off.

    `reference`: the optimizer as diffusers' train_text_to_image_lora.py builds it, `torch.optim.AdamW(...)`
    with torch's own kernel choice (`foreach: None`), instead of ours (fused, else foreach), and its
    default of no DataLoader workers instead of ours (automatic).
    """
    data_dir = root / "data"
    kind = "reference" if reference else "cached" if cache else "uncached"
    config = {
        "train_data_dir": str(data_dir),
        "metadata_path": str(data_dir / "metadata.csv"),
        "base_model": base_model,
        "resolution": settings.image_size,
        "lora_rank": 4,
        "target_modules": BENCH_TARGETS,
        "batch_size": settings.batch_size,
        "max_train_steps": 10_000,  # the bench counts its own steps; this only sizes the lr schedule
        "learning_rate": 1e-4,
        "mixed_precision": settings.precision,
        "gradient_checkpointing": settings.gradient_checkpointing,
        "memory_profile": settings.memory_profile,
        "torch_compile": settings.torch_compile and not reference,
        "quantize_base": settings.quantize_base,
        "cache_latents": cache,
        "cache_text_encoder_outputs": cache,
        "output_dir": str(_new_output_dir(root, kind)),
        "seed": 0,
    }
    if settings.memory_profile == "low":
        # Keys left out are the preset's to choose (keys written win): precision unless --precision was
        # given, checkpointing unless --gradient-checkpointing was, and the optimizer (8-bit where it can).
        if settings.precision == "no":
            del config["mixed_precision"]
        if not settings.gradient_checkpointing:
            del config["gradient_checkpointing"]
    if reference:
        if settings.memory_profile != "low":  # (the preset may pick AdamW8bit, which has no foreach)
            config["optimizer_args"] = {"foreach": None}
        config["dataloader_num_workers"] = 0  # diffusers' default: images decoded in the training process
    path = root / f"config_{kind}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    # The base model is not read from the config (sd15 is built in memory), so its path is not checked.
    return load_config(path, check_paths=False)


def _new_output_dir(root: Path, kind: str) -> Path:
    """A fresh (empty, created) output folder for each loop built on the workspace: each logs to TensorBoard,
    and an output_dir holding a run would be refused."""
    n = 1
    while (root / f"output_{kind}_{n}").exists():
        n += 1
    (root / f"output_{kind}_{n}").mkdir()
    return root / f"output_{kind}_{n}"


def prepare_base_model(root: Path, model: str) -> str:
    """The `base_model` a config names: the tiny model written under `root`, "sd15" or the user's path."""
    if model == "tiny":
        return str(build_tiny_sd(root / "tiny-sd"))
    return model


def load_bench_family(base_model: str) -> ModelFamily:
    """A fresh copy of the base model (each loop trains its own LoRA on its own copy)."""
    if base_model == "sd15":
        return StableDiffusionFamily(random_sd15_components())
    return load_family(base_model)


def random_sd15_components(seed: int = 0) -> SDComponents:
    """The full SD 1.5 architecture from the shipped configs with random weights (speed does not depend on
    the values): fp32 CPU modules, frozen and in eval mode, like `load_sd_components` returns them."""
    folder = shipped_config_dir("sd_v1")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder, subfolder="unet"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(folder, subfolder="vae"))
        text_encoder = CLIPTextModel(CLIPTextConfig.from_pretrained(folder, subfolder="text_encoder"))
    for module in (unet, vae, text_encoder):
        module.requires_grad_(False)
        module.eval()
    scheduler = make_noise_scheduler(DDPMScheduler.load_config(folder, subfolder="scheduler"), "epsilon")
    location = BaseModelLocation("diffusers_folder", folder, "sd15")
    return SDComponents(
        unet, vae, text_encoder, load_clip_tokenizer("sd_v1"), scheduler, "sd_v1", "epsilon", location
    )
