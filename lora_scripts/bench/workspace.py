"""What a benchmark trains on, built in a temporary folder: a base model (a tiny one, a full-size SD 1.5 or
SDXL architecture with random weights, or the user's), generated images with captions, and a config for the
real training code."""

from __future__ import annotations

import csv
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from diffusers import (
    AutoencoderKL,
    DDPMScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxTransformer2DModel,
    UNet2DConditionModel,
)
from transformers import CLIPTextModel, CLIPTextModelWithProjection, PreTrainedModel, T5EncoderModel

from lora_scripts.config import TrainConfig, load_config
from lora_scripts.demo import draw_ink_image
from lora_scripts.models.detect import ModelVersion
from lora_scripts.models.family import ModelFamily
from lora_scripts.models.flux import FluxFamily
from lora_scripts.models.flux_loading import (
    FluxComponents,
    FluxVariant,
    shipped_flux_config_dir,
    t5_tokenizer,
)
from lora_scripts.models.locate import BaseModelLocation
from lora_scripts.models.registry import base_model_version, load_family
from lora_scripts.models.sd_loading import (
    SDComponents,
    clip_tokenizer,
    load_clip_tokenizer,
    make_noise_scheduler,
    shipped_config_dir,
)
from lora_scripts.models.sdxl import SDXLFamily
from lora_scripts.models.sdxl_loading import SDXL_PAD_TOKENS, SDXLComponents
from lora_scripts.models.stable_diffusion import StableDiffusionFamily
from lora_scripts.models.tiny import (
    build_tiny_flux,
    build_tiny_flux_components,
    build_tiny_sd,
    build_tiny_sd_components,
    build_tiny_sdxl,
    build_tiny_sdxl_components,
)

# The reference figure (1.71 TFLOP/image at 512²) is for a rank-4 LoRA on the attention layers.
BENCH_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
_SUBJECTS = ["mountain peak", "pine tree", "temple", "river", "moon", "bamboo", "boat", "bridge"]


@dataclass(frozen=True)
class BenchSettings:
    """The knobs of one benchmark run; `resolution` None means the model's default (`default_resolution`)."""

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
    # Our loop only (config key network_type): diffusers' script, the reference, trains a LoRA; comparing our
    # LoHa / LoKr / DoRA step with its LoRA step shows what the type costs.
    network_type: str = "lora"
    device: str = "auto"
    num_images: int | None = None  # None: 4 batches' worth, so a timed run sees several distinct batches

    @property
    def image_size(self) -> int:
        return self.resolution or default_resolution(self.model)

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
        "network_type": "lora" if reference else settings.network_type,
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
    """The `base_model` a config names: a tiny model written under `root` (loaded like the user's), the
    name of a random full-size architecture ("sd15", "sdxl": built in memory by `load_bench_family`) or the
    user's path."""
    built_in = BUILT_IN_MODELS.get(model)
    if built_in is not None and built_in.write is not None:
        return str(built_in.write(root / model))
    return model


def load_bench_family(base_model: str) -> ModelFamily:
    """A fresh copy of the base model (each loop trains its own LoRA on its own copy)."""
    built_in = BUILT_IN_MODELS.get(base_model)  # (a tiny model is a written folder's path by now)
    if built_in is not None:
        return built_in.build()
    return load_family(base_model)


def model_version(model: str) -> ModelVersion:
    """ "sd_v1", "sd_v2" or "sdxl": a built-in model's, else read from the user's file or folder (headers and
    configs only)."""
    built_in = BUILT_IN_MODELS.get(model)
    return built_in.version if built_in is not None else base_model_version(model)


def default_resolution(model: str) -> int:
    """The bench's image size when --resolution is not given: the built-in model's, else 1024 for an SDXL
    model and 512 for SD 1.x/2.x."""
    built_in = BUILT_IN_MODELS.get(model)
    if built_in is not None:
        return built_in.resolution
    return 1024 if base_model_version(model) == "sdxl" else 512


def _random_modules(folder: Path, seed: int, **classes: type) -> dict[str, torch.nn.Module]:
    """Each part named in `classes` (unet=UNet2DConditionModel, ...) built from `folder/<name>`'s config with
    random weights fixed by `seed` (the caller's RNG is left untouched): fp32, frozen, in eval mode."""
    modules = {}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for name, cls in classes.items():
            if issubclass(cls, PreTrainedModel):  # transformers' text encoders
                modules[name] = cls(cls.config_class.from_pretrained(folder, subfolder=name))
            else:  # diffusers' UNet and VAE
                modules[name] = cls.from_config(cls.load_config(folder, subfolder=name))
    _freeze(*modules.values())
    return modules


def _freeze(*modules: torch.nn.Module) -> None:
    for module in modules:
        module.requires_grad_(False)
        module.eval()


def random_sd15_components(seed: int = 0) -> SDComponents:
    """The full SD 1.5 architecture from the shipped configs with random weights (speed does not depend on
    the values): fp32 CPU modules, frozen and in eval mode, like `load_sd_components` returns them."""
    folder = shipped_config_dir("sd_v1")
    parts = _random_modules(
        folder, seed, unet=UNet2DConditionModel, vae=AutoencoderKL, text_encoder=CLIPTextModel
    )
    scheduler = make_noise_scheduler(DDPMScheduler.load_config(folder, subfolder="scheduler"), "epsilon")
    location = BaseModelLocation("diffusers_folder", folder, "sd15")
    return SDComponents(
        parts["unet"],
        parts["vae"],
        parts["text_encoder"],
        load_clip_tokenizer("sd_v1"),
        scheduler,
        "sd_v1",
        "epsilon",
        location,
    )


def random_sdxl_components(seed: int = 0) -> SDXLComponents:
    """The full SDXL base architecture from the shipped configs (models/assets/sdxl: UNet 2.6 B, CLIP ViT-L
    and OpenCLIP bigG text encoders, VAE) with random weights: fp32 CPU modules, frozen and in eval mode, like
    `load_sdxl_components` returns them. About 14 GB in fp32; on the meta device (`with torch.device("meta")`)
    it costs nothing, which is how the FLOP counts are made."""
    folder = shipped_config_dir("sdxl")
    parts = _random_modules(
        folder,
        seed,
        unet=UNet2DConditionModel,
        vae=AutoencoderKL,
        text_encoder=CLIPTextModel,
        text_encoder_2=CLIPTextModelWithProjection,
    )
    scheduler = make_noise_scheduler(DDPMScheduler.load_config(folder, subfolder="scheduler"), "epsilon")
    return SDXLComponents(
        **parts,
        tokenizer=clip_tokenizer(SDXL_PAD_TOKENS["tokenizer"]),
        tokenizer_2=clip_tokenizer(SDXL_PAD_TOKENS["tokenizer_2"]),
        noise_scheduler=scheduler,
        prediction_type="epsilon",
        location=BaseModelLocation("diffusers_folder", folder, "sdxl"),
    )


def random_flux_family(variant: FluxVariant = "dev", seed: int = 0) -> FluxFamily:
    """The full FLUX.1 architecture from the shipped configs (models/assets/flux_dev: the transformer's 11.9 B
    parameters in 19 double and 38 single blocks, CLIP-L, the T5-XXL encoder's 4.8 B, the 16-channel VAE)
    with random weights: fp32 CPU modules, frozen and in eval mode, like `load_flux_components` returns
    them. About 67 GB in fp32: a GPU machine's RAM; on the meta device it costs nothing (the FLOP and memory
    counts)."""
    folder = shipped_flux_config_dir(variant)
    parts = _random_modules(
        folder,
        seed,
        transformer=FluxTransformer2DModel,
        vae=AutoencoderKL,
        text_encoder=CLIPTextModel,
        text_encoder_2=T5EncoderModel,
    )
    scheduler = FlowMatchEulerDiscreteScheduler.load_config(folder, subfolder="scheduler")
    return FluxFamily(
        FluxComponents(
            **parts,
            tokenizer=clip_tokenizer("<|endoftext|>"),
            tokenizer_2=t5_tokenizer(),
            scheduler_config=dict(scheduler),
            variant=variant,
            location=BaseModelLocation("diffusers_folder", folder, f"flux-{variant}"),
        )
    )


def tiny_flux_family() -> FluxFamily:
    """The tiny FLUX.1 model in memory, frozen and in eval mode (see `tiny_sd_family`); always on the CPU,
    as the tiny SDXL (its tokenizers and scheduler config are read from files)."""
    with torch.device("cpu"):
        tiny = build_tiny_flux_components()
    _freeze(tiny.transformer, tiny.vae, tiny.text_encoder, tiny.text_encoder_2)
    return FluxFamily(
        FluxComponents(
            transformer=tiny.transformer,
            vae=tiny.vae,
            text_encoder=tiny.text_encoder,
            text_encoder_2=tiny.text_encoder_2,
            tokenizer=tiny.tokenizer,
            tokenizer_2=tiny.tokenizer_2,
            scheduler_config=dict(tiny.scheduler.config),
            variant="dev",
            location=BaseModelLocation("diffusers_folder", shipped_flux_config_dir("dev"), "tiny-flux"),
        )
    )


def tiny_sd_family() -> StableDiffusionFamily:
    """The tiny SD model in memory, frozen and in eval mode as a loaded one is (the FLOP and memory counts
    build it this way; the bench writes it as a folder and loads it like a user's model)."""
    tiny = build_tiny_sd_components()
    _freeze(tiny.unet, tiny.vae, tiny.text_encoder)
    scheduler = make_noise_scheduler(tiny.scheduler.config, "epsilon")
    location = BaseModelLocation("diffusers_folder", shipped_config_dir("sd_v1"), "tiny")
    components = SDComponents(
        tiny.unet, tiny.vae, tiny.text_encoder, tiny.tokenizer, scheduler, "sd_v1", "epsilon", location
    )
    return StableDiffusionFamily(components)


def tiny_sdxl_family() -> SDXLFamily:
    """The tiny SDXL model in memory, frozen and in eval mode (see `tiny_sd_family`). Always on the CPU, even
    under `torch.device("meta")`: its sampling scheduler (EulerDiscrete) copies its sigmas to the CPU, which
    a meta tensor cannot do; the model takes a few MB."""
    with torch.device("cpu"):
        tiny = build_tiny_sdxl_components()
    _freeze(tiny.unet, tiny.vae, tiny.text_encoder, tiny.text_encoder_2)
    components = SDXLComponents(
        unet=tiny.unet,
        vae=tiny.vae,
        text_encoder=tiny.text_encoder,
        text_encoder_2=tiny.text_encoder_2,
        tokenizer=tiny.tokenizer,
        tokenizer_2=tiny.tokenizer_2,
        noise_scheduler=make_noise_scheduler(tiny.scheduler.config, "epsilon"),
        prediction_type="epsilon",
        location=BaseModelLocation("diffusers_folder", shipped_config_dir("sdxl"), "tiny-sdxl"),
    )
    return SDXLFamily(components)


@dataclass(frozen=True)
class BuiltInModel:
    """A model `--model` names instead of a path. `build` makes it in memory (random weights: speed and
    memory do not depend on their values); the bench writes a tiny one as a diffusers folder with `write`
    instead and loads it with the real loading code, like a user's model."""

    version: ModelVersion
    resolution: int  # the default image size
    build: Callable[[], ModelFamily]
    write: Callable[[Path], Path] | None = None


BUILT_IN_MODELS: dict[str, BuiltInModel] = {
    "tiny": BuiltInModel("sd_v1", 64, tiny_sd_family, write=build_tiny_sd),
    "tiny-sdxl": BuiltInModel("sdxl", 64, tiny_sdxl_family, write=build_tiny_sdxl),
    "sd15": BuiltInModel("sd_v1", 512, lambda: StableDiffusionFamily(random_sd15_components())),
    "sdxl": BuiltInModel("sdxl", 1024, lambda: SDXLFamily(random_sdxl_components())),
    "tiny-flux": BuiltInModel("flux1", 64, tiny_flux_family, write=build_tiny_flux),
    "flux-dev": BuiltInModel("flux1", 1024, random_flux_family),
}
