"""The two training loops the benchmark times, built from the real training code.

`OurLoop` is `train()`'s step (training/loop.py) with its setup (training/setup.py, training/caching.py):
cached latents and text-encoder outputs by default, the VAE and text encoder offloaded. `ReferenceLoop` is
the same model, LoRA, data, batch, precision, optimizer and schedule, stepping like diffusers'
train_text_to_image_lora.py (bench/reference.py). Both mark their phases on a `PhaseClock`.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from accelerate.utils import set_seed

from lora_scripts.bench.measure import PhaseClock
from lora_scripts.bench.reference import encode_reference_batch, reference_loss
from lora_scripts.bench.workspace import load_bench_family
from lora_scripts.checks import check_before_training
from lora_scripts.config import TrainConfig
from lora_scripts.training.caching import cache_latents, cache_text_encoder_outputs
from lora_scripts.training.loop import batch_inputs
from lora_scripts.training.setup import (
    attach_lora,
    loss_settings,
    make_accelerator,
    make_dataloader,
    make_optimization,
)
from lora_scripts.training.step import diffusion_loss


def endless_batches(dataloader: torch.utils.data.DataLoader, epoch_sampler: object) -> Iterator[dict]:
    """Batches epoch after epoch, each epoch in its own seeded order as `train()` sets it (`epoch_sampler`:
    our EpochBatchSampler, taken before accelerate wrapped the loader)."""
    epoch = 0
    while True:
        dataloader.set_epoch(epoch)
        epoch_sampler.set_epoch(epoch)
        yield from dataloader
        epoch += 1


class BenchLoop:
    """A model with LoRA, its optimizer and data, ready to step. Subclasses differ in setup and `_inputs`."""

    name = ""

    def __init__(self, config: TrainConfig, base_model: str):
        self.config = config
        training_set = check_before_training(config)
        self.accelerator = make_accelerator(config)
        self.device = self.accelerator.device
        set_seed(config.seed)
        self.family = load_bench_family(base_model)
        attach_lora(self.family, config, self.accelerator)
        latents = self._prepare_caches(training_set)
        dataloader = make_dataloader(training_set, config, latents)
        epoch_sampler = dataloader.batch_sampler
        optimizer, _, lr_scheduler = make_optimization(
            config, self.family, training_set, dataloader, self.accelerator
        )
        unet, self.optimizer, dataloader, self.lr_scheduler = self.accelerator.prepare(
            self.family.denoiser, optimizer, dataloader, lr_scheduler
        )
        self.family.use_wrapped(unet, [])
        self.unet = unet
        self.batches = endless_batches(dataloader, epoch_sampler)
        self.params = [p for group in self.optimizer.param_groups for p in group["params"]]
        self.settings = loss_settings(config)
        unet.train()

    def _prepare_caches(self, training_set: object) -> dict | None:
        return None

    def _loss(self, batch: dict, clock: PhaseClock) -> torch.Tensor:
        raise NotImplementedError

    def step(self, clock: PhaseClock) -> torch.Tensor:
        """One optimizer step, its phases marked on `clock`; returns the detached loss (no host sync)."""
        batch = next(self.batches)
        clock.mark("data")
        with self.accelerator.accumulate(self.unet):
            loss = self._loss(batch, clock)
            clock.mark("forward")
            self.accelerator.backward(loss)
            clock.mark("backward")
            if self.accelerator.sync_gradients and self.config.max_grad_norm > 0:
                self.accelerator.clip_grad_norm_(self.params, self.config.max_grad_norm)
            self.optimizer.step()
            self.lr_scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
        clock.mark("optimizer")
        return loss.detach()


class OurLoop(BenchLoop):
    """train()'s step: latents from the cache (or encoded now without caching), captions from the
    text-encoder cache, `diffusion_loss`."""

    name = "ours"

    def _prepare_caches(self, training_set: object) -> dict | None:
        self.text_cache = None
        latents = None
        if self.config.cache_latents:
            latents = cache_latents(
                self.family,
                training_set,
                self.accelerator,
                to_disk=False,
                cache_dir=None,
                batch_size=self.config.batch_size,
            )
        if self.config.cache_text_encoder_outputs:
            self.text_cache = cache_text_encoder_outputs(
                self.family, training_set, self.device, self.config.batch_size
            )
        return latents

    def _loss(self, batch: dict, clock: PhaseClock) -> torch.Tensor:
        latents, cond = batch_inputs(self.family, batch, self.text_cache, self.device)
        clock.mark("encode")
        weights = batch["loss_weights"].to(self.device)
        return diffusion_loss(self.family, latents, cond, self.settings, weights)


class ReferenceLoop(BenchLoop):
    """diffusers' step: VAE and text encoder on every batch, plain MSE."""

    name = "reference"

    def _loss(self, batch: dict, clock: PhaseClock) -> torch.Tensor:
        latents, hidden = encode_reference_batch(
            self.family, batch["pixel_values"], batch["captions"], self.device
        )
        clock.mark("encode")
        return reference_loss(self.family, latents, hidden)
