"""SD 1.x / 2.x: one UNet, one CLIP text encoder (`lora_te`), an 8× VAE."""

from __future__ import annotations

import logging

import torch
from torch import nn

from lora_scripts.export.kohya import LoraNetwork
from lora_scripts.export.metadata import FamilyInfo
from lora_scripts.models.family import LoraTargets, ModelFamily
from lora_scripts.models.lora import add_lora_adapter, check_targets
from lora_scripts.models.sd_loading import SDComponents

log = logging.getLogger(__name__)


_OPEN_CLIP_ATTENTION = {"q_proj", "k_proj", "v_proj", "out_proj"}


def partial_fused_attention_warning(targets: list[str]) -> str | None:
    """SD 2.x's OpenCLIP fuses q/k/v into one attention layer; A1111 applies a text-encoder LoRA there only
    when a layer has all four of q/k/v/out_proj, and silently ignores the rest. The warning, or None."""
    chosen = {t.rsplit(".", 1)[-1] for t in targets} & _OPEN_CLIP_ATTENTION
    if not chosen or chosen == _OPEN_CLIP_ATTENTION:
        return None
    missing = ", ".join(sorted(_OPEN_CLIP_ATTENTION - chosen))
    return (
        "text_encoder_target_modules: on SD 2.x, AUTOMATIC1111 ignores text-encoder attention LoRA unless "
        f"all of q_proj, k_proj, v_proj and out_proj are trained; add {missing}."
    )


def _modelspec_architecture(version: str, prediction_type: str) -> str:
    # sd-scripts' sai_model_spec names; SD 2.x is told apart by prediction type as they do.
    if version == "sd_v1":
        return "stable-diffusion-v1"
    return "stable-diffusion-v2-768-v" if prediction_type == "v_prediction" else "stable-diffusion-v2-512"


class StableDiffusionFamily(ModelFamily):
    """SD 1.x and 2.x. Text-encoder module paths get a `text_model.` prefix in kohya names if they lack it
    (transformers ≥ 5 dropped that submodule; A1111/ComfyUI require it)."""

    def __init__(self, components: SDComponents):
        self.components = components
        self.noise_scheduler = components.noise_scheduler
        self.info = FamilyInfo(
            base_model_version=components.version,
            v2=components.version == "sd_v2",
            prediction_type=components.prediction_type,
            modelspec_architecture=_modelspec_architecture(components.version, components.prediction_type),
        )
        self.unet = components.unet
        self.vae = components.vae
        self.text_encoder = components.text_encoder
        self.tokenizer = components.tokenizer
        self.trains_text_encoder = False

    @property
    def denoiser(self) -> nn.Module:
        return self.unet

    @property
    def text_encoders(self) -> list[nn.Module]:
        return [self.text_encoder]

    def frozen_modules(self) -> list[nn.Module]:
        return [self.unet, self.vae, self.text_encoder]

    def use_wrapped(self, denoiser: nn.Module, text_encoders: list[nn.Module]) -> None:
        self.unet = denoiser
        if text_encoders:
            (self.text_encoder,) = text_encoders

    def sampling_modules(self) -> tuple[nn.Module, nn.Module, nn.Module, object]:
        """(UNet, VAE, text encoder, tokenizer) for a pipeline that renders samples during training; the UNet
        and text encoder are the ones being trained (possibly wrapped: unwrap them first)."""
        return self.unet, self.vae, self.text_encoder, self.tokenizer

    def add_lora(self, targets: LoraTargets, rank: int, alpha: float) -> list[LoraNetwork]:
        check_targets(self.unet, targets.unet, key="target_modules", component="UNet")
        if targets.text_encoder is not None:
            check_targets(
                self.text_encoder,
                targets.text_encoder,
                key="text_encoder_target_modules",
                component="text encoder",
            )
            warning = partial_fused_attention_warning(targets.text_encoder) if self.info.v2 else None
            if warning:
                log.warning(warning)
        add_lora_adapter(self.unet, targets.unet, rank, alpha)
        networks = [LoraNetwork("lora_unet", self.unet)]
        if targets.text_encoder is not None:
            add_lora_adapter(self.text_encoder, targets.text_encoder, rank, alpha)
            has_text_model = hasattr(self.text_encoder, "text_model")
            networks.append(
                LoraNetwork("lora_te", self.text_encoder, "" if has_text_model else "text_model.")
            )
            self.trains_text_encoder = True
        return networks

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            pixels = pixel_values.to(self.vae.device, self.vae.dtype)
            latents = self.vae.encode(pixels).latent_dist.sample()
        return latents * self.vae.config.scaling_factor

    def tokenize(self, captions: list[str]) -> torch.Tensor:
        """Captions → input ids [B, 77] (CLIP reads 75 tokens; longer captions are cut)."""
        return self.tokenizer(
            captions,
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids

    def encode_prompts(self, captions: list[str], device: torch.device) -> dict[str, torch.Tensor]:
        input_ids = self.tokenize(captions).to(device)
        with torch.set_grad_enabled(self.trains_text_encoder and torch.is_grad_enabled()):
            hidden = self.text_encoder(input_ids)[0]
        return {"encoder_hidden_states": hidden}

    def predict(
        self, noisy_latents: torch.Tensor, timesteps: torch.Tensor, cond: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        return self.unet(noisy_latents, timesteps, cond["encoder_hidden_states"]).sample
