"""Training noise and the zero-terminal-SNR schedule, checked with numbers."""

from __future__ import annotations

import torch
from diffusers import DDPMScheduler

from lora_scripts.training.losses import LossSettings, min_snr_weights, snr
from lora_scripts.training.noise import (
    TERMINAL_ALPHA_BAR,
    offset_noise,
    pyramid_noise,
    sample_noise,
    zero_terminal_snr,
)


def sd_scheduler(prediction_type: str = "epsilon") -> DDPMScheduler:
    return DDPMScheduler(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, prediction_type=prediction_type
    )


def test_offset_noise_is_a_per_channel_constant_with_std_offset():
    torch.manual_seed(0)
    noise = torch.randn(64, 16, 4, 4)
    shifted = offset_noise(noise, 0.1)
    diff = shifted - noise
    # constant over h, w for each (b, c)
    torch.testing.assert_close(diff, diff[:, :, :1, :1].expand_as(diff), rtol=0, atol=1e-6)
    # its std over the 1024 (b, c) pairs is ~ the offset (sampling error ~2%)
    assert abs(float(diff[:, :, 0, 0].std()) - 0.1) < 0.01
    # it is exactly offset * the next randn(B, C, 1, 1) draw
    torch.manual_seed(0)
    torch.randn(64, 16, 4, 4)
    torch.testing.assert_close(diff[:, :, :1, :1], 0.1 * torch.randn(64, 16, 1, 1), rtol=0, atol=1e-6)


def test_offset_zero_leaves_noise_and_rng_untouched():
    noise = torch.randn(2, 4, 3, 3)
    state = torch.get_rng_state()
    assert offset_noise(noise, 0.0) is noise
    assert torch.equal(torch.get_rng_state(), state)


def test_pyramid_noise_unit_std_shape_and_low_frequencies():
    torch.manual_seed(0)
    white = torch.randn(2, 4, 48, 48)
    before = white.clone()
    pyramid = pyramid_noise(white, iterations=6, discount=0.8)
    assert pyramid.shape == white.shape
    assert torch.equal(white, before)  # the input is not modified (sd-scripts adds in place)
    torch.testing.assert_close(pyramid.std(), torch.tensor(1.0))

    def neighbour_correlation(x: torch.Tensor) -> float:
        a, b = x[..., :, :-1].flatten(), x[..., :, 1:].flatten()
        return float(torch.corrcoef(torch.stack([a, b]))[0, 1])

    # White noise has no correlation between neighbours; the upsampled octaves add a lot of it.
    assert abs(neighbour_correlation(white)) < 0.03
    assert neighbour_correlation(pyramid) > 0.2  # ~0.29 with this seed


def test_pyramid_noise_zero_iterations_and_one_octave_by_hand():
    noise = torch.randn(1, 1, 8, 8)
    assert pyramid_noise(noise, iterations=0, discount=0.3) is noise
    # One iteration: octave 0 is a full-resolution randn (r**0 = 1), after one torch.rand for r.
    torch.manual_seed(3)
    got = pyramid_noise(noise, iterations=1, discount=0.3)
    torch.manual_seed(3)
    torch.rand(())
    total = noise + torch.randn(1, 1, 8, 8)
    torch.testing.assert_close(got, total / total.std())


def test_sample_noise_draws_randn_then_offset_then_pyramid():
    latents = torch.zeros(2, 4, 8, 8, dtype=torch.float16)
    torch.manual_seed(1)
    plain = sample_noise(latents, LossSettings())
    torch.manual_seed(1)
    assert plain.dtype == torch.float32 and torch.equal(plain, torch.randn(2, 4, 8, 8))

    settings = LossSettings(noise_offset=0.05, multires_noise_iterations=3, multires_noise_discount=0.5)
    torch.manual_seed(1)
    got = sample_noise(latents, settings)
    torch.manual_seed(1)
    expected = pyramid_noise(offset_noise(torch.randn(2, 4, 8, 8), 0.05), 3, 0.5)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_zero_terminal_snr_scheduler():
    original = sd_scheduler("v_prediction")
    before = original.alphas_cumprod.clone()
    rescaled = zero_terminal_snr(original)
    ab = rescaled.alphas_cumprod
    assert rescaled is not original and torch.equal(original.alphas_cumprod, before)
    assert type(rescaled) is DDPMScheduler and rescaled.config.rescale_betas_zero_snr
    assert rescaled.config.prediction_type == "v_prediction"
    # first alpha_bar kept, last one ~0 (SNR ~6e-8) but positive, schedule still decreasing
    torch.testing.assert_close(ab[0], before[0])
    assert float(ab[-1]) == TERMINAL_ALPHA_BAR
    last_snr = snr(ab, torch.tensor([999]))
    assert 0 < float(last_snr) < 1e-7
    assert bool((ab[1:] < ab[:-1]).all())
    # the middle of the schedule moved down (more noise everywhere), e.g. t=500: 0.276 → 0.241
    assert float(ab[500]) < float(before[500]) - 0.03
    # betas, alphas and alphas_cumprod agree
    torch.testing.assert_close(torch.cumprod(1 - rescaled.betas, 0), ab, rtol=1e-4, atol=1e-9)
    torch.testing.assert_close(rescaled.alphas, 1 - rescaled.betas)
    # the last step is pure noise: add_noise gives the noise, v target gives -x0
    x0, noise = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)
    t = torch.tensor([999])
    torch.testing.assert_close(rescaled.add_noise(x0, noise, t), noise, rtol=0, atol=1e-3)
    torch.testing.assert_close(rescaled.get_velocity(x0, noise, t), -x0, rtol=0, atol=1e-3)


def test_min_snr_weights_are_finite_on_the_zero_terminal_schedule():
    rescaled = zero_terminal_snr(sd_scheduler())
    s = snr(rescaled.alphas_cumprod, torch.arange(1000))
    for prediction_type in ("epsilon", "v_prediction"):
        weights = min_snr_weights(s, 5.0, prediction_type)
        assert bool(torch.isfinite(weights).all())
    assert float(min_snr_weights(s[-1:], 5.0, "epsilon")) == 1.0
    # and the diffusers schedule before the patch (alpha_bar exactly 0) is handled too
    exact_zero = DDPMScheduler.from_config(sd_scheduler().config, rescale_betas_zero_snr=True)
    assert float(exact_zero.alphas_cumprod[-1]) == 0.0
    s0 = snr(exact_zero.alphas_cumprod, torch.tensor([999]))
    torch.testing.assert_close(min_snr_weights(s0, 5.0, "epsilon"), torch.tensor([1.0]))
    torch.testing.assert_close(min_snr_weights(s0, 5.0, "v_prediction"), torch.tensor([0.0]))
