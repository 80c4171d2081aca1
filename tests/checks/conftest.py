"""Datasets with known problems for the check tests, and the tiny model they point at."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from lora_scripts.models.tiny import build_tiny_sd

RESOLUTION = 64
TRIGGER = "sks"
LONG_CAPTION_TOKENS = 100


def distinct_image(seed: int, size: tuple[int, int] = (96, 96)) -> Image.Image:
    """A smooth random RGB picture; different seeds give unrelated pictures (hashes ~32 bits apart)."""
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray((rng.random((6, 6, 3)) * 255).astype(np.uint8), mode="RGB")
    return coarse.resize(size, Image.Resampling.BICUBIC)


def long_caption(tokens: int = LONG_CAPTION_TOKENS) -> str:
    """A caption of exactly `tokens` CLIP tokens: the trigger, then "red" (one token each) repeated."""
    return " ".join([TRIGGER] + ["red"] * (tokens - 1))


def write_pair(folder: Path, name: str, image: Image.Image, caption: str, **save_args: object) -> None:
    """`name` (format from its suffix) plus its kohya-style `.txt` caption."""
    folder.mkdir(parents=True, exist_ok=True)
    image.save(folder / name, **save_args)
    (folder / name).with_suffix(".txt").write_text(caption, encoding="utf-8")


def make_problem_dataset(folder: Path) -> Path:
    """10 images (.txt captions) with one of each non-blocking problem the check reports:

    - a.png = a_copy.png (identical bytes);
    - b.png ~ b_resaved.jpg (re-saved as JPEG quality 70 and resized 96 -> 90 px);
    - small.png, 40x40 (< RESOLUTION);
    - wide.png, 300x96 (3.1:1);
    - long.png's caption is LONG_CAPTION_TOKENS tokens;
    - c.png and d.png lack the trigger word.
    """
    write_pair(folder, "a.png", distinct_image(1), f"{TRIGGER}, a red thing")
    (folder / "a_copy.png").write_bytes((folder / "a.png").read_bytes())
    (folder / "a_copy.txt").write_text(f"{TRIGGER}, a copy", encoding="utf-8")
    write_pair(folder, "b.png", distinct_image(2), f"{TRIGGER}, a blue thing")
    resaved = distinct_image(2).resize((90, 90), Image.Resampling.LANCZOS)
    write_pair(folder, "b_resaved.jpg", resaved, f"{TRIGGER}, a blue thing again", quality=70)
    write_pair(folder, "c.png", distinct_image(3), "a green thing")
    write_pair(folder, "d.png", distinct_image(4), "a yellow thing")
    write_pair(folder, "e.png", distinct_image(5), f"{TRIGGER}, outdoors")
    write_pair(folder, "small.png", distinct_image(6, (40, 40)), f"{TRIGGER}, small")
    write_pair(folder, "wide.png", distinct_image(7, (300, 96)), f"{TRIGGER}, wide")
    write_pair(folder, "long.png", distinct_image(8), long_caption())
    return folder


def write_config(path: Path, **values: object) -> Path:
    """A YAML config of `values` (paths as strings)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    plain = {k: str(v) if isinstance(v, Path) else v for k, v in values.items()}
    path.write_text(yaml.safe_dump(plain, sort_keys=False), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny SD 1.x-shaped diffusers folder."""
    return build_tiny_sd(tmp_path_factory.mktemp("check_model") / "tiny-sd")


@pytest.fixture
def problem_config(tmp_path: Path, tiny_model: Path) -> Path:
    """A valid config over make_problem_dataset: training can start, with warnings."""
    data = make_problem_dataset(tmp_path / "data")
    return write_config(
        tmp_path / "config.yaml",
        train_data_dir=data,
        base_model=tiny_model,
        resolution=RESOLUTION,
        trigger_word=TRIGGER,
        batch_size=4,
        gradient_accumulation_steps=2,
        epochs=3,
        save_steps=2,
        output_dir=tmp_path / "out" / "run1",
    )
