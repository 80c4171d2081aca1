"""Sample images during training: prompt files, file names, infotext, TensorBoard, and an unchanged LoRA."""

from __future__ import annotations

import random

import numpy as np
import pytest
import safetensors.torch
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lora_scripts.config import load_config
from lora_scripts.errors import UserError
from lora_scripts.generation.infotext import parse_infotext
from lora_scripts.generation.outputs import read_png_infotext
from lora_scripts.training.loop import train
from lora_scripts.training.sampling import SamplePrompt, parse_prompt_line, preserved_rng

from .conftest import write_config

PROMPT_FILE = """\
# sample prompts
ink wash painting, a cat --s 2

  a mountain --d 7 --s 2 --n blurry
"""


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("a cat", SamplePrompt("a cat", "", 64, 64, 45, None, 20)),  # None: the family's CFG
        (
            "a cat, ink --n blurry, low quality --w 128 --h 96 --d 1 --l 7.5 --s 28",
            SamplePrompt("a cat, ink", "blurry, low quality", 128, 96, 1, 7.5, 28),
        ),
        ("  x--y --s 3  ", SamplePrompt("x--y", "", 64, 64, 45, None, 3)),
    ],
)
def test_prompt_line(line, expected) -> None:
    assert parse_prompt_line(line, 3, resolution=64, seed=42, where="p") == expected


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("a --x 1", "p: unknown option --x"),
        ("a --w big", "p: --w 'big' is not a number"),
        ("a --w 100", "p: width 100 is not a positive multiple of 8"),
        ("--s 2", "p: the prompt is empty"),
    ],
)
def test_prompt_line_errors(line, message) -> None:
    with pytest.raises(UserError, match=message):
        parse_prompt_line(line, 0, resolution=64, seed=0, where="p")


def test_preserved_rng_restores_every_state() -> None:
    with preserved_rng():
        expected = (random.random(), np.random.rand(), torch.rand(1))
    with preserved_rng():
        random.random(), np.random.rand(), torch.rand(3)
    assert (random.random(), np.random.rand()) == expected[:2] and torch.equal(torch.rand(1), expected[2])


def _config(tmp_path, tiny_model_dir, dataset_dir, name, **extra):
    path = write_config(
        tmp_path / f"{name}.yaml",
        train_data_dir=str(dataset_dir),
        metadata_path=str(dataset_dir / "metadata.csv"),
        base_model=str(tiny_model_dir),
        output_dir=str(tmp_path / name),
        output_name="ink",
        resolution=64,
        max_train_steps=4,
        batch_size=1,
        lora_rank=4,
        **extra,
    )
    return load_config(path)


def test_run_with_samples(tmp_path, tiny_model_dir, dataset_dir) -> None:
    prompt_file = tmp_path / "prompts.txt"
    prompt_file.write_text(PROMPT_FILE, encoding="utf-8")
    sampled = _config(
        tmp_path,
        tiny_model_dir,
        dataset_dir,
        "sampled",
        sample_prompts=str(prompt_file),
        sample_at_first=True,
        sample_every_n_steps=2,
    )
    plain = _config(tmp_path, tiny_model_dir, dataset_dir, "plain")
    with_samples, without = train(sampled), train(plain)

    folder = sampled.output_dir / "sample"
    assert sorted(p.name for p in folder.iterdir()) == [
        f"ink_s{step:06d}_p{i:02d}_{slug}.png"
        for step in (0, 2, 4)
        for i, slug in enumerate(["ink_wash_painting_a_cat", "a_mountain"])
    ]
    info = parse_infotext(read_png_infotext(folder / "ink_s000002_p01_a_mountain.png"))
    assert info["Prompt"] == "a mountain" and info["Negative prompt"] == "blurry"
    assert (info["Seed"], info["Steps"], info["Sampler"], info["Size"]) == ("7", "2", "Euler a", "64x64")
    assert info["Training step"] == "2"
    assert parse_infotext(read_png_infotext(folder / "ink_s000000_p00_ink_wash_painting_a_cat.png"))[
        "Seed"
    ] == str(sampled.seed)

    events = EventAccumulator(str(sampled.logging_dir), size_guidance={"images": 0})
    for run in sampled.logging_dir.rglob("events.out.tfevents.*"):
        events = EventAccumulator(str(run), size_guidance={"images": 0})
        events.Reload()
        if "samples" in events.Tags()["images"]:
            break
    assert [e.step for e in events.Images("samples")] == [0, 2, 4]

    a = safetensors.torch.load_file(with_samples.final_files[0])
    b = safetensors.torch.load_file(without.final_files[0])
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"sample_sampler": "plms"}, "sample_sampler: unknown sampler 'plms'"),
        ({"sample_every_n_steps": 0}, "sample_every_n_steps: 0 is out of range"),
        ({"sample_every_n_epochs": -1}, "sample_every_n_epochs: -1 is out of range"),
        ({"sample_prompts": ["ok", ""]}, "sample_prompts: entry 1"),
        ({"sample_prompts": 3}, "sample_prompts: is neither a list of prompts nor a prompt file path"),
    ],
)
def test_config_errors(tmp_path, tiny_model_dir, dataset_dir, values, message) -> None:
    with pytest.raises(UserError, match=message):
        _config(tmp_path, tiny_model_dir, dataset_dir, "bad", **values)


def test_missing_prompt_file_fails_before_training(tmp_path, tiny_model_dir, dataset_dir) -> None:
    config = _config(
        tmp_path, tiny_model_dir, dataset_dir, "missing", sample_prompts=str(tmp_path / "no.txt")
    )
    with pytest.raises(UserError, match="sample_prompts: file '.*no.txt' does not exist"):
        train(config)
    assert not config.output_dir.exists()
