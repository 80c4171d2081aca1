"""FLUX's rectified-flow math (models/flow_matching.py) against the reference implementations: diffusers'
FluxPipeline packing and position ids, and sd-scripts' timestep sampling written out here as its formulas."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import FluxPipeline

from lora_scripts.models.flow_matching import (
    FlowSettings,
    flux_mu,
    image_ids,
    noisy_latents,
    pack_latents,
    sample_sigmas,
    sigmas_at,
    unpack_latents,
)

LATENT_SIZE = (64, 96)  # 512 x 768 px through the 8x VAE


def test_packing_is_diffusers_and_round_trips():
    latents = torch.randn(2, 16, *LATENT_SIZE)
    packed = pack_latents(latents)
    assert packed.shape == (2, 32 * 48, 64)
    assert torch.equal(packed, FluxPipeline._pack_latents(latents, 2, 16, *LATENT_SIZE))
    assert torch.equal(unpack_latents(packed, LATENT_SIZE), latents)
    # diffusers unpacks from the pixel size (8x VAE).
    pixels = (LATENT_SIZE[0] * 8, LATENT_SIZE[1] * 8)
    assert torch.equal(FluxPipeline._unpack_latents(packed, *pixels, 8), latents)


def test_image_ids_are_diffusers():
    ours = image_ids(LATENT_SIZE, torch.device("cpu"), torch.float32)
    theirs = FluxPipeline._prepare_latent_image_ids(1, 32, 48, torch.device("cpu"), torch.float32)
    assert torch.equal(ours, theirs) and ours[49].tolist() == [0.0, 1.0, 1.0]


def _reference_sigmas(settings: FlowSettings, batch: int, latent_size) -> torch.Tensor:
    """sd-scripts' get_noisy_model_input_and_timesteps, its sigma part, from the same RNG state."""
    if settings.timestep_sampling == "uniform":
        return torch.rand((batch,))
    sigmas = torch.randn(batch) * settings.sigmoid_scale
    sigmas = sigmas.sigmoid()
    if settings.timestep_sampling == "shift":
        shift = settings.discrete_flow_shift
        return (sigmas * shift) / (1 + (shift - 1) * sigmas)
    if settings.timestep_sampling == "flux_shift":
        h, w = latent_size
        m = (1.15 - 0.5) / (4096 - 256)
        mu = m * ((h // 2) * (w // 2)) + (0.5 - m * 256)
        return math.exp(mu) / (math.exp(mu) + (1 / sigmas - 1) ** 1.0)
    return sigmas


@pytest.mark.parametrize(
    "settings",
    [
        FlowSettings("uniform"),
        FlowSettings("sigmoid", sigmoid_scale=1.5),
        FlowSettings("shift", discrete_flow_shift=3.1582),
        FlowSettings("flux_shift"),
    ],
    ids=lambda s: s.timestep_sampling,
)
def test_sigmas_follow_the_reference_sampling(settings):
    torch.manual_seed(3)
    ours = sample_sigmas(8, settings, LATENT_SIZE, torch.device("cpu"))
    torch.manual_seed(3)
    reference = _reference_sigmas(settings, 8, LATENT_SIZE)
    torch.testing.assert_close(ours, reference, rtol=1e-6, atol=1e-7)
    assert ours.dtype == torch.float32 and bool(((ours > 0) & (ours < 1)).all())


@pytest.mark.parametrize("sampling", ["uniform", "sigmoid", "shift", "flux_shift"])
def test_fixed_validation_sigmas_spread_as_the_training_draws(sampling):
    """sigmas_at maps quantiles through the distribution sample_sigmas draws from: 20,000 draws sorted sit
    on the quantile curve."""
    settings = FlowSettings(sampling, sigmoid_scale=1.3)
    torch.manual_seed(0)
    drawn = torch.sort(sample_sigmas(20_000, settings, LATENT_SIZE, torch.device("cpu"))).values
    quantiles = (torch.arange(20_000, dtype=torch.float64) + 0.5) / 20_000
    curve = sigmas_at(quantiles, settings, LATENT_SIZE)
    assert bool((curve[1:] >= curve[:-1]).all())
    assert (drawn - curve).abs().max() < 0.02


def test_flux_mu_is_fluxs_schedule():
    assert flux_mu(256) == pytest.approx(0.5) and flux_mu(4096) == pytest.approx(1.15)
    assert flux_mu(64 * 64) == pytest.approx(1.15)  # 1024 px: 128 latents, 64 x 64 tokens


def test_noisy_latents_interpolate_between_data_and_noise():
    latents, noise = torch.randn(3, 16, 4, 4), torch.randn(3, 16, 4, 4)
    sigmas = torch.tensor([0.0, 0.25, 1.0])
    noisy = noisy_latents(latents, noise, sigmas)
    assert torch.equal(noisy[0], latents[0]) and torch.equal(noisy[2], noise[2])
    torch.testing.assert_close(noisy[1], 0.75 * latents[1] + 0.25 * noise[1])
