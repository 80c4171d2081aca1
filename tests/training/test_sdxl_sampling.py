"""Sample images during an SDXL run: a StableDiffusionXLPipeline over the modules being trained, the same
PNG names and infotext as SD 1.x, images that match `generate`'s, and a LoRA unchanged by sampling."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
from PIL import Image

from lora_scripts.config import load_config
from lora_scripts.generation.generate import run_generate
from lora_scripts.generation.infotext import parse_infotext
from lora_scripts.generation.options import GenerateOptions
from lora_scripts.generation.outputs import read_png_infotext
from lora_scripts.models.tiny import build_tiny_sdxl
from lora_scripts.training.loop import train

from .conftest import tiny_run_settings, write_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PROMPTS = ["ink wash painting, a cat --s 2 --n blurry", "a mountain --s 3 --w 64 --h 48 --d 9 --l 5"]


@pytest.fixture(scope="module")
def xl_model_dir(tmp_path_factory) -> Path:
    return build_tiny_sdxl(tmp_path_factory.mktemp("xl_models") / "tiny-sdxl")


def _config(tmp_path, model, data, name, **extra):
    settings = tiny_run_settings(
        data,
        model,
        output_dir=str(tmp_path / name),
        output_name="ink_xl",
        max_train_steps=4,
        learning_rate=2e-2,
        train_text_encoder=True,
        clip_skip=2,  # SDXL reads the penultimate layer whatever clip_skip says: no "Clip skip" in infotext
        mixed_precision="no",
        save_precision="fp32",
    )
    return load_config(write_config(tmp_path / f"{name}.yaml", **(settings | extra)))


def _pixels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB")).astype(np.int16)


def _generate(model: Path, out: Path, prompt: str, lora_dirs: list[Path] | None = None) -> Path:
    """The first sample prompt through `generate` (same seed, steps, CFG, sampler and size)."""
    options = GenerateOptions(
        base_model=str(model),
        prompt=prompt,
        negative_prompt="blurry",
        lora_dirs=lora_dirs or [],
        steps=2,
        cfg_scale=7.0,
        seed=42,
        width=64,
        height=64,
        sampler="euler_a",
        output=out,
        progress=False,
    )
    return run_generate(options).files[0]


def test_sdxl_run_writes_samples_that_match_generate(tmp_path, xl_model_dir, dataset_dir) -> None:
    sampled = _config(
        tmp_path,
        xl_model_dir,
        dataset_dir,
        "sampled",
        sample_prompts=PROMPTS,
        sample_at_first=True,
        sample_every_n_steps=2,
    )
    with_samples = train(sampled)

    folder = sampled.output_dir / "sample"
    names = [
        f"ink_xl_s{step:06d}_p{i:02d}_{slug}.png"
        for step in (0, 2, 4)
        for i, slug in enumerate(["ink_wash_painting_a_cat", "a_mountain"])
    ]
    assert sorted(p.name for p in folder.iterdir()) == names
    for step in (0, 2, 4):
        cat = parse_infotext(
            read_png_infotext(folder / f"ink_xl_s{step:06d}_p00_ink_wash_painting_a_cat.png")
        )
        assert (cat["Prompt"], cat["Negative prompt"]) == ("ink wash painting, a cat", "blurry")
        assert (cat["Seed"], cat["Steps"], cat["Sampler"], cat["CFG scale"], cat["Size"]) == (
            "42",
            "2",
            "Euler a",
            "7",
            "64x64",
        )
        assert (cat["Model"], cat["Training step"]) == ("tiny-sdxl", str(step))
        assert "Clip skip" not in cat
        mountain_text = read_png_infotext(folder / f"ink_xl_s{step:06d}_p01_a_mountain.png")
        assert "Negative prompt:" not in mountain_text
        mountain = parse_infotext(mountain_text)
        assert (mountain["Seed"], mountain["Steps"], mountain["CFG scale"], mountain["Size"]) == (
            "9",
            "3",
            "5",
            "64x48",
        )
        assert Image.open(folder / f"ink_xl_s{step:06d}_p01_a_mountain.png").size == (64, 48)

    first = _pixels(folder / "ink_xl_s000000_p00_ink_wash_painting_a_cat.png")
    last = _pixels(folder / "ink_xl_s000004_p00_ink_wash_painting_a_cat.png")
    # Before the first step the LoRA adds exactly 0: the sample is the base model's image, bit for bit.
    base = _generate(xl_model_dir, tmp_path / "base.png", "ink wash painting, a cat")
    assert np.array_equal(first, _pixels(base))
    # The last sample shows the LoRA as saved (fp32; up to rounding: peft scales alpha / rank apart, the
    # saved file has it folded into lora_up), and the LoRA has moved the image well beyond that rounding.
    lora = with_samples.final_files[-1]
    assert lora.name == "ink_xl.safetensors"
    rendered = _generate(
        xl_model_dir, tmp_path / "lora.png", "ink wash painting, a cat, <lora:ink_xl:1>", [lora.parent]
    )
    rounding = np.abs(last - _pixels(rendered))
    moved = np.abs(last - first).mean()
    assert rounding.max() <= 2 and rounding.mean() < 0.05, (rounding.max(), rounding.mean())
    assert moved > 2.0, moved  # 5.5 mean levels of 255 here

    plain = train(_config(tmp_path, xl_model_dir, dataset_dir, "plain"))
    a = safetensors.torch.load_file(with_samples.final_files[-1])
    b = safetensors.torch.load_file(plain.final_files[-1])
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
