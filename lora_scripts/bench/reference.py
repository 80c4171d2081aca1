"""The reference loop: one training step written the way diffusers' `train_text_to_image_lora.py` does it
(examples/text_to_image, diffusers 0.3x): the VAE encodes the batch's pixels and the text encoder its
captions in every step, nothing is cached, and the loss is a plain MSE over the whole batch.

It draws its random numbers in the same order as our step (posterior sample, noise, timesteps), from the
same global RNG and with the same shapes, so on the same batch and RNG state it computes the same loss
(tests/bench/test_reference.py); the speed difference is then only in how the work is organised.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lora_scripts.models.detect import VERSION_NAMES, ModelVersion
from lora_scripts.models.stable_diffusion import StableDiffusionFamily

# diffusers' train_text_to_image_lora.py trains SD 1.x/2.x. SDXL has a script of its own
# (train_text_to_image_lora_sdxl.py: two text encoders, pooled embeddings, size conditioning), not written
# here, so an SDXL bench measures our loop alone.
REFERENCE_VERSIONS: tuple[ModelVersion, ...] = ("sd_v1", "sd_v2")


def no_reference_reason(version: ModelVersion) -> str | None:
    """None when the reference loop can train a model of `version`, else the sentence the bench shows."""
    if version in REFERENCE_VERSIONS:
        return None
    return (
        f"no reference loop for {VERSION_NAMES[version]} models: bench/reference.py is diffusers' SD 1.x/2.x "
        "script (train_text_to_image_lora.py); our loop is measured alone"
    )


def encode_reference_batch(
    family: StableDiffusionFamily, pixel_values: torch.Tensor, captions: list[str], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """diffusers' per-step encoding: `vae.encode(pixels).latent_dist.sample() * scaling_factor` and
    `text_encoder(input_ids)[0]`. pixel_values: [B, 3, H, W] in [-1, 1]. Returns fp32 latents
    [B, 4, H/8, W/8] and encoder_hidden_states [B, 77, C]."""
    vae, text_encoder = family.vae, family.text_encoder
    with torch.no_grad():
        latent_dist = vae.encode(pixel_values.to(device, vae.dtype)).latent_dist
        # `.sample()` draws randn of the mean's shape from the global RNG, as `family.sample_latents` does.
        latents = latent_dist.sample().float() * vae.config.scaling_factor
        input_ids = family.tokenize(captions).to(device)
        encoder_hidden_states = text_encoder(input_ids, return_dict=False)[0]
    return latents, encoder_hidden_states


def reference_loss(
    family: StableDiffusionFamily, latents: torch.Tensor, encoder_hidden_states: torch.Tensor
) -> torch.Tensor:
    """diffusers' loss: noise = randn(latents.shape), timesteps = randint(0, T, (B,)), noisy latents from
    the scheduler, epsilon or v target, `F.mse_loss(pred.float(), target.float(), reduction="mean")`."""
    scheduler = family.noise_scheduler
    # randn of the shape (diffusers writes randn_like): the VAE's CPU convs can hand back channels_last
    # latents, and randn_like would lay the same draws out in another order than our step does.
    noise = torch.randn(latents.shape, device=latents.device, dtype=torch.float32)
    bsz = latents.shape[0]
    timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (bsz,), device=latents.device).long()
    noisy_latents = scheduler.add_noise(latents, noise, timesteps)
    if scheduler.config.prediction_type == "v_prediction":
        target = scheduler.get_velocity(latents, noise, timesteps)
    else:
        target = noise
    model_pred = family.unet(noisy_latents, timesteps, encoder_hidden_states, return_dict=False)[0]
    return F.mse_loss(model_pred.float(), target.float(), reduction="mean")
