"""`train()`: the whole run, readable top to bottom.

Order matters for the user: the config and the dataset are checked before any model loads and before
anything is written, so a mistake costs seconds and leaves no half-made output folder.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate.utils import set_seed
from tqdm.auto import tqdm

from lora_scripts.checks import check_before_training
from lora_scripts.config import TrainConfig, dump_config
from lora_scripts.data.text_cache import TextEncoderCache
from lora_scripts.models.family import ModelFamily
from lora_scripts.models.registry import load_family
from lora_scripts.training.caching import cache_latents, cache_text_encoder_outputs
from lora_scripts.training.noise import zero_terminal_snr
from lora_scripts.training.run_info import run_metadata
from lora_scripts.training.sampling import TrainingSampler
from lora_scripts.training.saving import SAVE_DTYPES, LoraSaver
from lora_scripts.training.setup import (
    attach_lora,
    loss_settings,
    make_accelerator,
    make_dataloader,
    make_optimization,
)
from lora_scripts.training.step import diffusion_loss

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainResult:
    global_step: int
    epochs_run: int
    final_files: list[Path]
    step_files: list[Path]
    last_loss: float
    is_main_process: bool


def train(config: TrainConfig) -> TrainResult:
    """Train a LoRA as `config` says and write its files under `config.output_dir`."""
    if os.environ.get("RANK", "0") != "0":  # launched as a second process: one copy of each message is enough
        logging.getLogger("lora_scripts").setLevel(logging.WARNING)
    training_set = check_before_training(config)  # raises check's UserError, logs warnings, writes nothing
    accelerator = make_accelerator(config)
    sampler = TrainingSampler(config, accelerator)  # reads the sample prompts before any model loads
    set_seed(config.seed)
    family = load_family(
        config.base_model,
        config_dir=config.base_model_config,
        v_parameterization=config.v_parameterization,
        clip_skip=config.clip_skip,
    )
    if config.zero_terminal_snr:
        if family.info.prediction_type != "v_prediction":
            log.warning(
                "zero_terminal_snr on an epsilon-prediction model: sample images may look washed out."
            )
        family.noise_scheduler = zero_terminal_snr(family.noise_scheduler)
    networks = attach_lora(family, config, accelerator)
    latents = None
    if config.cache_latents:
        latents = cache_latents(
            family,
            training_set,
            accelerator,
            to_disk=config.cache_latents_to_disk,
            cache_dir=config.cache_dir,
            batch_size=config.batch_size,
            offload=not sampler.prompts,  # sample images need the VAE
        )
    text_cache = None
    if config.cache_text_encoder_outputs:
        text_cache = cache_text_encoder_outputs(
            family, training_set, accelerator.device, config.batch_size, offload=not sampler.prompts
        )
    dataloader = make_dataloader(training_set, config, latents)

    optimizer, plan, lr_scheduler = make_optimization(config, family, training_set, dataloader, accelerator)
    unet = family.denoiser
    trained = [unet] + (family.text_encoders if config.train_text_encoder else [])
    *prepared, optimizer, dataloader, lr_scheduler = accelerator.prepare(
        *trained, optimizer, dataloader, lr_scheduler
    )
    # DDP syncs gradients only when the wrapped module is the one called.
    family.use_wrapped(prepared[0], prepared[1:])
    optimizer_name = type(getattr(optimizer, "optimizer", optimizer))
    saver = LoraSaver(
        config.output_dir,
        config.output_name,
        networks,
        SAVE_DTYPES[config.save_precision],
        run_metadata(
            config, family, training_set, plan, f"{optimizer_name.__module__}.{optimizer_name.__name__}"
        ),
    )
    if accelerator.is_main_process:
        config.output_dir.mkdir(parents=True, exist_ok=True)
        dump_config(config, config.output_dir / "config.yaml")
        accelerator.init_trackers(config.output_name)
    sampler.at_start(family)
    log.info(
        "%d images (%d regularization), %d samples/epoch, %d batches/epoch per process, %d epochs, %d steps; "
        "effective batch size %d (batch_size %d x gradient_accumulation_steps %d x %d processes)",
        training_set.num_train_images,
        training_set.num_reg_images,
        len(training_set.samples),
        plan.batches_per_epoch,
        plan.num_epochs,
        plan.max_train_steps,
        config.batch_size * config.gradient_accumulation_steps * accelerator.num_processes,
        config.batch_size,
        config.gradient_accumulation_steps,
        accelerator.num_processes,
    )
    settings = loss_settings(config)

    global_step, epoch, loss_value = 0, 0, float("nan")
    micro_losses: list[torch.Tensor] = []  # losses of the micro-batches of the current update
    step_files: list[Path] = []
    progress = tqdm(
        total=plan.max_train_steps, desc="training", unit="step", disable=not accelerator.is_main_process
    )
    clipped = [p for group in optimizer.param_groups for p in group["params"]]
    for module in prepared:
        module.train()
    while global_step < plan.max_train_steps:
        epoch += 1
        for batch in dataloader:
            with accelerator.accumulate(*prepared):
                latents, cond = batch_inputs(family, batch, text_cache, accelerator.device)
                weights = batch["loss_weights"].to(accelerator.device)
                loss = diffusion_loss(family, latents, cond, settings, weights)
                accelerator.backward(loss)
                micro_losses.append(loss.detach())
                if accelerator.sync_gradients and config.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(clipped, config.max_grad_norm)
                lrs = lr_scheduler.get_last_lr()  # the rates this update uses: UNet, then text encoder
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            if not accelerator.sync_gradients:
                continue
            global_step += 1
            loss_value = accelerator.gather(torch.stack(micro_losses).mean()).mean().item()
            micro_losses.clear()
            scalars = {"loss": loss_value, "lr": lrs[0]}
            if len(lrs) > 1:
                scalars["lr_text_encoder"] = lrs[1]
            accelerator.log(scalars, step=global_step)
            progress.update(1)
            progress.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lrs[0]:.2e}", epoch=epoch)
            if config.save_steps and global_step % config.save_steps == 0 and accelerator.is_main_process:
                step_files.append(saver.save_step(global_step, epoch))
            sampler.after_step(family, global_step)
            if global_step >= plan.max_train_steps:
                break
        sampler.after_epoch(family, global_step, epoch)
    progress.close()

    accelerator.wait_for_everyone()
    final_files: list[Path] = []
    if accelerator.is_main_process:
        final_files = saver.save_final(global_step, epoch)
        log.info("Saved %s", ", ".join(str(p) for p in final_files))
    accelerator.end_training()
    return TrainResult(global_step, epoch, final_files, step_files, loss_value, accelerator.is_main_process)


def batch_inputs(
    family: ModelFamily, batch: dict, text_cache: TextEncoderCache | None, device: torch.device
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Scaled latents (from cached moments or encoded now) and the conditioning of a batch."""
    moments = batch["moments"] if "moments" in batch else family.encode_images(batch["pixel_values"])
    latents = family.sample_latents(moments.to(device))
    if text_cache is not None:
        return latents, text_cache.batch(batch["captions"], device)
    return latents, family.encode_prompts(batch["captions"], device)
