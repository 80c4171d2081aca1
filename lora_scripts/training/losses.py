"""Loss settings and the per-sample loss terms: min-SNR weights, the Huber threshold schedule and the
element-wise losses (l2, l1, huber, smooth_l1).

Each function is the tensor form of a kohya sd-scripts behaviour users rely on, cited where it is defined
(library/custom_train_functions.py and library/train_util.py). Everything here works in fp32.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, get_args

import torch
import torch.nn.functional as F

from lora_scripts.errors import UserError

LossType = Literal["l2", "l1", "huber", "smooth_l1"]
HuberSchedule = Literal["constant", "exponential", "snr"]
PREDICTION_TYPES = ("epsilon", "v_prediction")


@dataclass(frozen=True)
class LossSettings:
    """How one training step turns a prediction into a loss (the config's "loss" section, kohya names).

    loss_type: l2 (mean squared error), l1, huber or smooth_l1 (sd-scripts' scheduled pseudo-Huber).
    huber_c: the Huber threshold c, in (0, 1]; huber_schedule: how c varies with the timestep.
    min_snr_gamma: Min-SNR-gamma weighting (Hang et al. 2023); None: off.
    noise_offset: std of a per-(sample, channel) constant added to the noise; 0: off.
    multires_noise_iterations / multires_noise_discount: pyramid noise octaves (0: off) and their fade.
    """

    loss_type: LossType = "l2"
    huber_c: float = 0.1
    huber_schedule: HuberSchedule = "snr"
    min_snr_gamma: float | None = None
    noise_offset: float = 0.0
    multires_noise_iterations: int = 0  # 0: off
    multires_noise_discount: float = 0.3

    def __post_init__(self) -> None:
        # The config schema checks the same bounds; this guards settings built in code (tests, the API).
        errors = []
        if self.loss_type not in get_args(LossType):
            errors.append(f"loss_type: {self.loss_type!r} is not one of {', '.join(get_args(LossType))}.")
        if self.huber_schedule not in get_args(HuberSchedule):
            errors.append(
                f"huber_schedule: {self.huber_schedule!r} is not one of {', '.join(get_args(HuberSchedule))}."
            )
        if not 0 < self.huber_c <= 1:
            errors.append(f"huber_c: {self.huber_c} must be in (0, 1]; 0.1 is the usual value.")
        if self.min_snr_gamma is not None and not self.min_snr_gamma > 0:
            errors.append(f"min_snr_gamma: {self.min_snr_gamma} must be positive (5 is usual), or unset.")
        if not self.noise_offset >= 0:
            errors.append(f"noise_offset: {self.noise_offset} must be 0 (off) or positive, e.g. 0.05.")
        if self.multires_noise_iterations < 0:
            errors.append(
                f"multires_noise_iterations: {self.multires_noise_iterations} must be 0 (off) or positive."
            )
        if not 0 < self.multires_noise_discount <= 1:
            errors.append(f"multires_noise_discount: {self.multires_noise_discount} must be in (0, 1].")
        if errors:
            raise UserError(errors)


def snr(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio alpha_bar / (1 - alpha_bar) at each timestep: [T] table, [B] long → [B] fp32.

    Same values as sd-scripts' `all_snr` ((sqrt(ab) / sqrt(1 - ab))**2), on the device of `timesteps`.
    0 at a zero-terminal-SNR last step; +inf only if alpha_bar is exactly 1 (never in SD schedules).
    """
    alpha_bar = alphas_cumprod.to(timesteps.device, torch.float32)[timesteps]
    return alpha_bar / (1.0 - alpha_bar)


def min_snr_weights(snr: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """Min-SNR-gamma loss weights (Hang et al. 2023; sd-scripts `apply_snr_weight`): [B] → [B] fp32.

    epsilon: min(snr, gamma) / snr; v_prediction: min(snr, gamma) / (snr + 1).
    """
    snr = snr.float()
    if prediction_type == "epsilon":
        # min(snr, gamma) / snr written as min(1, gamma / snr): equal for snr > 0, and at snr == 0 (the last
        # step of a zero-terminal-SNR schedule) gamma / 0 = +inf clamps to 1, the limit of the weight,
        # where sd-scripts' form gives 0 / 0 = NaN and poisons the whole batch.
        return torch.clamp(gamma / snr, max=1.0)
    if prediction_type == "v_prediction":
        # Already finite at snr == 0 (weight 0) and at snr == +inf (gamma / inf = 0).
        return torch.minimum(snr, torch.full_like(snr, gamma)) / (snr + 1)
    raise ValueError(f"min-SNR weighting supports {PREDICTION_TYPES}, not {prediction_type!r}")


def huber_threshold(
    timesteps: torch.Tensor, alphas_cumprod: torch.Tensor, num_train_timesteps: int, settings: LossSettings
) -> torch.Tensor:
    """The Huber threshold c per sample: [B] long timesteps → [B] fp32 (sd-scripts'
    `get_huber_threshold_if_needed`, with its `huber_scale` = 1).

    constant: c; exponential: exp(-alpha * t) with alpha = -ln(c) / T (1 at t = 0, c at t = T);
    snr: (1 - c) / (1 + sigma)**2 + c with sigma = sqrt((1 - ab) / ab) (≈1 at low noise, → c at high noise).
    """
    c = settings.huber_c
    if settings.huber_schedule == "constant":
        return torch.full(timesteps.shape, c, dtype=torch.float32, device=timesteps.device)
    if settings.huber_schedule == "exponential":
        alpha = -math.log(c) / num_train_timesteps
        return torch.exp(-alpha * timesteps.float())
    alpha_bar = alphas_cumprod.to(timesteps.device, torch.float32)[timesteps]
    sigma = ((1.0 - alpha_bar) / alpha_bar).sqrt()  # +inf at alpha_bar == 0, where c is the limit below
    return (1.0 - c) / (1.0 + sigma) ** 2 + c


def per_sample_loss(
    prediction: torch.Tensor, target: torch.Tensor, settings: LossSettings, huber_c: torch.Tensor | None
) -> torch.Tensor:
    """Element-wise loss averaged over all but the batch axis: [B, ...] x2 → [B] fp32 (sd-scripts'
    `conditional_loss(..., reduction="none")` followed by `.mean([1, 2, 3])`).

    huber: 2c(sqrt(d² + c²) - c) (≈ d² for |d| << c, ≈ 2c|d| for |d| >> c);
    smooth_l1: 2(sqrt(d² + c²) - c) (≈ d²/c for |d| << c, ≈ 2|d| for |d| >> c). Both need `huber_c` [B].
    """
    prediction, target = prediction.float(), target.float()
    if settings.loss_type == "l2":
        elementwise = F.mse_loss(prediction, target, reduction="none")
    elif settings.loss_type == "l1":
        elementwise = F.l1_loss(prediction, target, reduction="none")
    else:
        if huber_c is None:
            raise ValueError(f"loss_type {settings.loss_type!r} needs huber_c (see huber_threshold)")
        c = huber_c.float().to(prediction.device).view(-1, *([1] * (prediction.ndim - 1)))
        squared = (prediction - target) ** 2
        # sqrt(d² + c²) - c rewritten as d² / (sqrt(d² + c²) + c): the same value without the cancellation
        # that makes sd-scripts' form return 0 in fp32 once c² swamps d² (e.g. c = 1e4, d = 1).
        excess = squared / (torch.sqrt(squared + c**2) + c)
        elementwise = 2 * c * excess if settings.loss_type == "huber" else 2 * excess
    return elementwise.mean(dim=tuple(range(1, elementwise.ndim)))
