"""The validation loss on the tiny SD model at 64 px: fixed (same weights → the same number, whatever the
global RNG did), sensitive to the LoRA weights, dropout off, equal to the mean loss computed pair by pair; and
the best-step / early-stopping bookkeeping on a hand-made loss sequence."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from diffusers import DDPMScheduler
from peft.tuners.lora import LoraLayer

from lora_scripts.config import validate_config_dict
from lora_scripts.data.buckets import BucketSettings
from lora_scripts.data.captions import CaptionedImage
from lora_scripts.data.dataset import load_pixels
from lora_scripts.data.latent_cache import LatentRequest
from lora_scripts.data.training_set import training_set_for
from lora_scripts.demo import draw_ink_image
from lora_scripts.models.family import LoraTargets
from lora_scripts.models.lora import LoraSpec
from lora_scripts.models.sd_loading import SDComponents
from lora_scripts.models.stable_diffusion import StableDiffusionFamily
from lora_scripts.models.tiny import build_tiny_sd_components
from lora_scripts.training.losses import LossSettings
from lora_scripts.training.validation import Validator, stratified_quantiles, validator_for

# Per dataset (CaptionedImage.subset): 64x64, and 64 wide by 128 tall (latents 8x16).
BUCKETS = [BucketSettings(resolution=(64, 64)), BucketSettings(resolution=(64, 128))]


def tiny_family(dropout: float = 0.0, text_encoder: bool = False) -> StableDiffusionFamily:
    """The tiny SD 1.x model with LoRA on to_q/to_v (and the text encoder's q/v), every lora_B random so the
    LoRA changes the output, modules in train() mode as during training."""
    tiny = build_tiny_sd_components(0)
    scheduler = DDPMScheduler.from_config(tiny.scheduler.config)
    components = SDComponents(
        tiny.unet, tiny.vae, tiny.text_encoder, tiny.tokenizer, scheduler, "sd_v1", "epsilon", "memory"
    )
    family = StableDiffusionFamily(components)
    for module in family.frozen_modules():
        module.requires_grad_(False)
    targets = LoraTargets(["to_q", "to_v"], ["q_proj", "v_proj"] if text_encoder else None)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # peft draws lora_A from the global RNG: the same weights in every family
        family.add_lora(targets, LoraSpec(rank=4, alpha=4.0, dropout=dropout))
    generator = torch.Generator().manual_seed(1)
    for module in [family.unet, family.text_encoder]:
        for layer in lora_layers(module):
            weight = layer.lora_B["default"].weight
            weight.data = 0.5 * torch.randn(weight.shape, generator=generator)
        module.train()
    return family


def lora_layers(module: torch.nn.Module) -> list[LoraLayer]:
    return [m for m in module.modules() if isinstance(m, LoraLayer)]


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[CaptionedImage]:
    """Three square images of dataset 0 and a tall one of dataset 1 (its own bucket)."""
    folder = tmp_path_factory.mktemp("val")
    out = []
    for i, size in enumerate([(64, 64), (72, 72), (64, 64), (64, 128)]):
        path = folder / f"{i}.png"
        draw_ink_image(i, seed=i, size=72).resize(size).save(path)
        out.append(CaptionedImage(path, f"ink wash painting, subject {i}", path.name, subset=i // 3))
    return out


def validator(family: StableDiffusionFamily, images: list[CaptionedImage], **overrides) -> Validator:
    options = dict(
        buckets=BUCKETS,
        settings=LossSettings(),
        every_n_steps=None,
        patience=None,
        device="cpu",
        batch_size=5,
    )
    return Validator(family, images, **(options | overrides))


def test_same_weights_give_exactly_the_same_loss_whatever_the_global_rng(images) -> None:
    family = tiny_family()
    torch.manual_seed(123)
    first = validator(family, images)
    torch.manual_seed(456)  # building another one under another global seed changes nothing
    second = validator(family, images)
    loss = first.loss(family)
    assert math.isfinite(loss) and loss > 0
    state = torch.get_rng_state()
    assert first.loss(family) == loss == second.loss(family)
    assert torch.equal(torch.get_rng_state(), state)  # validating draws nothing from the global RNG
    torch.randn(1000)  # the training run goes on drawing
    assert first.loss(family) == loss


def test_a_changed_lora_weight_changes_the_loss(images) -> None:
    family = tiny_family()
    check = validator(family, images)
    before = check.loss(family)
    with torch.no_grad():
        lora_layers(family.unet)[0].lora_B["default"].weight.add_(0.1)
    after = check.loss(family)
    assert after != before and abs(after - before) > 1e-7


def test_dropout_is_off_during_validation_and_modes_come_back(images) -> None:
    plain, dropped = tiny_family(dropout=0.0), tiny_family(dropout=0.5)  # the same weights
    dropout = [m for m in dropped.unet.modules() if isinstance(m, torch.nn.Dropout) and m.p == 0.5]
    assert dropout and all(m.training for m in dropout)
    check = validator(dropped, images)
    loss = check.loss(dropped)
    assert check.loss(dropped) == loss  # dropout 0.5 in train() mode would draw a new mask each call
    assert loss == validator(plain, images).loss(plain)  # ...and would not equal the no-dropout loss
    assert all(m.training for m in dropout) and dropped.unet.training and dropped.text_encoder.training


def test_the_loss_is_the_mean_over_every_image_and_timestep(images) -> None:
    family = tiny_family()
    family.unet.eval()
    check = validator(family, images, batch_size=5)
    # 3 square images x 4 timesteps = 12 pairs → batches of 5, 5, 2; the tall image's 4 pairs → one batch.
    assert [len(b) for b in check.batches] == [5, 5, 2, 4]
    assert [tuple(b.latents.shape[2:]) for b in check.batches] == [(8, 8)] * 3 + [(16, 8)]
    scheduler, per_pair = family.noise_scheduler, []
    with torch.no_grad():
        for batch in check.batches:
            for i in range(len(batch)):
                pair = slice(i, i + 1)
                latents, noise, t = batch.latents[pair], batch.noise[pair], batch.timesteps[pair]
                ab = scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
                noisy = ab.sqrt() * latents + (1 - ab).sqrt() * noise
                cond = family.encode_prompts([batch.captions[i]], torch.device("cpu"))
                prediction = family.predict(noisy, t, cond)
                per_pair.append(((prediction - noise) ** 2).mean().item())
    assert len(per_pair) == 16
    assert check.loss(family) == pytest.approx(sum(per_pair) / 16, rel=1e-5)


def test_latents_are_posterior_means_and_timesteps_cover_every_stratum(images) -> None:
    family = tiny_family()
    check = validator(family, images, batch_size=4)
    first = check.batches[0]  # image 0 at its four timesteps
    assert first.captions == [images[0].caption] * 4
    pixels = load_pixels(LatentRequest(images[0].path, (64, 64), False))[None]
    with torch.no_grad():
        mean = family.vae.encode(pixels).latent_dist.mean * 0.18215
    for row in first.latents:
        torch.testing.assert_close(row[None], mean, atol=1e-5, rtol=1e-5)
    # One timestep in each quarter of [0, 1000) per image, the same ones in a second Validator.
    for batch in check.batches:
        assert [t // 250 for t in batch.timesteps.tolist()] == [0, 1, 2, 3]
    other = validator(family, images, batch_size=4)
    for a, b in zip(check.batches, other.batches, strict=True):
        assert torch.equal(a.noise, b.noise) and torch.equal(a.timesteps, b.timesteps)
    assert first.cond is not None  # a frozen text encoder is encoded once


def test_stratified_timesteps_stay_in_their_strata() -> None:
    quantiles = stratified_quantiles(500, 4, torch.Generator().manual_seed(0))
    assert quantiles.dtype == torch.float64 and 0 <= quantiles.min() and quantiles.max() < 1
    t = tiny_family().timesteps_at(quantiles, (8, 8))  # a DDPM family: T = 1000
    assert t.dtype == torch.long and t.shape == (500, 4)
    for k in range(4):
        assert t[:, k].min() >= 250 * k and t[:, k].max() < 250 * (k + 1)
        assert t[:, k].max() - t[:, k].min() > 200  # spread over the stratum, not one value


def test_a_trained_text_encoder_is_encoded_at_every_measurement(images) -> None:
    family = tiny_family(text_encoder=True)
    check = validator(family, images)
    assert all(batch.cond is None for batch in check.batches)
    before = check.loss(family)
    with torch.no_grad():
        lora_layers(family.text_encoder)[0].lora_B["default"].weight.mul_(3.0)
    assert check.loss(family) != before


def test_record_tracks_the_best_step_and_patience() -> None:
    check = Validator.__new__(Validator)  # only the bookkeeping: no model, no images
    check.patience, check.best_step, check.best_loss, check.since_best = 3, None, math.inf, 0
    losses = {100: 1.0, 200: 0.8, 300: 0.9, 400: 0.8, 500: 0.7, 600: 0.75, 700: float("nan"), 800: 0.71}
    outcomes = [check.record(step, loss) for step, loss in losses.items()]
    assert [o.improved for o in outcomes] == [True, True, False, False, True, False, False, False]
    assert [o.best_step for o in outcomes] == [100, 200, 200, 200, 500, 500, 500, 500]
    assert [o.best_loss for o in outcomes] == [1.0, 0.8, 0.8, 0.8, 0.7, 0.7, 0.7, 0.7]
    assert [o.since_best for o in outcomes] == [0, 0, 1, 2, 0, 1, 2, 3]  # a tie (0.8) is no improvement
    assert [o.should_stop for o in outcomes] == [False] * 7 + [True]
    assert check.state_dict() == {"best_step": 500, "best_loss": 0.7, "since_best": 3}
    resumed = Validator.__new__(Validator)
    resumed.patience = None  # without patience a run never stops early
    resumed.load_state_dict(check.state_dict())
    outcome = resumed.record(900, 0.72)
    assert (outcome.best_step, outcome.since_best, outcome.should_stop) == (500, 4, False)


def test_due_every_n_steps_and_at_the_last(images) -> None:
    family = tiny_family()
    every3 = validator(family, images[:1], every_n_steps=3)
    assert [s for s in range(1, 8) if every3.due(s, is_last=s == 7)] == [3, 6, 7]
    at_end = validator(family, images[:1], every_n_steps=None)
    assert [s for s in range(1, 8) if at_end.due(s, is_last=s == 7)] == [7]


def test_no_images_or_bad_settings_are_refused(images) -> None:
    family = tiny_family()
    with pytest.raises(ValueError):
        validator(family, [])
    with pytest.raises(ValueError):
        validator(family, images[:1], patience=0)


def test_validator_for_builds_from_the_config(tmp_path: Path, images) -> None:
    folder = images[0].path.parent
    for item in images:
        item.path.with_suffix(".txt").write_text(item.caption, encoding="utf-8")
    values = dict(base_model="m", output_dir=str(tmp_path), train_data_dir=str(folder), resolution=64)
    family = tiny_family()
    off = validate_config_dict(values, "<test>", check_paths=False)
    assert validator_for(off, family, training_set_for(off), "cpu") is None
    on = validate_config_dict(
        values | dict(validation_split=0.25, validate_every_n_steps=10, early_stopping_patience=2),
        "<test>",
        check_paths=False,
    )
    built = validator_for(on, family, training_set_for(on), "cpu")
    assert built is not None and (built.every_n_steps, built.patience) == (10, 2)
    assert sum(len(b) for b in built.batches) == 4  # one image of four, at four timesteps
