"""The run's derived numbers (steps, epochs), computed once from the config and the dataset size.

Kept apart from the config, which is never mutated during training.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from lora_scripts.training.optim import warmup_steps


@dataclass(frozen=True)
class TrainingPlan:
    """Counts for one run. A "step" is one optimizer update (after gradient accumulation)."""

    num_images: int
    batches_per_epoch: int  # per process, partial last batch included
    steps_per_epoch: int
    num_epochs: int
    max_train_steps: int
    warmup_steps: int = 0  # lr_warmup_steps resolved to steps (it may be a fraction of the run)

    @classmethod
    def compute(
        cls,
        *,
        num_images: int,
        batches_per_epoch: int,
        gradient_accumulation_steps: int,
        epochs: int,
        max_train_steps: int | None,
        lr_warmup_steps: int | float = 0,
    ) -> TrainingPlan:
        steps_per_epoch = math.ceil(batches_per_epoch / gradient_accumulation_steps)
        if max_train_steps is None:
            total = steps_per_epoch * epochs
            num_epochs = epochs
        else:
            total = max_train_steps
            num_epochs = math.ceil(max_train_steps / steps_per_epoch)
        warmup = warmup_steps(lr_warmup_steps, total)  # a float is a fraction of the run
        return cls(num_images, batches_per_epoch, steps_per_epoch, num_epochs, total, warmup)
