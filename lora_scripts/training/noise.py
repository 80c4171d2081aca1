"""The training noise (gaussian + offset + multi-resolution) and the zero-terminal-SNR noise schedule.

Random draws come from the global torch RNG only (sd-scripts' pyramid noise uses Python's `random` for its
octave scales; here `torch.rand` does that job), so `torch.manual_seed` makes a run reproducible.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler

from lora_scripts.training.losses import LossSettings

if TYPE_CHECKING:
    from lora_scripts.models.family import ModelFamily

logger = logging.getLogger(__name__)

# alpha_bar of the last timestep after the zero-terminal-SNR rescale. diffusers' DDPMScheduler leaves it at
# exactly 0, which makes every 1/alpha_bar (the epsilon → x0 conversion when sampling, SNR ratios, the Huber
# sigma) infinite; diffusers' own Euler/DPM-Solver/UniPC schedulers patch it to 2**-24 for the same reason
# (ComfyUI and A1111 use 4.8973451890853435e-08). SNR there is ~6e-8: zero for every practical purpose.
TERMINAL_ALPHA_BAR = 2.0**-24


def offset_noise(noise: torch.Tensor, offset: float) -> torch.Tensor:
    """noise [B, C, h, w] + offset * randn(B, C, 1, 1): a random constant per sample and channel, so the
    model can learn to shift an image's mean brightness (crosslabs "diffusion with offset noise";
    sd-scripts `apply_noise_offset`, without its adaptive_noise_scale). offset 0 returns `noise` itself.
    """
    if offset == 0:
        return noise
    shift = torch.randn(noise.shape[0], noise.shape[1], 1, 1, device=noise.device, dtype=noise.dtype)
    return noise + offset * shift


def pyramid_noise(noise: torch.Tensor, iterations: int, discount: float) -> torch.Tensor:
    """Multi-resolution noise (J. Whitaker; sd-scripts `pyramid_noise_like`): [B, C, h, w] → same shape.

    Octave i adds randn at (h, w) / r**i (r uniform in [2, 4)), upsampled bilinearly and scaled by
    discount**i, stopping once an octave is 1 pixel wide; the sum is divided by its std (over the whole
    batch, as sd-scripts does) so it stays unit variance. Octave 0 is a second full-resolution draw, as
    in sd-scripts. `noise` is not modified (sd-scripts adds in place); iterations 0 returns it itself.
    """
    if iterations == 0:
        return noise
    batch, channels, height, width = noise.shape
    total = noise.clone()
    for i in range(iterations):
        scale = float(torch.rand(()) * 2 + 2) ** i
        small_h, small_w = max(1, int(height / scale)), max(1, int(width / scale))
        octave = torch.randn(batch, channels, small_h, small_w, device=noise.device, dtype=noise.dtype)
        upsampled = F.interpolate(octave, size=(height, width), mode="bilinear", align_corners=False)
        total += upsampled * discount**i
        if small_h == 1 or small_w == 1:
            break
    return total / total.std()


def sample_noise(latents: torch.Tensor, settings: LossSettings) -> torch.Tensor:
    """The noise for one step: randn like `latents` [B, C, h, w], fp32, then the offset, then pyramid
    noise (sd-scripts `get_noise_noisy_latents_and_timesteps` order; both may be on at once, as there)."""
    noise = torch.randn(latents.shape, device=latents.device, dtype=torch.float32)
    noise = offset_noise(noise, settings.noise_offset)
    return pyramid_noise(noise, settings.multires_noise_iterations, settings.multires_noise_discount)


def zero_terminal_snr(scheduler: DDPMScheduler) -> DDPMScheduler:
    """A new scheduler of the same class and config whose betas are rescaled so the last timestep is
    (almost) pure noise (Lin et al. 2023, "Common Diffusion Noise Schedules and Sample Steps are Flawed").

    Uses diffusers' own `rescale_betas_zero_snr=True` (the same Algorithm 1 as sd-scripts'
    `fix_noise_scheduler_betas_for_zero_terminal_snr`), then lifts the final alpha_bar from 0 to
    TERMINAL_ALPHA_BAR. alpha_bar[0] stays the original's; `scheduler` itself is untouched.
    """
    rescaled = type(scheduler).from_config(scheduler.config, rescale_betas_zero_snr=True)
    alphas_cumprod = rescaled.alphas_cumprod.clone()
    alphas_cumprod[-1] = TERMINAL_ALPHA_BAR
    # Keep betas/alphas consistent with the patched cumulative product (other code may read them).
    alphas = rescaled.alphas.clone()
    alphas[-1] = alphas_cumprod[-1] / alphas_cumprod[-2]
    rescaled.alphas_cumprod, rescaled.alphas, rescaled.betas = alphas_cumprod, alphas, 1.0 - alphas
    logger.info(
        "zero terminal SNR: alpha_bar[0] %.6f → %.6f, alpha_bar[-1] %.3g → %.3g",
        float(scheduler.alphas_cumprod[0]),
        float(alphas_cumprod[0]),
        float(scheduler.alphas_cumprod[-1]),
        float(alphas_cumprod[-1]),
    )
    return rescaled


def resolve_zero_terminal_snr(setting: bool | None, marked: bool) -> bool:
    """Whether a run trains with zero terminal SNR: the config's `setting` when it is written, else whether
    the base model is `marked` for it (a `ztsnr` key, or `rescale_betas_zero_snr` in its scheduler config;
    `FamilyInfo.zero_terminal_snr`), as ComfyUI samples such a model."""
    return marked if setting is None else setting


def training_noise_schedule(family: ModelFamily, setting: bool | None) -> DDPMScheduler:
    """The schedule to train `family` with, for the config's zero_terminal_snr `setting` (None: from the
    base model, `resolve_zero_terminal_snr`): `zero_terminal_snr(...)` of the family's own when on; when
    off, the plain one, even where the model's scheduler config asks diffusers for the rescale (an explicit
    false wins). `family.noise_scheduler` itself is untouched."""
    scheduler = family.noise_scheduler
    if not resolve_zero_terminal_snr(setting, family.info.zero_terminal_snr):
        if scheduler.config.get("rescale_betas_zero_snr"):
            return type(scheduler).from_config(scheduler.config, rescale_betas_zero_snr=False)
        return scheduler
    if setting is None:
        logger.info(
            "zero_terminal_snr: on, as the base model is marked for it (a `ztsnr` key, or "
            "rescale_betas_zero_snr in its scheduler config); write zero_terminal_snr: false to turn it off."
        )
    if family.info.prediction_type != "v_prediction":
        logger.warning("zero_terminal_snr on an epsilon-prediction model: sample images may look washed out.")
    return zero_terminal_snr(scheduler)
