"""The two training loops the benchmark times, built from the real training code.

`OurLoop` is `train()`'s step (training/loop.py) with its setup (training/setup.py, training/caching.py):
the device switches, cached latents and text-encoder outputs by default, the VAE and text encoder offloaded,
the loss kept on the device and logged every `logging_steps`. `ReferenceLoop` is the same model, LoRA, data,
batch, precision, optimizer and schedule, stepping like diffusers' train_text_to_image_lora.py
(bench/reference.py), with its per-step bookkeeping: the loss gathered and read (`.item()`) before the
backward, logged to TensorBoard every step and read again for the progress bar. Both loops log to TensorBoard
and update a progress bar (drawn to os.devnull: the work is done, the bench's output stays clean), and both
mark their phases on a `PhaseClock`.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from accelerate.utils import set_seed
from tqdm.auto import tqdm

from lora_scripts.bench.measure import PhaseClock
from lora_scripts.bench.reference import encode_reference_batch, reference_loss
from lora_scripts.bench.workspace import load_bench_family
from lora_scripts.checks import check_before_training
from lora_scripts.config import TrainConfig
from lora_scripts.training.caching import cache_latents, cache_text_encoder_outputs
from lora_scripts.training.loop import batch_inputs
from lora_scripts.training.loss_log import PendingLosses, log_loss
from lora_scripts.training.setup import (
    attach_lora,
    compiled_denoiser,
    loss_settings,
    make_accelerator,
    make_dataloader,
    make_optimization,
    place_denoiser,
    speed_switches,
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
    """A model with LoRA, its optimizer and data, ready to step. Subclasses differ in setup (`_speed_up`,
    `_compiled`, `_prepare_caches`), in `_loss` and in their bookkeeping (`_after_step`)."""

    name = ""
    # TF32 for matmuls and convolutions, process-wide switches: torch's defaults unless `_speed_up` sets them
    # (diffusers' script leaves them unless --allow_tf32), applied around each of the loop's steps.
    tf32 = (False, True)

    def __init__(self, config: TrainConfig, base_model: str):
        self.config = config
        training_set = check_before_training(config)
        self.accelerator = make_accelerator(config)
        self.device = self.accelerator.device
        set_seed(config.seed)
        self.family = load_bench_family(base_model)
        attach_lora(self.family, config, self.accelerator)
        self._speed_up()
        latents = self._prepare_caches(training_set)
        place_denoiser(self.family, config.blocks_to_swap, self.accelerator)
        dataloader = make_dataloader(training_set, config, latents)
        epoch_sampler = dataloader.batch_sampler
        optimizer, _, lr_scheduler = make_optimization(
            config, self.family, training_set, dataloader, self.accelerator
        )
        unet, self.optimizer, dataloader, self.lr_scheduler = self.accelerator.prepare(
            self.family.denoiser, optimizer, dataloader, lr_scheduler
        )
        self.eager_unet = unet
        unet = self._compiled(unet)
        self.family.use_wrapped(unet, [])
        self.unet = unet
        self.batches = endless_batches(dataloader, epoch_sampler)
        self.params = [p for group in self.optimizer.param_groups for p in group["params"]]
        self.settings = loss_settings(config)
        self.global_step = 0
        self.accelerator.init_trackers(f"bench_{self.name}")
        self._devnull = open(os.devnull, "w", encoding="utf-8")  # noqa: SIM115 (closed by close())
        self.bar = tqdm(desc=self.name, unit="step", file=self._devnull)
        unet.train()

    @contextmanager
    def eager(self) -> Iterator[None]:
        """Step with the uncompiled UNet (same parameters): what the FLOP counter's step needs, since a
        TorchDispatchMode around a compiled module's first call can leave it running eagerly for good."""
        self.family.use_wrapped(self.eager_unet, [])
        try:
            yield
        finally:
            self.family.use_wrapped(self.unet, [])

    @contextmanager
    def backend_flags(self) -> Iterator[None]:
        """This loop's TF32 switches while it steps (both loops live in one process), the old ones after."""
        old = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = self.tf32
        try:
            yield
        finally:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old

    def close(self) -> None:
        """End the TensorBoard run and the progress bar."""
        self.bar.close()
        self._devnull.close()
        self.accelerator.end_training()

    def _speed_up(self) -> None:
        """train()'s device switches (TF32, channels_last, ...); the reference has none."""

    def _compiled(self, unet: torch.nn.Module) -> torch.nn.Module:
        return unet

    def _prepare_caches(self, training_set: object) -> dict | None:
        return None

    def _loss(self, batch: dict, clock: PhaseClock) -> torch.Tensor:
        raise NotImplementedError

    def _after_step(self, loss: torch.Tensor, lrs: list[float], synced: bool) -> None:
        """The loop's bookkeeping after a batch (`synced`: an optimizer update was made)."""
        raise NotImplementedError

    def step(self, clock: PhaseClock) -> torch.Tensor:
        """One optimizer step, its phases marked on `clock`; returns the detached loss (a device tensor)."""
        with self.backend_flags():
            return self._step(clock)

    def _step(self, clock: PhaseClock) -> torch.Tensor:
        batch = next(self.batches)
        clock.mark("data")
        with self.accelerator.accumulate(self.unet):
            loss = self._loss(batch, clock)
            clock.mark("forward")
            self.accelerator.backward(loss)
            clock.mark("backward")
            if self.accelerator.sync_gradients and self.config.max_grad_norm > 0:
                self.accelerator.clip_grad_norm_(self.params, self.config.max_grad_norm)
            lrs = self.lr_scheduler.get_last_lr()
            self.optimizer.step()
            self.lr_scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
        synced = self.accelerator.sync_gradients  # False for the micro-batches of an accumulated update
        self.global_step += synced
        self._after_step(loss, lrs, synced)
        clock.mark("optimizer")
        return loss.detach()


class OurLoop(BenchLoop):
    """train()'s step: latents from the cache (or encoded now without caching), captions from the
    text-encoder cache, `diffusion_loss`."""

    name = "ours"

    def __init__(self, config: TrainConfig, base_model: str):
        super().__init__(config, base_model)
        self.pending = PendingLosses(self.accelerator)

    def _speed_up(self) -> None:
        speed_switches(self.family, self.device)
        self.tf32 = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)

    def _compiled(self, unet: torch.nn.Module) -> torch.nn.Module:
        return compiled_denoiser(unet, self.config.torch_compile, self.device)

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

    def _after_step(self, loss: torch.Tensor, lrs: list[float], synced: bool) -> None:
        """train()'s: after an update the loss stays on the device; every `logging_steps` they are read
        together and logged (the NaN guard also looks at them there; it costs nothing unless a loss is not
        finite)."""
        if not synced:
            return
        self.pending.add(self.global_step, loss, lrs)
        self.bar.update(1)
        if self.global_step % self.config.logging_steps == 0:
            for step, value, step_lrs in self.pending.read():
                log_loss(self.accelerator, self.bar, step, value, step_lrs, epoch=0)


class ReferenceLoop(BenchLoop):
    """diffusers' step: VAE and text encoder on every batch, plain MSE, and its per-step bookkeeping."""

    name = "reference"
    train_loss = 0.0

    def _loss(self, batch: dict, clock: PhaseClock) -> torch.Tensor:
        latents, hidden = encode_reference_batch(
            self.family, batch["pixel_values"], batch["captions"], self.device
        )
        clock.mark("encode")
        loss = reference_loss(self.family, latents, hidden)
        # diffusers: "Gather the losses across all processes for logging", read before the backward (on a
        # GPU this waits for the forward to finish before the backward is queued).
        avg_loss = self.accelerator.gather(loss.repeat(self.config.batch_size)).mean()
        self.train_loss += avg_loss.item() / self.config.gradient_accumulation_steps
        return loss

    def _after_step(self, loss: torch.Tensor, lrs: list[float], synced: bool) -> None:
        """diffusers: the bar and a TensorBoard point every update, and the loss read again for the bar
        after every batch."""
        if synced:
            self.bar.update(1)
            self.accelerator.log({"train_loss": self.train_loss}, step=self.global_step)
            self.train_loss = 0.0
        self.bar.set_postfix(step_loss=loss.detach().item(), lr=self.lr_scheduler.get_last_lr()[0])
