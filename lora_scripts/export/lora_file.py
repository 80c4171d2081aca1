"""Write one LoRA .safetensors file (atomically) and read one back."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import safetensors.torch
import torch

from lora_scripts.export.atomic import write_atomic
from lora_scripts.export.metadata import RunMetadata, file_metadata


def save_lora_file(
    path: Path,
    tensors: dict[str, torch.Tensor],
    run: RunMetadata,
    *,
    output_name: str,
    steps: int,
    epoch: int,
    extra: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """Save `tensors` with full metadata (plus `extra` ss_* keys) to `path` (temp file + rename); returns the
    metadata written."""
    meta = file_metadata(run, tensors, output_name=output_name, steps=steps, epoch=epoch, extra=extra)
    write_atomic(path, lambda tmp: safetensors.torch.save_file(tensors, str(tmp), metadata=meta))
    return meta


def read_lora_metadata(path: Path) -> dict[str, str]:
    """The string metadata of a safetensors file."""
    with safetensors.safe_open(str(path), framework="pt") as fh:
        return dict(fh.metadata() or {})
