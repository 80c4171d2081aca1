"""`lora-scripts demo`: the whole workflow on a fresh machine, with no download.

Builds a tiny base model (deterministic; SD-1.x-shaped, or SDXL-shaped with `--family sdxl`), draws a small
"ink painting" dataset with a metadata.csv, writes a config and trains it through the same `train()` as a
real run.
"""

from __future__ import annotations

import csv
import random
import shlex
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from PIL import Image, ImageDraw, ImageFilter

from lora_scripts.config import load_config
from lora_scripts.models.tiny import build_tiny_sd, build_tiny_sdxl
from lora_scripts.training.loop import TrainResult, train

_SUBJECTS = ["mountain peak", "pine tree", "temple", "river", "moon", "bamboo", "boat", "bridge"]


@dataclass(frozen=True)
class DemoFamily:
    """What differs between the demos of two model families: the tiny model and the run's names."""

    build_model: Callable[[Path], Path]  # writes the tiny model as a diffusers folder
    model_folder: str  # under <root>/models/
    model_description: str  # for the closing lines
    run_name: str  # the config's file stem and the output folder
    config: dict[str, Any] = field(default_factory=dict)  # keys added to the shared demo config


DEMO_FAMILIES: dict[str, DemoFamily] = {
    "sd": DemoFamily(build_tiny_sd, "tiny-sd", "a tiny SD 1.x-shaped diffusers folder", "ink_painting_demo"),
    # SDXL trains CLIP ViT-L's LoRA too but leaves OpenCLIP bigG frozen (rate 0): the file gets lora_unet_
    # and lora_te1_ keys, no lora_te2_.
    "sdxl": DemoFamily(
        build_tiny_sdxl,
        "tiny-sdxl",
        "a tiny SDXL-shaped diffusers folder",
        "ink_painting_demo_sdxl",
        {"train_text_encoder": True, "text_encoder_lr": [5e-4, 0]},
    ),
}


@dataclass(frozen=True)
class DemoLayout:
    """What the demo leaves under `root` (`--dir`, default ./demo) for the user to start from."""

    root: Path
    family: str = "sd"  # a key of DEMO_FAMILIES

    @property
    def model(self) -> Path:
        return self.root / "models" / DEMO_FAMILIES[self.family].model_folder

    @property
    def dataset(self) -> Path:
        return self.root / "data" / "ink_painting"

    @property
    def config(self) -> Path:
        return self.root / "configs" / f"{DEMO_FAMILIES[self.family].run_name}.yaml"

    @property
    def output_dir(self) -> Path:
        return self.root / "output" / DEMO_FAMILIES[self.family].run_name


def draw_ink_image(subject_index: int, seed: int, size: int = 96) -> Image.Image:
    """A grey-on-paper picture: layered mountain ridges plus a dark subject mark (deterministic)."""
    rng = random.Random(seed)
    img = Image.new("RGB", (size, size), (236, 230, 214))  # rice-paper tone
    draw = ImageDraw.Draw(img)
    for layer in range(3):
        shade = 190 - 50 * layer
        base = size * (0.45 + 0.15 * layer)
        points = [(0, size)]
        for x in range(0, size + 8, 8):
            points.append((x, base - rng.uniform(0, size * 0.25)))
        points.append((size, size))
        draw.polygon(points, fill=(shade, shade, shade - 5))
    cx, cy = rng.uniform(0.25, 0.75) * size, rng.uniform(0.2, 0.5) * size
    r = size * (0.06 + 0.02 * (subject_index % 3))
    if subject_index % 2 == 0:
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=(30, 30, 30))
    else:
        draw.rectangle((cx - r, cy - 2 * r, cx + r, cy + r), fill=(40, 40, 40))
    return img.filter(ImageFilter.GaussianBlur(1.2))


def make_demo_dataset(folder: Path, num_images: int = 8) -> Path:
    """Write `num_images` PNGs and a metadata.csv (file_name,text) into `folder`; returns the csv path."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(num_images):
        subject = _SUBJECTS[i % len(_SUBJECTS)]
        name = f"ink_{i:02d}.png"
        draw_ink_image(i, seed=i).save(folder / name)
        rows.append((name, f"{subject}, ink wash painting, monochrome, traditional Chinese art"))
    csv_path = folder / "metadata.csv"
    with open(csv_path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["file_name", "text"])
        writer.writerows(rows)
    return csv_path


def write_demo_config(root: Path, steps: int, family: str = "sd") -> Path:
    """A config like the user's ink_painting.yaml, pointed at the demo model and data."""
    layout = DemoLayout(root, family)
    config = {
        "train_data_dir": str(layout.dataset),
        "metadata_path": str(layout.dataset / "metadata.csv"),
        "base_model": str(layout.model),
        "resolution": 64,
        "lora_rank": 8,
        "target_modules": ["to_q", "to_v"],
        "batch_size": 4,
        "max_train_steps": steps,
        "learning_rate": 1e-3,
        "output_dir": str(layout.output_dir),
        "save_steps": max(1, steps // 3),
        "seed": 42,
        "overwrite": True,  # running the demo again replaces its run (the old one goes to previous_runs/)
        **DEMO_FAMILIES[family].config,
    }
    path = layout.config
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return path


def run_demo(root: Path, steps: int = 60, family: str = "sd") -> TrainResult:
    """Build everything under `root` for `family` (a key of DEMO_FAMILIES) and train; returns the training
    result."""
    layout = DemoLayout(root, family)
    DEMO_FAMILIES[family].build_model(layout.model)
    make_demo_dataset(layout.dataset)
    return train(load_config(write_demo_config(root, steps, family)))


def next_steps_lines(root: Path, lora_file: Path, family: str = "sd") -> list[str]:
    """The demo's closing lines: what it left under `root` and the commands that go on from there, with
    `lora_file` (a LoRA file it trained) named by its path in the prompt."""
    layout = DemoLayout(root, family)
    config = str(layout.config)
    prompt = f"temple, <lora:{lora_file}:1>, ink wash painting"
    generate = ["lora-scripts", "generate", "--base-model", str(layout.model), "--prompt", prompt]
    generate += ["--width", "64", "--height", "64", "--output", str(root / "renders") + "/"]
    return [
        f"Left in {root} to start from:",
        f"  model    {layout.model}  ({DEMO_FAMILIES[family].model_description}, untrained)",
        f"  dataset  {layout.dataset}  (PNG images + metadata.csv)",
        f"  config   {config}",
        "Check it, train it again (edit the config first), render with the LoRA:",
        f"  {shlex.join(['lora-scripts', 'check', '--config', config])}",
        f"  {shlex.join(['lora-scripts', 'train', '--config', config])}",
        f"  {shlex.join(generate)}",
    ]
