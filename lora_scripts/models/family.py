"""The model-family seam: what the training loop needs from SD 1.x, SD 2.x and (later) SDXL, FLUX, SD3.

The loop only calls these methods; a new family adds a subclass and a branch in `load_family`, and the
loop stays untouched.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lora_scripts.export.kohya import LoraNetwork
from lora_scripts.export.metadata import FamilyInfo
from lora_scripts.models.lora import LoraSpec


@dataclass(frozen=True)
class LoraTargets:
    """Which modules get LoRA, per component: a list of layer names (matched as peft does: the full path or
    a dotted suffix) or a preset name (`lora_presets.UNET_PRESETS` / `TEXT_ENCODER_PRESETS`)."""

    unet: list[str] | str
    text_encoder: list[str] | str | None  # None: the text encoder stays frozen and untouched


class ModelFamily(ABC):
    """A loaded base model, seen through the operations training needs.

    Conditioning is a dict of tensors (SD: `encoder_hidden_states` [B, 77, C]; SDXL adds pooled
    embeddings and time ids), so the loop never looks inside it.
    """

    info: FamilyInfo
    noise_scheduler: Any  # diffusers DDPMScheduler with the family's prediction_type

    @property
    @abstractmethod
    def denoiser(self) -> nn.Module:
        """The network that predicts noise (the UNet for SD)."""

    @property
    @abstractmethod
    def text_encoders(self) -> list[nn.Module]:
        """Text encoders, in kohya order (lora_te, or lora_te1/lora_te2)."""

    @abstractmethod
    def frozen_modules(self) -> list[nn.Module]:
        """Every module whose base weights stay frozen (all of them, for LoRA)."""

    @abstractmethod
    def use_wrapped(self, denoiser: nn.Module, text_encoders: list[nn.Module]) -> None:
        """Call these (accelerate-prepared, e.g. DDP-wrapped) modules from now on in `predict` and
        `encode_prompts`; `text_encoders` is empty when they are not trained."""

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

    @abstractmethod
    def predict(
        self, noisy_latents: torch.Tensor, timesteps: torch.Tensor, cond: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        """The denoiser's output (noise or v, per `info.prediction_type`), same shape as the latents."""

    def training_target(
        self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
    ) -> torch.Tensor:
        """What `predict` should output: the noise (epsilon) or the velocity (v-prediction)."""
        if self.info.prediction_type == "v_prediction":
            return self.noise_scheduler.get_velocity(latents, noise, timesteps)
        return noise
