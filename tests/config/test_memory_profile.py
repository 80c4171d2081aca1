"""`memory_profile: low` and the automatic caches: what a config resolves to (on this CPU-only machine), that
written keys win, and that the dumped config.yaml reads back to the same run."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from lora_scripts.checks.plan import speed_facts
from lora_scripts.checks.report import CheckReport, render_text, report_to_json
from lora_scripts.config import dump_config, load_config, validate_config_dict
from lora_scripts.errors import UserError

BASE: dict[str, Any] = {"train_data_dir": "data", "base_model": "m.safetensors", "output_dir": "out"}


def resolve(**values: Any):
    return validate_config_dict({**BASE, **values}, "<t>", check_paths=False)


def test_low_profile_on_a_cpu_resolves_to_the_small_memory_settings(caplog) -> None:
    assert not torch.cuda.is_available()  # this test states the CPU choices
    with caplog.at_level("INFO"):
        config = resolve(memory_profile="low", batch_size=4)
    assert config.gradient_checkpointing is True
    assert config.optimizer_type == "AdamW"  # no CUDA: no 8-bit Adam
    assert "8-bit AdamW needs bitsandbytes" in caplog.text
    assert config.mixed_precision == "bf16"  # frozen weights at half size
    assert (config.batch_size, config.gradient_accumulation_steps) == (1, 4)  # effective batch 4 kept
    assert config.cache_latents is True and config.cache_text_encoder_outputs is True


def test_low_profile_multiplies_an_unwritten_accumulation_into_the_batch() -> None:
    config = resolve(memory_profile="low", batch_size=3)
    assert (config.batch_size, config.gradient_accumulation_steps) == (1, 3)
    config = resolve(memory_profile="low")
    assert (config.batch_size, config.gradient_accumulation_steps) == (1, 1)


def test_written_keys_win_over_the_low_profile() -> None:
    config = resolve(
        memory_profile="low",
        gradient_checkpointing=False,
        mixed_precision="no",
        optimizer_type="Lion",
        batch_size=2,
        gradient_accumulation_steps=3,
        cache_latents=False,
    )
    assert config.gradient_checkpointing is False
    assert config.mixed_precision == "no"
    assert config.optimizer_type == "Lion"
    assert (config.batch_size, config.gradient_accumulation_steps) == (2, 3)
    assert config.cache_latents is False


def test_default_profile_changes_nothing() -> None:
    config = resolve(batch_size=4)
    assert config.memory_profile == "default"
    assert (config.batch_size, config.gradient_accumulation_steps) == (4, 1)
    assert config.gradient_checkpointing is False and config.mixed_precision == "no"


def test_low_profile_round_trips_through_the_dumped_config(tmp_path) -> None:
    config = resolve(memory_profile="low", batch_size=4)
    path = tmp_path / "config.yaml"
    dump_config(config, path)
    text = path.read_text(encoding="utf-8")
    assert "memory_profile: low" in text and "gradient_accumulation_steps: 4" in text
    again = load_config(path, check_paths=False)
    assert again.model_dump() == config.model_dump()  # the batch is not split a second time


@pytest.mark.parametrize(
    ("values", "latents", "text"),
    [
        ({}, True, True),
        ({"random_crop": True}, False, True),
        ({"center_crop": False}, False, True),
        ({"datasets": [{"train_data_dir": "d", "random_crop": True}], "train_data_dir": None}, False, True),
        ({"train_text_encoder": True}, True, False),
        ({"shuffle_caption": True}, True, False),
        ({"caption_dropout_rate": 0.1}, True, False),
        (
            {"datasets": [{"train_data_dir": "d", "caption_tag_dropout_rate": 0.2}], "train_data_dir": None},
            True,
            False,
        ),
        ({"cache_latents": False, "cache_text_encoder_outputs": False}, False, False),
        ({"cache_latents": None, "cache_text_encoder_outputs": None}, True, True),  # null = auto
    ],
)
def test_caches_are_on_by_default_where_valid(values: dict[str, Any], latents: bool, text: bool) -> None:
    merged = {**BASE, **values}
    data = {key: value for key, value in merged.items() if value is not None or key.startswith("cache")}
    config = validate_config_dict(data, "<t>", check_paths=False)
    assert (config.cache_latents, config.cache_text_encoder_outputs) == (latents, text)


def test_explicit_cache_with_random_crop_is_still_an_error() -> None:
    with pytest.raises(UserError, match="cache_latents: cannot be used with random crops"):
        resolve(cache_latents=True, random_crop=True)


def test_check_says_whether_each_cache_is_on_and_what_the_profile_chose() -> None:
    report = CheckReport(
        config_path="x.yaml", speed=speed_facts(resolve(memory_profile="low", random_crop=True))
    )
    text = render_text(report)
    assert "Speed and memory: memory_profile low" in text
    assert "off (turned off by random_crop)" in text
    assert "gradient_checkpointing on, mixed_precision bf16, optimizer AdamW, batch_size 1 x " in text
    speed = report_to_json(report)["speed"]
    assert speed["cache_latents"] is False and speed["cache_text_encoder_outputs"] is True
    assert speed["gradient_accumulation_steps"] == 1
