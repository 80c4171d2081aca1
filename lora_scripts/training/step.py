"""One training step's loss: the DDPM denoising objective (epsilon or v target) with sd-scripts' options:
noise offset, multi-resolution noise, Min-SNR-gamma weighting, l1/huber/smooth_l1 losses and per-sample
weights (prior_loss_weight for regularization images).

`diffusion_loss` draws the noise and timesteps of a training step; `denoising_loss` is the deterministic
rest, which validation (training/validation.py) calls with noise and timesteps fixed once for the run.
"""

from __future__ import annotations

import torch

from lora_scripts.models.family import ModelFamily
from lora_scripts.training.losses import LossSettings, huber_threshold, min_snr_weights, per_sample_loss, snr
from lora_scripts.training.noise import sample_noise


def diffusion_loss(
    family: ModelFamily,
    latents: torch.Tensor,
    cond: dict[str, torch.Tensor],
    settings: LossSettings,
    loss_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """The scalar training loss for one batch, in fp32.

    latents: scaled latents [B, C, h, w] (already VAE-encoded); cond: the family's conditioning dict;
    loss_weights: [B] per-sample factors (None: ones). Draws, from the global torch RNG and in this
    order, the noise (`sample_noise`) and then the timesteps (`family.sample_timesteps`; DDPM families:
    randint(0, T, (B,))), so seeded runs repeat.

    loss = mean_b( per_sample_loss_b * min_snr_weight_b * loss_weights_b ).
    """
    clean = latents.float()
    noise = sample_noise(clean, settings)
    timesteps = family.sample_timesteps(clean)
    return denoising_loss(family, latents, cond, noise, timesteps, settings, loss_weights)


def denoising_loss(
    family: ModelFamily,
    latents: torch.Tensor,
    cond: dict[str, torch.Tensor],
    noise: torch.Tensor,
    timesteps: torch.Tensor,
    settings: LossSettings,
    loss_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """The scalar loss of denoising `latents` noised with the given `noise` at `timesteps`, in fp32; no
    random draws, so the same inputs and weights give the same number.

    latents: scaled latents [B, C, h, w]; noise: fp32 [B, C, h, w] (what `sample_noise` returns: the
    settings' offset and pyramid noise are already in it); timesteps: what `family.sample_timesteps` gives
    (DDPM: long [B] in [0, T); FLUX: fp32 sigmas [B]); cond, loss_weights and the formula as in
    `diffusion_loss`.
    """
    scheduler = family.noise_scheduler  # None for flow-matching families (FLUX)
    clean = latents.float()
    if scheduler is None and (
        settings.min_snr_gamma is not None or settings.loss_type in ("huber", "smooth_l1")
    ):
        # The config checks refuse these for FLUX first; this guards callers that skip them.
        raise ValueError("min_snr_gamma and the Huber losses need a DDPM noise schedule")
    # The offset/multires noise is used both to noise the latents and as the epsilon (or inside the v)
    # target, as sd-scripts' train_network.py and diffusers' train_text_to_image.py do: the model must
    # predict exactly what was added, including the low-frequency part it is meant to learn to remove.
    noisy = family.add_noise(clean, noise, timesteps)
    prediction = family.predict(noisy.to(latents.dtype), timesteps, cond)
    target = family.training_target(clean, noise, timesteps)

    huber_c = None
    if settings.loss_type in ("huber", "smooth_l1"):
        num_timesteps = scheduler.config.num_train_timesteps
        huber_c = huber_threshold(timesteps, scheduler.alphas_cumprod, num_timesteps, settings)
    loss = per_sample_loss(prediction, target, settings, huber_c)  # [B]
    if settings.min_snr_gamma is not None:
        snr_t = snr(scheduler.alphas_cumprod, timesteps)
        loss = loss * min_snr_weights(snr_t, settings.min_snr_gamma, family.info.prediction_type)
    if loss_weights is not None:
        loss = loss * loss_weights.to(loss.device, torch.float32)
    return loss.mean()
