"""The `generate` command's options, and parsing them from text (no heavy imports: the CLI reads these)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from lora_scripts.errors import UserError

DeviceName = Literal["auto", "cpu", "cuda", "mps"]
Precision = Literal["auto", "fp32", "fp16", "bf16"]
MAX_SEED = 2**32 - 1  # WebUI's seed range; a random seed is drawn from it


@dataclass
class GenerateOptions:
    """The `generate` command's arguments (see `lora-scripts generate --help`)."""

    base_model: str
    prompt: str
    negative_prompt: str = ""
    lora_dirs: list[Path] = field(default_factory=list)
    steps: int = 30
    cfg_scale: float | None = None  # None: the family's (7; FLUX.1's guidance 3.5)
    seed: int = -1  # -1: random
    width: int | None = None  # None: the base model's native size (512 SD 1.x/2.x, 1024 SDXL)
    height: int | None = None
    sampler: str | None = None  # None: the family's (euler_a; FLUX.1: euler)
    num_images: int = 1
    lora_weights: list[float] | None = None  # one grid column per weight for the prompt's single LoRA
    output: Path = Path("renders")
    device: DeviceName = "auto"
    precision: Precision = "auto"
    attention_slicing: bool = False
    vae_slicing: bool = False
    vae_tiling: bool = False
    base_model_config: str | None = None
    vae: str | None = None  # FLUX.1 single files: the part files, as the training config's keys
    clip_l: str | None = None
    t5xxl: str | None = None
    progress: bool = True


def parse_weight_list(text: str) -> list[float]:
    """`"0,0.5,0.7,1.0"` -> [0.0, 0.5, 0.7, 1.0]; UserError naming the bad item."""
    items = [item.strip() for item in text.split(",")]
    weights = []
    for item in items:
        try:
            value = float(item)
        except ValueError:
            raise UserError(f"--lora-weights: '{item}' is not a number (write e.g. 0,0.5,0.7,1.0).") from None
        if not math.isfinite(value):
            raise UserError(f"--lora-weights: '{item}' is not a finite number.")
        weights.append(value)
    return weights
