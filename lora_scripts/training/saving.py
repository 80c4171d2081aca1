"""Where and how LoRA files of a run are written."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from lora_scripts.export.kohya import LoraNetwork, kohya_state_dict
from lora_scripts.export.lora_file import save_lora_file
from lora_scripts.export.metadata import RunMetadata

SAVE_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
FINAL_DIFFUSERS_NAME = "pytorch_lora_weights.safetensors"
BEST_SUFFIX = "-best"  # <output_name>-best.safetensors: the lowest validation loss


def step_file_name(output_name: str, step: int) -> str:
    """sd-scripts' naming: `<name>-step00000100.safetensors` (8 digits)."""
    return f"{output_name}-step{step:08d}.safetensors"


@dataclass(frozen=True)
class LoraSaver:
    """Writes the run's LoRA files; each module's rank and alpha come from its peft layer (so LoCon convs
    carry conv_alpha), tensors in `dtype`."""

    output_dir: Path
    output_name: str
    networks: list[LoraNetwork]
    dtype: torch.dtype
    run: RunMetadata

    def save_step(self, step: int, epoch: int) -> Path:
        """A step file; its `ss_output_name` is its own stem so A1111 does not list duplicates."""
        path = self.output_dir / step_file_name(self.output_name, step)
        tensors = kohya_state_dict(self.networks, self.dtype)
        save_lora_file(path, tensors, self.run, output_name=path.stem, steps=step, epoch=epoch)
        return path

    def save_best(self, step: int, epoch: int, validation_loss: float) -> Path:
        """`<output_name>-best.safetensors`: the LoRA of the lowest validation loss so far (its step and loss
        in the metadata, `ss_steps` and `ss_validation_loss`)."""
        path = self.output_dir / f"{self.output_name}{BEST_SUFFIX}.safetensors"
        tensors = kohya_state_dict(self.networks, self.dtype)
        extra = {"ss_validation_loss": repr(float(validation_loss))}
        save_lora_file(path, tensors, self.run, output_name=path.stem, steps=step, epoch=epoch, extra=extra)
        return path

    def save_final(self, step: int, epoch: int) -> list[Path]:
        """`pytorch_lora_weights.safetensors` and `<output_name>.safetensors`: same tensors, both answering to
        `<lora:output_name:…>` in A1111 through `ss_output_name`."""
        tensors = kohya_state_dict(self.networks, self.dtype)
        paths = [self.output_dir / FINAL_DIFFUSERS_NAME, self.output_dir / f"{self.output_name}.safetensors"]
        for path in paths:
            save_lora_file(path, tensors, self.run, output_name=self.output_name, steps=step, epoch=epoch)
        return paths
