"""Which torch device to run on: the user's choice checked against this machine, or the best one there."""

from __future__ import annotations

import torch

from lora_scripts.errors import UserError


def pick_device(requested: str | None) -> torch.device:
    """`requested` ("cuda", "cuda:1", "mps", "cpu") checked against this machine; None picks the best."""
    if requested is None:
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(requested)
    except (RuntimeError, ValueError) as exc:
        raise UserError(f"--device: '{requested}' is not a device; use cuda, cuda:N, mps or cpu.") from exc
    available = {
        "cpu": True,
        "cuda": torch.cuda.is_available(),
        "mps": torch.backends.mps.is_available(),
    }.get(device.type, False)
    if not available:
        raise UserError(
            f"--device: '{requested}' is not available on this machine; use cpu or leave --device out."
        )
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UserError(
            f"--device: '{requested}' does not exist (this machine has {torch.cuda.device_count()} CUDA "
            "devices, numbered from 0)."
        )
    return device
