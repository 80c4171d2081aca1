"""diffusion_loss on a fake family: with a fixed seed it equals the loss computed by hand from its draws."""

from __future__ import annotations

import torch
from diffusers import DDPMScheduler

from lora_scripts.export.metadata import FamilyInfo
from lora_scripts.models.family import ModelFamily
from lora_scripts.training.losses import LossSettings
from lora_scripts.training.noise import pyramid_noise, zero_terminal_snr
from lora_scripts.training.step import diffusion_loss

SHAPE = (3, 4, 6, 6)


class FakeFamily:
    """Just what diffusion_loss uses: info, noise_scheduler, predict and the real DDPM objective."""

    training_target = ModelFamily.training_target
    sample_timesteps = ModelFamily.sample_timesteps
    add_noise = ModelFamily.add_noise

    def __init__(self, prediction_type: str = "epsilon", scheduler: DDPMScheduler | None = None):
        self.info = FamilyInfo("sd_v1", False, prediction_type, "stable-diffusion-v1")
        self.noise_scheduler = scheduler or DDPMScheduler(
            beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, prediction_type=prediction_type
        )

    def predict(self, noisy: torch.Tensor, timesteps: torch.Tensor, cond: dict[str, torch.Tensor]):
        # A fixed function of all three inputs, so a wrong timestep or a dropped cond changes the loss.
        return 0.5 * noisy + cond["bias"] + 1e-3 * timesteps.float().view(-1, 1, 1, 1)


def inputs(seed: int = 0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    latents = torch.randn(SHAPE, generator=gen)
    return latents, {"bias": torch.randn(SHAPE[0], SHAPE[1], 1, 1, generator=gen)}


def by_hand_draws(family: FakeFamily, latents: torch.Tensor, noise_offset: float = 0.0):
    """Redo diffusion_loss's draws in its order: randn noise, offset randn, timesteps."""
    noise = torch.randn(SHAPE)
    if noise_offset:
        noise = noise + noise_offset * torch.randn(SHAPE[0], SHAPE[1], 1, 1)
    return noise, torch.randint(0, 1000, (SHAPE[0],))


def test_epsilon_l2_offset_min_snr_by_hand():
    family, (latents, cond) = FakeFamily("epsilon"), inputs()
    settings = LossSettings(noise_offset=0.1, min_snr_gamma=5.0)
    torch.manual_seed(7)
    loss = diffusion_loss(family, latents, cond, settings)

    torch.manual_seed(7)
    noise, t = by_hand_draws(family, latents, noise_offset=0.1)
    ab = family.noise_scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    noisy = ab.sqrt() * latents + (1 - ab).sqrt() * noise  # the offset noise both noises the latents...
    pred = 0.5 * noisy + cond["bias"] + 1e-3 * t.float().view(-1, 1, 1, 1)
    per_sample = ((pred - noise) ** 2).mean(dim=(1, 2, 3))  # ...and is the epsilon target
    snr = ab.flatten() / (1 - ab.flatten())
    weights = torch.minimum(snr, torch.tensor(5.0)) / snr
    torch.testing.assert_close(loss, (per_sample * weights).mean())
    assert loss.dtype == torch.float32 and loss.ndim == 0


def test_v_prediction_huber_snr_multires_by_hand():
    family, (latents, cond) = FakeFamily("v_prediction"), inputs(1)
    settings = LossSettings(
        loss_type="huber", huber_c=0.1, huber_schedule="snr", min_snr_gamma=2.0, multires_noise_iterations=2
    )
    torch.manual_seed(11)
    loss = diffusion_loss(family, latents, cond, settings)

    torch.manual_seed(11)
    noise = pyramid_noise(torch.randn(SHAPE), 2, 0.3)
    t = torch.randint(0, 1000, (SHAPE[0],))
    ab = family.noise_scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    noisy = ab.sqrt() * latents + (1 - ab).sqrt() * noise
    pred = 0.5 * noisy + cond["bias"] + 1e-3 * t.float().view(-1, 1, 1, 1)
    target = ab.sqrt() * noise - (1 - ab).sqrt() * latents  # v
    torch.testing.assert_close(target, family.noise_scheduler.get_velocity(latents, noise, t))
    sigma = ((1 - ab) / ab).sqrt()
    c = (1 - 0.1) / (1 + sigma) ** 2 + 0.1
    per_sample = (2 * c * (((pred - target) ** 2 + c**2).sqrt() - c)).mean(dim=(1, 2, 3))
    snr = ab.flatten() / (1 - ab.flatten())
    weights = torch.minimum(snr, torch.tensor(2.0)) / (snr + 1)
    torch.testing.assert_close(loss, (per_sample * weights).mean())


def test_default_settings_are_the_plain_mse():
    family, (latents, cond) = FakeFamily(), inputs(2)
    torch.manual_seed(3)
    loss = diffusion_loss(family, latents, cond, LossSettings())
    torch.manual_seed(3)
    noise, t = by_hand_draws(family, latents)
    noisy = family.noise_scheduler.add_noise(latents, noise, t)
    expected = torch.nn.functional.mse_loss(family.predict(noisy, t, cond), noise)
    torch.testing.assert_close(loss, expected)


def test_loss_weights_scale_each_sample():
    family, (latents, cond) = FakeFamily(), inputs(3)
    settings = LossSettings(min_snr_gamma=5.0)

    def run(weights: torch.Tensor | None) -> torch.Tensor:
        torch.manual_seed(5)
        return diffusion_loss(family, latents, cond, settings, weights)

    unweighted = run(None)
    assert torch.equal(run(torch.ones(3)), unweighted)
    only_first = run(torch.tensor([1.0, 0.0, 0.0]))
    assert torch.equal(run(torch.tensor([2.0, 0.0, 0.0])), 2 * only_first)
    # the three single-sample terms add up to the unweighted loss: (l0 + l1 + l2) / 3
    terms = [run(torch.eye(3)[i]) for i in range(3)]
    torch.testing.assert_close(sum(terms), unweighted)
    # prior_loss_weight 0.5 on the last sample: (l0 + l1 + 0.5 l2) / 3
    torch.testing.assert_close(run(torch.tensor([1.0, 1.0, 0.5])), terms[0] + terms[1] + 0.5 * terms[2])


def test_loss_weights_one_zero_is_half_the_first_sample():
    family, (latents, cond) = FakeFamily(), inputs(4)
    two = latents[:2], {"bias": cond["bias"][:2]}
    torch.manual_seed(9)
    loss = diffusion_loss(family, *two, LossSettings(), torch.tensor([1.0, 0.0]))
    torch.manual_seed(9)
    noise = torch.randn(2, *SHAPE[1:])
    t = torch.randint(0, 1000, (2,))
    noisy = family.noise_scheduler.add_noise(two[0], noise, t)
    first = ((family.predict(noisy, t, two[1]) - noise) ** 2)[0].mean()
    torch.testing.assert_close(loss, first / 2)


def test_zero_terminal_snr_last_step_keeps_the_loss_finite():
    # Two timesteps, so the pure-noise last step (SNR ~0) is drawn half of the time.
    base = DDPMScheduler(num_train_timesteps=2, beta_start=0.1, beta_end=0.2)
    last_step_drawn = False
    for scheduler in (
        zero_terminal_snr(base),
        DDPMScheduler.from_config(base.config, rescale_betas_zero_snr=True),
    ):
        family, (latents, cond) = FakeFamily("epsilon", scheduler), inputs(5)
        for seed in range(4):
            torch.manual_seed(seed)
            loss = diffusion_loss(family, latents, cond, LossSettings(min_snr_gamma=5.0))
            assert torch.isfinite(loss)
            torch.manual_seed(seed)
            torch.randn(SHAPE)
            last_step_drawn |= bool((torch.randint(0, 2, (SHAPE[0],)) == 1).any())
    assert last_step_drawn


def test_half_precision_latents_give_an_fp32_loss():
    family, (latents, cond) = FakeFamily(), inputs(6)
    torch.manual_seed(1)
    loss = diffusion_loss(family, latents.bfloat16(), cond, LossSettings(loss_type="l1"))
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
