"""Optimizer and learning-rate schedule."""

from __future__ import annotations

import torch
from diffusers.optimization import get_scheduler
from torch import nn


def trainable_parameters(module: nn.Module) -> list[nn.Parameter]:
    return [p for p in module.parameters() if p.requires_grad]


def build_optimizer(
    param_groups: list[tuple[list[nn.Parameter], float]], *, weight_decay: float
) -> torch.optim.Optimizer:
    """AdamW over (params, lr) groups; groups with no parameters are dropped."""
    groups = [{"params": params, "lr": lr} for params, lr in param_groups if params]
    return torch.optim.AdamW(groups, weight_decay=weight_decay)


def build_lr_scheduler(
    name: str, optimizer: torch.optim.Optimizer, *, warmup_steps: int, total_steps: int, num_processes: int
):
    # accelerate steps a prepared scheduler once per process per update: scale as diffusers does.
    return get_scheduler(
        name,
        optimizer=optimizer,
        num_warmup_steps=warmup_steps * num_processes,
        num_training_steps=total_steps * num_processes,
    )
