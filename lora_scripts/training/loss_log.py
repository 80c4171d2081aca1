"""The training loss on its way to the log: kept on the device each step, read every `logging_steps`, checked
for NaN at the step it appeared (training/nan_guard.py), logged to TensorBoard and the progress file
(training/progress_file.py) each at its own step."""

from __future__ import annotations

import math

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

from lora_scripts.training.checkpoints import Checkpoints, roll_back
from lora_scripts.training.nan_guard import NanGuard
from lora_scripts.training.progress_file import ProgressFile
from lora_scripts.training.state import Progress, StateStore


class PendingLosses:
    """The loss of each optimizer step, kept on the device until the loop reads it: reading waits for the
    GPU to finish its queued work, so the loop reads them together every `logging_steps` (one `.tolist()`).

    Under several processes every step's loss is the mean over them (a collective: every process reads at
    the same steps)."""

    def __init__(self, accelerator: Accelerator) -> None:
        self.accelerator = accelerator
        self.steps: list[int] = []
        self.losses: list[torch.Tensor] = []  # 0-d float tensors on the device
        self.lrs: list[list[float]] = []  # the rates each step used: UNet, then text encoder
        self.last_value = float("nan")  # the newest finite loss read

    def add(self, step: int, loss: torch.Tensor, lrs: list[float]) -> None:
        self.steps.append(step)
        self.losses.append(loss.detach())
        self.lrs.append(list(lrs))

    def read(self) -> list[tuple[int, float, list[float]]]:
        """(step, loss, lrs) of every pending step, oldest first; empties the list."""
        if not self.steps:
            return []
        gathered = self.accelerator.gather(torch.stack(self.losses).float())  # (processes * steps,)
        values = gathered.reshape(-1, len(self.steps)).mean(dim=0).tolist()
        read = list(zip(self.steps, values, self.lrs, strict=True))
        self.steps, self.losses, self.lrs = [], [], []
        return read


def read_losses(
    losses: PendingLosses,
    guard: NanGuard,
    store: StateStore,
    checkpoints: Checkpoints,
    bar: tqdm,
    progress: Progress,
    progress_file: ProgressFile | None = None,
) -> Progress | None:
    """Log the pending losses (TensorBoard, each at its own step, and the progress file) up to the first
    non-finite one; at that one the NaN guard raises its stop error or rolls back: returns the restored
    progress, else None."""
    accelerator = checkpoints.accelerator
    logged: list[tuple[int, float, list[float]]] = []
    try:
        for step, value, lrs in losses.read():
            if not math.isfinite(value):  # every process sees the same gathered value
                # Raises the stop error, or counts a rollback and returns.
                guard.on_nonfinite(
                    value, step=step, lr=lrs[0], last_file=checkpoints.last_file, last_state=store.latest()
                )
                restored = roll_back(store, progress, guard, accelerator, value, step)
                bar.n = restored.global_step
                bar.refresh()
                return restored
            log_loss(accelerator, bar, step, value, lrs, progress.epoch)
            losses.last_value = value
            logged.append((step, value, lrs))
        return None
    finally:
        if progress_file is not None:  # one write for the lot, also of those before a NaN
            progress_file.steps(logged, progress.epoch)


def log_loss(
    accelerator: Accelerator, bar: tqdm, step: int, value: float, lrs: list[float], epoch: int
) -> None:
    """One read loss to TensorBoard (`loss`, `lr`, `lr_text_encoder`, SDXL's `lr_text_encoder_2` when both
    of its encoders train) and the progress bar."""
    scalars = {"loss": value, "lr": lrs[0]}
    if len(lrs) > 1:
        scalars["lr_text_encoder"] = lrs[1]
    if len(lrs) > 2:
        scalars["lr_text_encoder_2"] = lrs[2]
    accelerator.log(scalars, step=step)
    bar.set_postfix(loss=f"{value:.4f}", lr=f"{lrs[0]:.2e}", epoch=epoch)
