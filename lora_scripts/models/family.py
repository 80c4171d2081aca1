"""The model-family seam: what the training loop needs from SD 1.x, SD 2.x and (later) SDXL, FLUX, SD3.

The loop only calls these methods; a new family adds a subclass and a branch in `load_family`, and the
loop stays untouched.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from accelerate import init_empty_weights
from torch import nn

from lora_scripts.errors import UserError
from lora_scripts.export.kohya import LoraNetwork
from lora_scripts.export.metadata import FamilyInfo
from lora_scripts.models.lora import LoraSpec
from lora_scripts.models.lora_presets import UNET_PRESETS
from lora_scripts.models.sd_loading import load_clip_tokenizer

# The config keys only a FLUX.1 model reads (config/keys_flux.py has their definitions).
FLUX_ONLY_KEYS = (
    "vae",
    "clip_l",
    "t5xxl",
    "timestep_sampling",
    "discrete_flow_shift",
    "sigmoid_scale",
    "model_prediction_type",
    "guidance_scale",
    "t5xxl_max_token_length",
    "blocks_to_swap",
)

if TYPE_CHECKING:
    from diffusers import SchedulerMixin

    from lora_scripts.models.inference import SamplingPipeline, Unwrap


@dataclass(frozen=True)
class CaptionReader:
    """The text encoder whose length cuts a family's captions in training (check's "too long" findings): its
    name, the caption tokens it reads (without start and end tokens) and its tokenizer's loader."""

    encoder: str
    tokens: int
    tokenizer: Callable[[], Any]  # () -> a transformers PreTrainedTokenizerBase (a few small files)


@dataclass(frozen=True)
class LoraTargets:
    """Which modules get LoRA, per component: a list of layer names (matched as peft does: the full path or
    a dotted suffix) or a preset name (`lora_presets.UNET_PRESETS` / `TEXT_ENCODER_PRESETS`)."""

    unet: list[str] | str
    text_encoder: list[str] | str | None  # None: the text encoders stay frozen and untouched
    # Which text encoders get the text_encoder targets, in `text_encoders` order (None: all of them); SDXL's
    # text_encoder_lr [te1, te2] with a 0 leaves that one frozen.
    text_encoder_mask: tuple[bool, ...] | None = None

    def text_encoder_layers(self, resolved: list[list[str]] | None) -> list[list[str] | None]:
        """Per text encoder: its resolved layers, or None where it stays frozen."""
        if resolved is None:
            return []
        mask = self.text_encoder_mask or (True,) * len(resolved)
        return [layers if trained else None for layers, trained in zip(resolved, mask, strict=True)]


class ModelFamily(ABC):
    """A loaded base model, seen through the operations training needs.

    Conditioning is a dict of tensors (SD: `encoder_hidden_states` [B, 77, C]; SDXL adds pooled
    embeddings and time ids), so the loop never looks inside it.
    """

    info: FamilyInfo
    noise_scheduler: Any  # diffusers DDPMScheduler with the family's prediction_type
    native_resolution: int = 512  # the side length the base models were trained at: `resolution`'s default
    # The transformers classes of its text encoders and their diffusers-folder parts, in training's order.
    text_encoder_classes: tuple[type[nn.Module], ...] = ()
    text_encoder_parts: tuple[str, ...] = ()
    # The diffusers class of its denoiser and its folder part (UNet2DConditionModel / "unet"; FLUX:
    # FluxTransformer2DModel / "transformer"), the `target_modules` presets it has, and whether LoCon's
    # conv_rank applies (a UNet's 3x3 convs).
    denoiser_class: type[nn.Module]
    denoiser_part: str = "unet"
    # Training samples render from the prompts' conditioning, encoded once before the text encoders leave
    # the device (training/sampling.py encode_ahead; models/inference.py embedding_arguments).
    samples_from_embeddings: bool = False
    # The text encoders (indexes into `text_encoders`) that quantize_base stores in 8 bits with the denoiser.
    quantized_text_encoders: tuple[int, ...] = ()
    denoiser_name: str = "UNet"  # how messages name it ("the UNet's weights"; FLUX.1: "transformer")
    denoiser_presets: tuple[str, ...] = UNET_PRESETS
    has_convs: bool = True
    # The CFG scale and sampler sample images use when none is given (FLUX.1: its distilled guidance and its
    # flow-matching Euler).
    default_cfg_scale: float = 7.0
    default_sampler: str = "euler_a"
    # How it is trained and sampled, known without loading: "ddpm" (epsilon or v, from the checkpoint) or
    # "flow" (FLUX.1's rectified flow).
    objective: str = "ddpm"
    # Which text encoders train when text_encoder_lr is one number (None: all); a list decides per encoder.
    default_text_encoder_mask: tuple[bool, ...] | None = None

    @classmethod
    def key_problems(cls, values: dict[str, object]) -> list[str]:
        """One sentence per config key (of the explicitly set `values`) this family cannot use. The default
        refuses the keys only FLUX.1 reads (config/keys_flux.py FLUX_ONLY_KEYS, named here to keep the
        models layer below the config layer)."""
        return [
            f"{key}: applies to FLUX.1 base models only; remove it for this base model."
            for key in FLUX_ONLY_KEYS
            if key in values
        ]

    @classmethod
    def single_file_problems(cls, path: Path, values: Mapping[str, object]) -> list[str]:
        """Sentences for what the single file at `path` lacks for training with config `values` (read from its
        header only: `check` reports them before anything loads). None by default."""
        return []

    @classmethod
    def folder_problems(cls, path: Path) -> list[str]:
        """Sentences for a diffusers folder at `path` that this family's loader would refuse (its JSON files
        only). None by default."""
        return []

    @classmethod
    def swap_blocks(cls, denoiser: nn.Module, count: int) -> list[nn.Module]:
        """The blocks of `denoiser` that `blocks_to_swap: count` keeps on the CPU (models/block_swap.py), in
        the order they run. Only FLUX.1 has them; the other families refuse the key (`key_problems`)."""
        raise NotImplementedError(f"{cls.__name__} has no blocks to swap")

    @classmethod
    def caption_reader(cls, base_model: str, values: Mapping[str, object]) -> CaptionReader:
        """What reads the captions of a run on `base_model` with config `values`: CLIP, 75 tokens (77
        positions less start and end), or max_token_length's 150 / 225 in chunks; SD 1.x/2.x and SDXL."""
        return CaptionReader(
            "CLIP", int(values.get("max_token_length") or 75), lambda: load_clip_tokenizer("sd_v1")
        )

    @classmethod
    def diffusers_parts(cls) -> tuple[str, ...]:
        """The parts of a diffusers folder that training loads: the denoiser, the VAE, the text encoders."""
        return (cls.denoiser_part, "vae", *cls.text_encoder_parts)

    @classmethod
    def meta_modules(cls, folder: Path, *, text_encoders: bool = True) -> tuple[nn.Module, list[nn.Module]]:
        """The denoiser and (when asked) the text encoders, full size on the meta device (no memory, no
        weights), from the configs of a diffusers-layout folder. UserError for a missing config."""
        parts = [cls.denoiser_part, *(cls.text_encoder_parts if text_encoders else ())]
        missing = [part for part in parts if not (folder / part / "config.json").is_file()]
        if missing:
            raise UserError(
                f"'{folder}' has no {missing[0]}/config.json; give a diffusers-layout config folder."
            )
        try:
            with init_empty_weights():
                config = cls.denoiser_class.load_config(
                    folder, subfolder=cls.denoiser_part, local_files_only=True
                )
                denoiser = cls.denoiser_class.from_config(config)
                classes = (
                    zip(cls.text_encoder_classes, cls.text_encoder_parts, strict=True)
                    if text_encoders
                    else ()
                )
                encoders = [
                    encoder_class(
                        encoder_class.config_class.from_pretrained(
                            folder, subfolder=part, local_files_only=True
                        )
                    )
                    for encoder_class, part in classes
                ]
        except (OSError, ValueError) as err:  # a damaged config.json
            raise UserError(f"'{folder}': a config.json of the model could not be read ({err}).") from err
        return denoiser, encoders

    @classmethod
    @abstractmethod
    def file_networks(cls, unet: nn.Module, text_encoders: list[nn.Module]) -> list[LoraNetwork]:
        """The networks LoRA files of this family name these modules by (for `lora_reader.module_index`
        and the writers of export/lora_layouts.py): every prefix a file may use, the one we write first."""

    @property
    @abstractmethod
    def denoiser(self) -> nn.Module:
        """The network that predicts noise (the UNet for SD)."""

    @property
    @abstractmethod
    def text_encoders(self) -> list[nn.Module]:
        """Text encoders, in kohya order (lora_te, or lora_te1/lora_te2)."""

    @property
    def trained_text_encoders(self) -> list[nn.Module]:
        """The text encoders that carry trainable (LoRA) weights, in `text_encoders` order."""
        return [te for te in self.text_encoders if any(p.requires_grad for p in te.parameters())]

    def frozen_modules(self) -> list[nn.Module]:
        """Every module whose base weights stay frozen (all of them, for LoRA): the denoiser, the VAE and the
        text encoders."""
        return [self.denoiser, self.image_encoder, *self.text_encoders]

    def use_wrapped(self, denoiser: nn.Module, text_encoders: list[nn.Module]) -> None:
        """Call these (accelerate-prepared, e.g. DDP-wrapped) modules from now on in `predict` and
        `encode_prompts`; `text_encoders` are the prepared `trained_text_encoders` (empty: none trained), each
        put where the family keeps the encoder it wraps (the attributes named as `text_encoder_parts`)."""
        setattr(self, self.denoiser_part, denoiser)
        originals = {id(getattr(self.components, part)): part for part in self.text_encoder_parts}
        for wrapped in text_encoders:
            inner = getattr(wrapped, "module", wrapped)  # DDP keeps the module it wraps at .module
            part = originals.get(id(inner))
            if part is None:
                raise ValueError("use_wrapped: a text encoder that is not one of this model's")
            setattr(self, part, wrapped)

    @abstractmethod
    def add_lora(self, targets: LoraTargets, spec: LoraSpec) -> list[LoraNetwork]:
        """Attach peft LoRA adapters (LoCon on the denoiser's 3x3 convs when `spec.conv_rank` is set);
        returns the networks in the order they are saved. Raises UserError for targets that match nothing."""

    @property
    @abstractmethod
    def image_encoder(self) -> nn.Module:
        """The module `encode_images` runs (the VAE); training moves it off the GPU once
        latents are cached."""

    @abstractmethod
    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] in [-1, 1] → the VAE posterior's moments [B, 2C, H/8, W/8] (mean and log-variance,
        unscaled), what the latent cache stores; `sample_latents` turns them into training latents."""

    @abstractmethod
    def sample_latents(self, moments: torch.Tensor) -> torch.Tensor:
        """Moments from `encode_images` → scaled latents [B, C, h, w], a fresh sample of the posterior drawn
        from the global torch RNG (so cached and uncached runs draw the same numbers)."""

    @abstractmethod
    def mean_latents(self, moments: torch.Tensor) -> torch.Tensor:
        """Moments from `encode_images` → scaled latents [B, C, h, w] at the posterior's mean (no sampling
        noise, no RNG draw): fixed latents for the validation loss."""

    @abstractmethod
    def encode_prompts(self, captions: list[str], device: torch.device) -> dict[str, torch.Tensor]:
        """Captions → conditioning dict for `predict`."""

    def image_conditioning(self, size_conditioning: torch.Tensor) -> dict[str, torch.Tensor]:
        """The conditioning a family takes from how each image was prepared, merged into `encode_prompts`'
        dict: size_conditioning is long [B, 6] (original size, crop top-left, target size; see
        data/size_conditioning.py). SD 1.x/2.x take none."""
        return {}

    @abstractmethod
    def predict(
        self, noisy_latents: torch.Tensor, timesteps: torch.Tensor, cond: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        """The denoiser's output (noise or v, per `info.prediction_type`), same shape as the latents."""

    @property
    def schedule_config(self) -> Any:  # noqa: ANN401 - a diffusers scheduler config (a FrozenDict)
        """The noise schedule samplers are built from (`generation/samplers.make_scheduler`)."""
        return self.noise_scheduler.config

    # The denoising objective. These defaults are DDPM's (SD 1.x/2.x, SDXL: `noise_scheduler`'s discrete
    # timesteps, epsilon or v target); a flow-matching family (FLUX) overrides all four.

    def sample_timesteps(self, latents: torch.Tensor) -> torch.Tensor:
        """The timesteps of one training step for `latents` [B, C, h, w], drawn from the global torch RNG,
        on their device. DDPM: long [B] in [0, T)."""
        num_timesteps = self.noise_scheduler.config.num_train_timesteps
        return torch.randint(0, num_timesteps, (latents.shape[0],), device=latents.device).long()

    def timesteps_at(self, quantiles: torch.Tensor, latent_size: tuple[int, int]) -> torch.Tensor:
        """The timesteps at these quantiles of the training distribution (float64 in [0, 1), any shape) for
        latents of `latent_size` (h, w): fixed timesteps for the validation loss. DDPM: long floor(q * T)."""
        num_timesteps = self.noise_scheduler.config.num_train_timesteps
        return torch.floor(quantiles * num_timesteps).long().clamp_(0, num_timesteps - 1)

    def add_noise(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """The noisy latents the denoiser sees at `timesteps`."""
        return self.noise_scheduler.add_noise(latents, noise, timesteps)

    def training_target(
        self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
    ) -> torch.Tensor:
        """What `predict` should output: the noise (epsilon) or the velocity (v-prediction)."""
        if self.info.prediction_type == "v_prediction":
            return self.noise_scheduler.get_velocity(latents, noise, timesteps)
        return noise

    @abstractmethod
    def sampling_pipeline(self, scheduler: SchedulerMixin, unwrap: Unwrap | None = None) -> SamplingPipeline:
        """A diffusers inference pipeline over this family's modules as they are (shared, not copied: it
        renders with the LoRA being trained), rendering with `scheduler`; `unwrap` takes accelerate's
        wrappers off the trained modules (default: none). See models/inference.py."""


class KLVaeLatents:
    """`image_encoder` / `encode_images` / `sample_latents` / `mean_latents` for families whose images go
    through diffusers' AutoencoderKL at `self.vae` (SD 1.x, 2.x, SDXL, FLUX.1). Latents are
    `(z - shift_factor) * scaling_factor`, where only FLUX.1's VAE config has a shift_factor."""

    vae: nn.Module

    @property
    def image_encoder(self) -> nn.Module:
        return self.vae

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            pixels = pixel_values.to(self.vae.device, self.vae.dtype)
            return self.vae.encode(pixels).latent_dist.parameters.float()

    def sample_latents(self, moments: torch.Tensor) -> torch.Tensor:
        # diffusers' DiagonalGaussianDistribution, sampled with torch.randn on the moments' device, so the
        # draw comes from the same (seeded) RNG whether the moments were just encoded or read from a cache.
        # Contiguous, and randn rather than randn_like: the VAE's CPU convs return channels_last moments where
        # cached ones are contiguous, and randn_like follows the layout, so the same RNG state would put the
        # draws at other positions (and the UNet would see another layout, rounding differently).
        mean, logvar = torch.chunk(moments.float().contiguous(), 2, dim=1)
        std = torch.exp(0.5 * torch.clamp(logvar, -30.0, 20.0))
        latents = mean + std * torch.randn(mean.shape, device=mean.device, dtype=mean.dtype)
        return self._scaled(latents)

    def mean_latents(self, moments: torch.Tensor) -> torch.Tensor:
        mean, _ = torch.chunk(moments.float().contiguous(), 2, dim=1)
        return self._scaled(mean)

    def _scaled(self, latents: torch.Tensor) -> torch.Tensor:
        config = self.vae.config
        shift = getattr(config, "shift_factor", None)
        if shift is not None:  # FLUX.1's VAE (SD's and SDXL's configs have none, or None)
            latents = latents - shift
        return latents * config.scaling_factor
