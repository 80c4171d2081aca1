"""Small helpers of the captioning tests: image folders and the `label` command with the tiny BLIP."""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from lora_scripts.cli import main

COLOURS = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (10, 10, 10), (240, 240, 240), (128, 128, 0)]


def write_images(folder: Path, names: list[str]) -> list[Path]:
    """Plain images of different colours (so the tiny BLIP captions them differently); format by suffix."""
    paths = []
    for i, name in enumerate(names):
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (40, 30), COLOURS[i % len(COLOURS)]).save(path)
        paths.append(path)
    return paths


def label(model: Path, folder: Path, *args: str) -> int:
    """`lora-scripts label --input folder` with the tiny model and short captions (fast on a CPU)."""
    return main(["label", "--input", str(folder), "--model", str(model), "--max-new-tokens", "6", *args])
