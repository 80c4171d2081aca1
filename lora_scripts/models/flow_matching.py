"""Rectified-flow training math for FLUX.1, as the reference trainers do it (sd-scripts'
library/flux_train_utils.py `get_noisy_model_input_and_timesteps` and `apply_model_prediction_type`,
diffusers' train_dreambooth_lora_flux.py), written here because diffusers ships it only inside its example
scripts.

A training timestep is a noise level sigma in (0, 1): the noisy latents are (1 - sigma) * x + sigma * noise
and the transformer learns the velocity noise - x. `model_prediction_type` reads its output as that velocity
(`raw`), as a velocity added to the noisy latents (`additive`, sd-scripts), or through the clean latents it
implies, noisy - sigma * output, compared with the clean latents (`sigma_scaled`: diffusers'
`precondition_outputs`; sd-scripts compares that estimate with the velocity instead, which does not match
it). The transformer takes sigma itself (diffusers' FluxTransformer2DModel multiplies by 1000). Sigmas are
drawn by `timestep_sampling`:
- `uniform`: sigma ~ U(0, 1);
- `sigmoid`: sigma = sigmoid(sigmoid_scale * n), n ~ N(0, 1) (x-flux's logit-normal);
- `shift`: the sigmoid draw moved toward noise by `discrete_flow_shift` s, s*sigma / (1 + (s-1)*sigma);
- `flux_shift`: the same shift in FLUX's resolution-dependent form, exp(mu) with mu linear in the number of
  packed latent tokens (0.5 at 256 tokens, 1.15 at 4096), as FLUX.1-dev's sampling schedule shifts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

TimestepSampling = Literal["uniform", "sigmoid", "shift", "flux_shift"]
ModelPredictionType = Literal["raw", "additive", "sigma_scaled"]
TIMESTEP_SAMPLINGS: tuple[str, ...] = ("uniform", "sigmoid", "shift", "flux_shift")
MODEL_PREDICTION_TYPES: tuple[str, ...] = ("raw", "additive", "sigma_scaled")
# FLUX.1-dev's scheduler: mu from 0.5 (256 image tokens) to 1.15 (4096), sd-scripts' get_lin_function.
BASE_SEQ_LEN, MAX_SEQ_LEN, BASE_SHIFT, MAX_SHIFT = 256, 4096, 0.5, 1.15


@dataclass(frozen=True)
class FlowSettings:
    """The training objective's options (config keys of the same names; defaults are sd-scripts' documented
    FLUX.1 LoRA settings: `--timestep_sampling shift --discrete_flow_shift 3.1582 --model_prediction_type raw
    --guidance_scale 1.0`)."""

    timestep_sampling: TimestepSampling = "shift"
    discrete_flow_shift: float = 3.1582
    sigmoid_scale: float = 1.0
    model_prediction_type: ModelPredictionType = "raw"


def flux_mu(image_tokens: int) -> float:
    """FLUX's shift exponent for `image_tokens` packed latent tokens (h/2 * w/2)."""
    slope = (MAX_SHIFT - BASE_SHIFT) / (MAX_SEQ_LEN - BASE_SEQ_LEN)
    return slope * image_tokens + (BASE_SHIFT - slope * BASE_SEQ_LEN)


def shift_sigmas(sigmas: torch.Tensor, shift: float) -> torch.Tensor:
    """s*sigma / (1 + (s - 1)*sigma): more of the draws at high noise for s > 1."""
    return (sigmas * shift) / (1 + (shift - 1) * sigmas)


def sigmas_from_normal(
    normal: torch.Tensor, settings: FlowSettings, latent_size: tuple[int, int]
) -> torch.Tensor:
    """Sigmas from standard-normal draws for the sigmoid-based samplings (`sigmoid`, `shift`, `flux_shift`);
    `latent_size` (h, w) of the unpacked latents sets `flux_shift`'s mu."""
    sigmas = torch.sigmoid(settings.sigmoid_scale * normal)
    if settings.timestep_sampling == "shift":
        return shift_sigmas(sigmas, settings.discrete_flow_shift)
    if settings.timestep_sampling == "flux_shift":
        # sd-scripts' time_shift(mu, 1.0, t) = e^mu / (e^mu + (1/t - 1)), which is shift_sigmas with s = e^mu.
        mu = flux_mu((latent_size[0] // 2) * (latent_size[1] // 2))
        return shift_sigmas(sigmas, math.exp(mu))
    return sigmas


def sample_sigmas(
    batch_size: int, settings: FlowSettings, latent_size: tuple[int, int], device: torch.device
) -> torch.Tensor:
    """fp32 [B] sigmas of one training step, one draw from the global torch RNG (rand for `uniform`, randn
    otherwise, as sd-scripts draws them)."""
    if settings.timestep_sampling == "uniform":
        return torch.rand((batch_size,), device=device)
    return sigmas_from_normal(torch.randn((batch_size,), device=device), settings, latent_size)


def sigmas_at(quantiles: torch.Tensor, settings: FlowSettings, latent_size: tuple[int, int]) -> torch.Tensor:
    """fp32 sigmas at these quantiles (float64 in [0, 1)) of the training distribution: the same map from a
    uniform draw that `sample_sigmas` makes from its random draw, so fixed validation timesteps spread as the
    training ones do. Quantiles are kept away from 0 and 1, where the normal's inverse CDF is infinite."""
    q = quantiles.double().clamp(1e-6, 1 - 1e-6)
    if settings.timestep_sampling == "uniform":
        return q.float()
    normal = math.sqrt(2.0) * torch.erfinv(2 * q - 1)
    return sigmas_from_normal(normal, settings, latent_size).float()


def noisy_latents(latents: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """(1 - sigma) * latents + sigma * noise, in fp32."""
    s = sigmas.to(latents.device, torch.float32).view(-1, *([1] * (latents.ndim - 1)))
    return (1.0 - s) * latents.float() + s * noise.float()


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """[B, C, h, w] → [B, (h/2)(w/2), 4C]: 2×2 patches as tokens (diffusers' FluxPipeline._pack_latents)."""
    b, c, h, w = latents.shape
    patches = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return patches.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: torch.Tensor, latent_size: tuple[int, int]) -> torch.Tensor:
    """The inverse of `pack_latents` for latents of `latent_size` (h, w)."""
    b, _, packed_channels = tokens.shape
    h, w = latent_size
    c = packed_channels // 4
    patches = tokens.view(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return patches.reshape(b, c, h, w)


def image_ids(latent_size: tuple[int, int], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """[(h/2)(w/2), 3] position ids of the packed tokens: (0, row, column), diffusers' FluxPipeline
    `_prepare_latent_image_ids` (the rotary embedding reads them)."""
    h, w = latent_size[0] // 2, latent_size[1] // 2
    ids = torch.zeros(h, w, 3)
    ids[..., 1] = torch.arange(h)[:, None]
    ids[..., 2] = torch.arange(w)[None, :]
    return ids.reshape(h * w, 3).to(device, dtype)
