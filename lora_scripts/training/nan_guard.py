"""Catch a NaN or infinite loss at the step it appears, instead of hours later in a black LoRA.

The loop gathers the loss of every step anyway; when it is not finite it calls `NanGuard.on_nonfinite`
before anything of the step is logged or saved. `nan_policy: stop` (the default) raises a UserError naming
the step, the likely causes with this run's values, and the last good files. `nan_policy: rollback` lets the
loop go back to the newest saved state with half the learning rate, at most MAX_ROLLBACKS times; the next
NaN then stops as above.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from lora_scripts.config import TrainConfig
from lora_scripts.errors import UserError

log = logging.getLogger(__name__)

MAX_ROLLBACKS = 3


@dataclass
class NanGuard:
    """The policy and the settings a NaN message names. `rollbacks` counts the rollbacks made so far."""

    policy: str  # "stop" or "rollback"
    mixed_precision: str
    noise_offset: float | None
    min_snr_gamma: float | None
    multires_noise_iterations: int | None
    rollbacks: int = 0

    @classmethod
    def from_config(cls, config: TrainConfig) -> NanGuard:
        return cls(
            policy=config.nan_policy,
            mixed_precision=config.mixed_precision,
            noise_offset=config.noise_offset,
            min_snr_gamma=config.min_snr_gamma,
            multires_noise_iterations=config.multires_noise_iterations,
        )

    def on_nonfinite(
        self, loss: float, *, step: int, lr: float, last_file: Path | None, last_state: Path | None
    ) -> None:
        """The loss of `step` is not finite: returns when the loop may roll back to `last_state` (counting the
        rollback), else raises the stop UserError. `lr` is the learning rate step `step` used."""
        if self.policy == "rollback" and last_state is not None and self.rollbacks < MAX_ROLLBACKS:
            self.rollbacks += 1
            return
        raise UserError(
            self.stop_messages(loss, step=step, lr=lr, last_file=last_file, last_state=last_state)
        )

    def stop_messages(
        self, loss: float, *, step: int, lr: float, last_file: Path | None, last_state: Path | None
    ) -> list[str]:
        """What happened and what was kept; the likely causes with this run's values; what to do."""
        tried = (
            f" after {self.rollbacks} rollbacks with half the learning rate each" if self.rollbacks else ""
        )
        kept = f"the last good LoRA file is {last_file}" if last_file else "no LoRA file was saved before it"
        if last_state is not None:
            kept += f" and the last training state is {last_state}"
        causes = [f"learning_rate too high (this step used {lr:g}; try {lr / 2:g} or lower)"]
        if self.mixed_precision == "fp16":
            causes.append(
                "fp16 overflow (set mixed_precision: bf16 on a GPU that has it, or mixed_precision: no)"
            )
            causes.append("a VAE that breaks in fp16 (use an fp16-fixed VAE, or mixed_precision: bf16 or no)")
        if self.noise_offset:
            causes.append(f"noise_offset {self.noise_offset:g} (0.05 to 0.1 is usual)")
        if self.multires_noise_iterations:
            causes.append(f"multires_noise_iterations {self.multires_noise_iterations}")
        if self.min_snr_gamma is not None:
            causes.append(f"min_snr_gamma {self.min_snr_gamma:g} (5 is usual)")
        return [
            f"the loss became {loss} at step {step}{tried}; training stopped and nothing was saved after "
            f"it: {kept}.",
            "likely causes: " + "; ".join(causes) + ".",
            (
                "lower learning_rate and run again with resume: auto to continue from the last state, or set "
                "nan_policy: rollback to go back to it with half the learning rate automatically."
                if last_state is not None
                else "lower learning_rate and start again; save_state: true (the default) keeps states that "
                "resume: auto or nan_policy: rollback continue from."
            ),
        ]
