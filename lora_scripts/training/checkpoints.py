"""Saving during training: a step (its LoRA file and training state), the best validation checkpoint; and
rolling back to a saved state."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from accelerate import Accelerator

from lora_scripts.models.family import ModelFamily
from lora_scripts.training.nan_guard import MAX_ROLLBACKS, NanGuard
from lora_scripts.training.progress_file import ProgressFile
from lora_scripts.training.saving import LoraSaver
from lora_scripts.training.state import Progress, StateStore
from lora_scripts.training.tensorboard import purge_after, tensorboard_writer
from lora_scripts.training.validation import ValidationOutcome, Validator

log = logging.getLogger(__name__)


@dataclass
class Checkpoints:
    """Saves a step: its LoRA file (main process) and, when the run keeps them, its training state; each
    reported to the progress file."""

    saver: LoraSaver
    store: StateStore
    accelerator: Accelerator
    keep_states: bool
    files: list[Path] = field(default_factory=list)  # LoRA step files written by this run, oldest first
    last_file: Path | None = None  # the newest LoRA step file, of this run or the one it resumed
    last_state: Path | None = None
    last_step: int | None = None
    progress_file: ProgressFile | None = None

    def note_existing(self, path: Path) -> None:
        if path.is_file():
            self.last_file = path

    def save(self, progress: Progress) -> None:
        if progress.global_step == self.last_step:
            return
        self.last_step = progress.global_step
        if self.accelerator.is_main_process:
            self.last_file = self.saver.save_step(progress.global_step, progress.epoch)
            self.files.append(self.last_file)
            self._report(progress.global_step, self.last_file, "lora")
        # TensorBoard's points up to here reach the disk before the state exists, so a run killed later and
        # resumed from this state has each step's point once (the resume purges the ones after).
        writer = tensorboard_writer(self.accelerator)
        if writer is not None:
            writer.flush()
        if self.keep_states:
            self.last_state = self.store.save(progress)
            self._report(progress.global_step, self.last_state, "state")

    def _report(self, step: int, path: Path, kind: Literal["lora", "state"]) -> None:
        if self.progress_file is not None:
            self.progress_file.saved(step, path, kind)


def roll_back(
    store: StateStore, progress: Progress, guard: NanGuard, accelerator: Accelerator, loss: float, step: int
) -> Progress:
    """Go back to the newest saved state with half the learning rate; drop TensorBoard's points after it."""
    folder = store.latest()
    assert folder is not None  # the guard allows a rollback only when there is a state
    restored = store.load(folder, lr_scale=progress.lr_scale * 0.5)
    store.parts.optimizer.zero_grad(set_to_none=True)
    log.warning(
        "The loss was %s at step %d: back to the state of step %d (%s) with the learning rate at %g x the "
        "configured one (rollback %d of %d)",
        loss,
        step,
        restored.global_step,
        folder,
        restored.lr_scale,
        guard.rollbacks,
        MAX_ROLLBACKS,
    )
    purge_after(accelerator, restored.global_step)  # the replayed steps are not shown twice
    return restored


def validate(
    validator: Validator,
    family: ModelFamily,
    saver: LoraSaver,
    accelerator: Accelerator,
    progress: Progress,
    progress_file: ProgressFile | None = None,
) -> ValidationOutcome:
    """Measure the validation loss (every process: the denoiser may be DDP-wrapped), log it, keep the best
    LoRA as `<output_name>-best.safetensors` (reported to `progress_file`), and say whether to stop early."""
    step = progress.global_step
    outcome = validator.record(step, validator.loss(family))
    accelerator.log({"validation_loss": outcome.loss}, step=step)
    if outcome.improved and accelerator.is_main_process:
        path = saver.save_best(step, progress.epoch, outcome.loss)
        if progress_file is not None:
            progress_file.saved(step, path, "lora")
        log.info("Validation loss %.5f at step %d: the best so far, saved as %s", outcome.loss, step, path)
    elif not outcome.improved:
        log.info(
            "Validation loss %.5f at step %d (best %.5f at step %d, %d without improvement)",
            outcome.loss,
            step,
            outcome.best_loss,
            outcome.best_step,
            outcome.since_best,
        )
    if outcome.should_stop:
        log.info(
            "Stopping early at step %d: no better validation loss in %d measurements",
            step,
            outcome.since_best,
        )
    return outcome
