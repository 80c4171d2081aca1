"""`train()`: the whole run, readable top to bottom.

Order matters for the user: the config, the dataset, the base model (its headers and configs), output_dir
(writable, not in use) and the state to resume from are checked before any model loads and before anything is
written, so a mistake costs seconds and leaves no half-made output folder; then output_dir is locked
(training/run_lock.py) and only then is an earlier run moved aside (`overwrite`).

A run never loses its work: every `save_steps` it saves a LoRA file and the full training state
(training/state.py); Ctrl-C or SIGTERM finish the step and save both (training/interrupt.py); `resume`
continues from a state exactly, bit for bit on the same machine; a NaN loss stops the run, or rolls it back to
the last state, at the step it appears (training/nan_guard.py).

Other programs (the GUI) watch a run through `<output_dir>/progress.jsonl`, which the loop appends to as it
goes, and stop it with `<output_dir>/STOP` as Ctrl-C would (training/progress_file.py).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.data_loader import skip_first_batches
from accelerate.utils import set_seed
from tqdm.auto import tqdm

from lora_scripts.checks import check_before_training
from lora_scripts.config import TrainConfig, dump_config
from lora_scripts.data.dataset import EpochBatchSampler
from lora_scripts.data.text_cache import TextEncoderCache
from lora_scripts.data.training_set import TrainingSet
from lora_scripts.errors import UserError
from lora_scripts.models.family import ModelFamily
from lora_scripts.models.registry import load_family
from lora_scripts.training.caching import cache_latents, cache_text_encoder_outputs
from lora_scripts.training.checkpoints import Checkpoints, validate
from lora_scripts.training.failures import explain_failure
from lora_scripts.training.interrupt import FaultInjection, stop_on_signals
from lora_scripts.training.loss_log import PendingLosses, read_losses
from lora_scripts.training.nan_guard import NanGuard
from lora_scripts.training.noise import training_noise_schedule
from lora_scripts.training.output_dir import STATE_FOLDER, prepare_output_dir
from lora_scripts.training.progress_file import EndStatus, ProgressFile, StopFile
from lora_scripts.training.run_info import run_metadata
from lora_scripts.training.run_lock import output_dir_lock
from lora_scripts.training.sampling import TrainingSampler
from lora_scripts.training.saving import SAVE_DTYPES, LoraSaver, step_file_name
from lora_scripts.training.setup import (
    attach_lora,
    compiled_denoiser,
    flux_load,
    loss_settings,
    make_accelerator,
    make_dataloader,
    make_optimization,
    place_denoiser,
    speed_switches,
)
from lora_scripts.training.state import (
    Progress,
    StateStore,
    TrainingParts,
    check_resume,
    data_fingerprint,
    resume_state,
)
from lora_scripts.training.step import diffusion_loss
from lora_scripts.training.tensorboard import start_tensorboard, trackers_closed_on_error
from lora_scripts.training.validation import validator_for

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainResult:
    global_step: int
    epochs_run: int
    final_files: list[Path]
    step_files: list[Path]
    last_loss: float
    is_main_process: bool
    stopped_by: str | None = None  # "SIGINT" / "SIGTERM" when a signal stopped the run before its end
    state_dir: Path | None = None  # the training state saved when it stopped (None: save_state is off)


def train(config: TrainConfig, *, config_path: str | Path | None = None) -> TrainResult:
    """Train a LoRA as `config` says and write its files under `config.output_dir`. `config_path`, the file
    `config` was read from, goes into the progress file's start event (for a program that resumes the run)."""
    if os.environ.get("RANK", "0") != "0":  # launched as a second process: one copy of each message is enough
        logging.getLogger("lora_scripts").setLevel(logging.WARNING)
    # The data, the base model (headers and configs) and output_dir: check's UserError, nothing written.
    training_set = check_before_training(config, base_model=True)
    resume_from = resume_state(config)
    accelerator = make_accelerator(config)
    if resume_from is not None:  # a config that cannot continue the run stops here, before any model loads
        check_resume(resume_from, config, training_set, accelerator.num_processes)
    sampler = TrainingSampler(config, accelerator)  # reads the sample prompts: a bad file stops here too
    # One run at a time in output_dir: locked before anything is written there (overwrite's move included),
    # unlocked however the run ends. Only the main process writes there, so only it takes the lock.
    with output_dir_lock(config.output_dir, enabled=accelerator.is_main_process):
        if accelerator.is_main_process:
            prepare_output_dir(
                config.output_dir,
                overwrite=config.overwrite,
                resuming=resume_from is not None,
                resume_requested=config.resume is not None,
            )
        accelerator.wait_for_everyone()
        is_main = accelerator.is_main_process
        stop_file = StopFile(config.output_dir) if is_main else None
        if stop_file is not None:
            stop_file.remove(stale=True)  # no run held the lock: a killed run's request, not this one's
        report = ProgressFile(config.output_dir, enabled=is_main, config_path=config_path)
        try:
            return _train_in(config, accelerator, training_set, resume_from, sampler, report, stop_file)
        except BaseException as exc:
            # A new run that dies while loading leaves no folder behind; a resume's or a started run's
            # progress file says how it ended.
            if report.path.is_file():
                report.end(*_end_of_error(exc, config))
            raise
        finally:
            if stop_file is not None:
                stop_file.remove()  # or a resume would stop at once


def _end_of_error(exc: BaseException, config: TrainConfig) -> tuple[EndStatus, str]:
    """The progress file's end event for a run ended by `exc`: a stop (Ctrl-C before the handlers, or a
    second one) or a failure, in the sentence the CLI shows for it where there is one."""
    if isinstance(exc, KeyboardInterrupt):
        return "stopped", "interrupted at once (Ctrl-C); the files and states saved before are intact"
    if isinstance(exc, UserError):
        return "failed", " ".join(exc.messages)
    explained = explain_failure(exc, output_dir=config.output_dir, config=config)
    return "failed", " ".join(explained.messages) if explained else f"{type(exc).__name__}: {exc}"


def _train_in(
    config: TrainConfig,
    accelerator: Accelerator,
    training_set: TrainingSet,
    resume_from: Path | None,
    sampler: TrainingSampler,
    report: ProgressFile,
    stop_file: StopFile | None,
) -> TrainResult:
    """The run itself, from loading the model on, in a checked, prepared and locked output_dir; its events
    go to `report`, and `stop_file` (main process) stops it as Ctrl-C does."""
    set_seed(config.seed)
    family = load_family(
        config.base_model,
        config_dir=config.base_model_config,
        v_parameterization=config.v_parameterization,
        clip_skip=config.clip_skip,
        max_token_length=config.max_token_length,
        flux=flux_load(config),
    )
    if family.noise_scheduler is not None:  # a DDPM family (FLUX.1 trains by rectified flow)
        family.noise_scheduler = training_noise_schedule(family, config.zero_terminal_snr)
    networks = attach_lora(family, config, accelerator)
    speed_switches(family, accelerator.device)
    # Encodes its images now, while the VAE and text encoder are still on the device (caching may move them).
    validator = validator_for(config, family, training_set, accelerator.device)
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
        sampler.encode_ahead(family)  # a family whose sampling can do without its text encoders
        text_cache = cache_text_encoder_outputs(
            family,
            training_set,
            accelerator.device,
            config.batch_size,
            offload=not sampler.needs_text_encoders,
        )
    place_denoiser(family, config.blocks_to_swap, accelerator)  # once the caches' encoders are off the device
    dataloader = make_dataloader(training_set, config, latents)
    epoch_sampler = dataloader.batch_sampler  # ours, before accelerate wraps it: resume sets its epoch

    optimizer, plan, lr_scheduler = make_optimization(config, family, training_set, dataloader, accelerator)
    unet = family.denoiser
    trained = [unet] + family.trained_text_encoders
    # The denoiser is placed already (place_denoiser): with swapped blocks, accelerate would move them too.
    placement = [config.blocks_to_swap == 0] + [True] * (len(trained) + 2)
    *prepared, optimizer, dataloader, lr_scheduler = accelerator.prepare(
        *trained, optimizer, dataloader, lr_scheduler, device_placement=placement
    )
    # DDP syncs gradients only when the wrapped module is the one called.
    family.use_wrapped(compiled_denoiser(prepared[0], config.torch_compile, accelerator.device), prepared[1:])
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
    fault = FaultInjection.from_env()
    store = StateStore(
        config.output_dir / STATE_FOLDER,
        TrainingParts(networks, optimizer, lr_scheduler, accelerator.scaler, validator),
        keep=config.save_last_n_states,
        accelerator=accelerator,
        config=config,
        data=data_fingerprint(training_set),
        fault=fault.during_save if fault else None,
    )
    progress = Progress()
    if resume_from is not None:
        # LoRA, optimizer, schedule, scaler and RNGs: after everything above that draws random numbers.
        progress = store.load(resume_from)
        log.info(
            "Resuming from %s: step %d of %d, epoch %d (%d of its batches done)",
            resume_from,
            progress.global_step,
            plan.max_train_steps,
            progress.epoch,
            progress.batches_in_epoch,
        )
    if accelerator.is_main_process:
        config.output_dir.mkdir(parents=True, exist_ok=True)
        dump_config(config, config.output_dir / "config.yaml")
        start_tensorboard(accelerator, config, progress.global_step if resume_from else None)
    report.start(
        total_steps=plan.max_train_steps,
        epochs=plan.num_epochs,
        resumed_from=progress.global_step if resume_from is not None else None,
    )
    if resume_from is None:
        report.sampled(0, sampler.at_start(family))
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
    guard = NanGuard.from_config(config)
    checkpoints = Checkpoints(
        saver, store, accelerator, config.save_state or config.nan_policy == "rollback", progress_file=report
    )
    if resume_from is not None:
        checkpoints.note_existing(
            config.output_dir / step_file_name(config.output_name, progress.global_step)
        )
    if config.nan_policy == "rollback" and store.latest() is None:
        # So that a NaN before the first save_steps has a state to go back to.
        report.saved(progress.global_step, store.save(progress), "state")

    losses = PendingLosses(accelerator)
    micro_losses: list[torch.Tensor] = []  # losses of the micro-batches of the current update
    stopped_by: str | None = None
    stopped_early = False  # early stopping: the final files are still written
    bar = tqdm(
        total=plan.max_train_steps,
        initial=progress.global_step,
        desc="training",
        unit="step",
        disable=not accelerator.is_main_process,
    )
    clipped = [p for group in optimizer.param_groups for p in group["params"]]
    for module in prepared:
        module.train()
    del module  # the loop's name would keep a DDP wrapper alive past the end of the run (see below)
    with stop_on_signals(stop_file) as stop, trackers_closed_on_error(accelerator):
        while progress.global_step < plan.max_train_steps and stopped_by is None and not stopped_early:
            rolled_back = False
            for batch in epoch_batches(dataloader, epoch_sampler, progress):
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
                progress.global_step += 1
                step = progress.global_step
                losses.add(step, torch.stack(micro_losses).mean(), lrs)  # stays on the device: no sync
                micro_losses.clear()
                bar.update(1)
                is_last = step >= plan.max_train_steps
                save_due = bool(config.save_steps) and step % config.save_steps == 0
                validation_due = validator is not None and validator.due(step, is_last=is_last)
                # The NaN guard runs before anything after a bad step is saved, sampled or measured.
                if (
                    step % config.logging_steps == 0
                    or is_last
                    or save_due
                    or validation_due
                    or (sampler.every_n_steps and step % sampler.every_n_steps == 0)
                ):
                    restored = read_losses(losses, guard, store, checkpoints, bar, progress, report)
                    if restored is not None:
                        progress, rolled_back = restored, True
                        break
                if save_due:
                    checkpoints.save(progress)
                report.sampled(step, sampler.after_step(family, step))
                if validation_due:
                    outcome = validate(validator, family, saver, accelerator, progress, report)
                    if outcome.should_stop:
                        stopped_early = True
                        break
                if fault is not None:
                    fault.after_step(step)
                if step >= plan.max_train_steps:
                    break
                if stop.agreed(accelerator):  # after every step on every process (a collective)
                    stopped_by = stop.signal_name or "a signal to another process"
                    restored = read_losses(losses, guard, store, checkpoints, bar, progress, report)
                    if restored is not None:  # the NaN guard first; then go on from the restored state
                        progress, rolled_back, stopped_by = restored, True, None
                        break
                    checkpoints.save(progress)  # does nothing when this step was just saved
                    break
            if not rolled_back and stopped_by is None and not stopped_early:
                if sampler.every_n_epochs and progress.epoch % sampler.every_n_epochs == 0:
                    restored = read_losses(losses, guard, store, checkpoints, bar, progress, report)
                    if restored is not None:  # no samples of a broken LoRA
                        progress = restored
                        continue
                report.sampled(
                    progress.global_step, sampler.after_epoch(family, progress.global_step, progress.epoch)
                )
    bar.close()

    accelerator.wait_for_everyone()
    final_files: list[Path] = []
    # A stopped run is reported by the caller (the CLI prints the step, the LoRA file and how to resume).
    if stopped_by is None and accelerator.is_main_process:
        final_files = saver.save_final(progress.global_step, progress.epoch)
        log.info("Saved %s", ", ".join(str(p) for p in final_files))
        for path in final_files:
            report.saved(progress.global_step, path, "lora")
    # DDP's wrappers go before the process group does. Freed after it, a wrapper's Reducer drops the group's
    # last reference while holding the GIL, and gloo's destructor waits for a worker thread that needs the GIL
    # to free a collective's tensors: the process hangs at the end of the run (torch issue #56297). Freed
    # here, the group's last reference goes with destroy_process_group, which releases the GIL.
    family.use_wrapped(unet, trained[1:])
    prepared.clear()
    accelerator.free_memory()
    accelerator.end_training()
    report.end(*_end_of_run(progress.global_step, stopped_by, stopped_early, checkpoints.last_state))
    return TrainResult(
        progress.global_step,
        progress.epoch,
        final_files,
        checkpoints.files,
        losses.last_value,
        accelerator.is_main_process,
        stopped_by=stopped_by,
        state_dir=checkpoints.last_state if stopped_by else None,
    )


def _end_of_run(
    step: int, stopped_by: str | None, stopped_early: bool, state_dir: Path | None
) -> tuple[EndStatus, str, int]:
    """The progress file's end event for a run that ended without an error: (status, message, step)."""
    if stopped_by is None:
        early = " (stopped early: the validation loss stopped improving)" if stopped_early else ""
        return "finished", f"done at step {step}{early}", step
    saved = f"training state {state_dir}" if state_dir else "no training state (save_state: false)"
    return "stopped", f"stopped at step {step} by {stopped_by}; {saved}", step


def epoch_batches(
    dataloader: torch.utils.data.DataLoader, epoch_sampler: EpochBatchSampler, progress: Progress
) -> Iterator[dict]:
    """The batches left in the epoch under way, or in the next one when it is done; counts each one it
    hands out in `progress` (epoch, batches_in_epoch).

    An epoch's batch order is a function of (seed, epoch) and each sample's augmentation of (seed, epoch,
    index) (data/dataset.py), so a resumed run sets the epoch and skips the batches already trained on;
    accelerate's `skip_first_batches` skips them in the batch sampler, without loading their images.
    """
    if progress.batches_in_epoch == 0 or progress.batches_in_epoch >= len(dataloader):
        progress.epoch += 1
        progress.batches_in_epoch = 0
    loader = dataloader
    if progress.batches_in_epoch:
        loader = skip_first_batches(dataloader, progress.batches_in_epoch)
    loader.set_epoch(progress.epoch - 1)  # accelerate's count, which it passes on to the sampler...
    epoch_sampler.set_epoch(progress.epoch - 1)  # ...except through skip_first_batches' or a shard's
    for batch in loader:
        progress.batches_in_epoch += 1
        yield batch


def batch_inputs(
    family: ModelFamily, batch: dict, text_cache: TextEncoderCache | None, device: torch.device
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Scaled latents (from cached moments or encoded now) and the conditioning of a batch."""
    moments = batch["moments"] if "moments" in batch else family.encode_images(batch["pixel_values"])
    latents = family.sample_latents(moments.to(device))
    if text_cache is not None:
        cond = text_cache.batch(batch["captions"], device)
    else:
        cond = family.encode_prompts(batch["captions"], device)
    return latents, cond | family.image_conditioning(batch["size_conditioning"].to(device))
