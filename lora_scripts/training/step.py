"""One training step's loss: the noise-prediction objective of DDPM (epsilon or v target)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lora_scripts.models.family import ModelFamily


def diffusion_loss(family: ModelFamily, pixel_values: torch.Tensor, captions: list[str]) -> torch.Tensor:
    """Mean-squared error between the denoiser's prediction and its target, in fp32.

    pixel_values: [B, 3, H, W] in [-1, 1]. Noise and timesteps come from the global torch RNG, so a
    seeded run is reproducible.
    """
    latents = family.encode_images(pixel_values)
    cond = family.encode_prompts(captions, latents.device)
    noise = torch.randn_like(latents)
    num_timesteps = family.noise_scheduler.config.num_train_timesteps
    timesteps = torch.randint(0, num_timesteps, (latents.shape[0],), device=latents.device).long()
    noisy = family.noise_scheduler.add_noise(latents, noise, timesteps)
    prediction = family.predict(noisy, timesteps, cond)
    target = family.training_target(latents, noise, timesteps)
    return F.mse_loss(prediction.float(), target.float(), reduction="mean")
