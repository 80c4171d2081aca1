"""Loss terms against hand-computed numbers: SNR, min-SNR weights, the Huber threshold schedules, losses."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import DDPMScheduler

from lora_scripts.errors import UserError
from lora_scripts.training.losses import LossSettings, huber_threshold, min_snr_weights, per_sample_loss, snr


def sd_scheduler() -> DDPMScheduler:
    return DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)


def test_snr_is_alpha_bar_over_one_minus_alpha_bar():
    ab = sd_scheduler().alphas_cumprod
    t = torch.tensor([0, 500, 999])
    expected = torch.stack([ab[i] / (1 - ab[i]) for i in t])
    torch.testing.assert_close(snr(ab, t), expected)
    # sd-scripts' all_snr form: (sqrt(ab) / sqrt(1 - ab)) ** 2
    torch.testing.assert_close(snr(ab, t), (ab[t].sqrt() / (1 - ab[t]).sqrt()) ** 2)
    # Hand numbers: ab = 0.8 → 4, ab = 0.5 → 1, ab = 0 → 0.
    table = torch.tensor([0.8, 0.5, 0.0])
    torch.testing.assert_close(snr(table, torch.tensor([0, 1, 2])), torch.tensor([4.0, 1.0, 0.0]))


def test_min_snr_weights_match_the_formulas():
    s = torch.tensor([0.5, 5.0, 20.0, 100.0])
    # epsilon: min(snr, 5) / snr
    torch.testing.assert_close(min_snr_weights(s, 5.0, "epsilon"), torch.tensor([1.0, 1.0, 0.25, 0.05]))
    # v: min(snr, 5) / (snr + 1)
    expected_v = torch.tensor([0.5 / 1.5, 5 / 6, 5 / 21, 5 / 101])
    torch.testing.assert_close(min_snr_weights(s, 5.0, "v_prediction"), expected_v)
    # gamma above every snr: epsilon weights are all 1, v weights snr / (snr + 1)
    torch.testing.assert_close(min_snr_weights(s, 1000.0, "epsilon"), torch.ones(4))
    torch.testing.assert_close(min_snr_weights(s, 1000.0, "v_prediction"), s / (s + 1))


def test_min_snr_weights_on_scheduler_timesteps():
    ab = sd_scheduler().alphas_cumprod
    t = torch.tensor([0, 250, 600, 999])
    s = ab[t] / (1 - ab[t])
    gamma = 5.0
    eps = torch.tensor([min(float(x), gamma) / float(x) for x in s])
    v = torch.tensor([min(float(x), gamma) / (float(x) + 1) for x in s])
    torch.testing.assert_close(min_snr_weights(snr(ab, t), gamma, "epsilon"), eps)
    torch.testing.assert_close(min_snr_weights(snr(ab, t), gamma, "v_prediction"), v)
    assert float(eps[0]) < 0.005 and float(eps[-1]) == 1.0  # t=0 has snr ~1176: heavily down-weighted


def test_min_snr_weights_stay_finite_at_zero_and_infinite_snr():
    s = torch.tensor([0.0, math.inf])
    torch.testing.assert_close(min_snr_weights(s, 5.0, "epsilon"), torch.tensor([1.0, 0.0]))
    torch.testing.assert_close(min_snr_weights(s, 5.0, "v_prediction"), torch.tensor([0.0, 0.0]))
    with pytest.raises(ValueError, match="sample"):
        min_snr_weights(s, 5.0, "sample")


def test_huber_threshold_schedules():
    ab = sd_scheduler().alphas_cumprod
    t = torch.tensor([0, 500, 1000 - 1])
    constant = huber_threshold(t, ab, 1000, LossSettings(huber_c=0.1, huber_schedule="constant"))
    torch.testing.assert_close(constant, torch.full((3,), 0.1))
    # exponential: exp(-alpha t), alpha = -ln(c)/T → 1 at t=0, sqrt(c) at T/2, c at T
    exp_settings = LossSettings(huber_c=0.04, huber_schedule="exponential")
    torch.testing.assert_close(
        huber_threshold(torch.tensor([0, 500, 1000]), ab, 1000, exp_settings), torch.tensor([1.0, 0.2, 0.04])
    )
    # snr: (1 - c)/(1 + sigma)^2 + c with sigma = sqrt((1 - ab)/ab)
    c = 0.1
    sigma = ((1 - ab[t]) / ab[t]).sqrt()
    expected = (1 - c) / (1 + sigma) ** 2 + c
    torch.testing.assert_close(huber_threshold(t, ab, 1000, LossSettings(huber_c=c)), expected)
    # Hand numbers: ab = 0.5 → sigma 1 → 0.9/4 + 0.1 = 0.325; ab = 0.8 → sigma 0.5 → 0.9/2.25 + 0.1 = 0.5;
    # ab = 0 (zero terminal SNR) → sigma inf → c.
    table = torch.tensor([0.5, 0.8, 0.0])
    got = huber_threshold(torch.tensor([0, 1, 2]), table, 3, LossSettings(huber_c=c))
    torch.testing.assert_close(got, torch.tensor([0.325, 0.5, 0.1]))


def test_l2_and_l1_per_sample():
    pred = torch.tensor([[1.0, 2.0, 3.0, 4.0], [0.0, 0.0, 0.0, 0.0]]).view(2, 1, 2, 2)
    target = torch.tensor([[1.0, 0.0, 3.0, 0.0], [1.0, -1.0, 2.0, -2.0]]).view(2, 1, 2, 2)
    l2 = per_sample_loss(pred, target, LossSettings(), None)
    torch.testing.assert_close(l2, torch.tensor([(4 + 16) / 4, (1 + 1 + 4 + 4) / 4]))
    l1 = per_sample_loss(pred, target, LossSettings(loss_type="l1"), None)
    torch.testing.assert_close(l1, torch.tensor([6 / 4, 6 / 4]))
    assert per_sample_loss(pred.half(), target.half(), LossSettings(), None).dtype == torch.float32


def test_huber_and_smooth_l1_by_hand():
    # sample 0: c = 0.5, d = (1.2, 0): sqrt(1.44 + 0.25) = 1.3 → huber 2*0.5*(1.3-0.5) = 0.8, smooth 1.6
    # sample 1: c = 1.5, d = (2, 0): sqrt(4 + 2.25) = 2.5 → huber 2*1.5*(2.5-1.5) = 3, smooth 2
    pred = torch.tensor([[1.2, 0.0], [2.0, 0.0]]).view(2, 1, 1, 2)
    target = torch.zeros(2, 1, 1, 2)
    c = torch.tensor([0.5, 1.5])
    huber = per_sample_loss(pred, target, LossSettings(loss_type="huber"), c)
    torch.testing.assert_close(huber, torch.tensor([0.8 / 2, 3.0 / 2]))
    smooth = per_sample_loss(pred, target, LossSettings(loss_type="smooth_l1"), c)
    torch.testing.assert_close(smooth, torch.tensor([1.6 / 2, 2.0 / 2]))
    with pytest.raises(ValueError, match="huber_c"):
        per_sample_loss(pred, target, LossSettings(loss_type="huber"), None)


def test_huber_limits():
    torch.manual_seed(0)
    pred, target = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    l2 = per_sample_loss(pred, target, LossSettings(), None)
    l1 = per_sample_loss(pred, target, LossSettings(loss_type="l1"), None)
    # huge c: 2c(sqrt(d² + c²) - c) → d² (the stable form keeps this in fp32, where the naive one gives 0)
    huge = torch.full((2,), 1e4)
    torch.testing.assert_close(per_sample_loss(pred, target, LossSettings(loss_type="huber"), huge), l2)
    # tiny c: smooth_l1 → 2|d|, huber → 2c|d|
    tiny = torch.full((2,), 1e-6)
    smooth = per_sample_loss(pred, target, LossSettings(loss_type="smooth_l1"), tiny)
    torch.testing.assert_close(smooth, 2 * l1, rtol=1e-4, atol=1e-5)
    huber = per_sample_loss(pred, target, LossSettings(loss_type="huber"), tiny)
    torch.testing.assert_close(huber, 2e-6 * l1, rtol=1e-4, atol=1e-11)


def test_settings_report_every_bad_value():
    with pytest.raises(UserError) as err:
        LossSettings(
            loss_type="l3",  # type: ignore[arg-type]
            huber_c=0.0,
            min_snr_gamma=-1.0,
            noise_offset=-0.1,
            multires_noise_iterations=-2,
            multires_noise_discount=1.5,
        )
    keys = [message.split(":")[0] for message in err.value.messages]
    assert keys == [
        "loss_type",
        "huber_c",
        "min_snr_gamma",
        "noise_offset",
        "multires_noise_iterations",
        "multires_noise_discount",
    ]
