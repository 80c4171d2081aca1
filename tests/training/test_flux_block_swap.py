"""`blocks_to_swap` through `lora-scripts train` on the tiny FLUX model: the LoRA file is bit-equal to the
same run without it, the count is checked against the model, and the keys it needs are asked for up front."""

from __future__ import annotations

import json

import pytest
import torch

from lora_scripts.cli import main
from lora_scripts.config import load_config
from lora_scripts.models.tiny import build_tiny_flux_components
from lora_scripts.training.loop import train
from tests.training.test_flux_train import flux_config, lora_of


def test_a_swapped_run_writes_the_same_lora(tmp_path, flux_dir, dataset_dir, caplog):
    common = dict(base_model=str(flux_dir), gradient_checkpointing=True, mixed_precision="bf16")
    plain = flux_config(tmp_path, "plain", dataset_dir, **common)
    swapped = flux_config(tmp_path, "swapped", dataset_dir, blocks_to_swap=2, **common)
    train(load_config(plain))
    with caplog.at_level("INFO", logger="lora_scripts"):
        train(load_config(swapped))
    assert "blocks_to_swap 2: 3 blocks' frozen weights" in caplog.text
    expected, got = lora_of(plain), lora_of(swapped)
    assert got.keys() == expected.keys()
    assert all(torch.equal(got[key], expected[key]) for key in expected)


def test_too_many_blocks_are_refused_with_the_most_allowed(tmp_path, flux_dir, dataset_dir, capsys):
    config = flux_config(
        tmp_path, "many", dataset_dir, base_model=str(flux_dir), gradient_checkpointing=True, blocks_to_swap=5
    )
    assert main(["train", "--config", str(config)]) != 0
    err = capsys.readouterr().err
    assert "blocks_to_swap: 5 means 2 double and 6 single blocks" in err and "use at most 2" in err
    assert "Traceback" not in err


def test_checkpointing_is_asked_for(tmp_path, flux_dir, dataset_dir, capsys):
    config = flux_config(tmp_path, "nockpt", dataset_dir, base_model=str(flux_dir), blocks_to_swap=1)
    assert main(["train", "--config", str(config)]) != 0
    assert "blocks_to_swap: needs gradient_checkpointing: true" in capsys.readouterr().err
    low = flux_config(
        tmp_path, "low", dataset_dir, base_model=str(flux_dir), blocks_to_swap=1, memory_profile="low"
    )
    assert main(["check", "--config", str(low)]) == 0


def test_swap_with_8_bit_weights_writes_the_same_lora(tmp_path, flux_dir, dataset_dir):
    """quanto's int8 weights are tensor subclasses: block swap moves them as they are."""
    pytest.importorskip("optimum.quanto")
    common = dict(
        base_model=str(flux_dir), gradient_checkpointing=True, quantize_base="int8", max_train_steps=2
    )
    plain = flux_config(tmp_path, "q", dataset_dir, **common)
    swapped = flux_config(tmp_path, "qswap", dataset_dir, blocks_to_swap=1, **common)
    train(load_config(plain))
    train(load_config(swapped))
    expected, got = lora_of(plain), lora_of(swapped)
    assert got.keys() == expected.keys()
    assert all(torch.equal(got[key], expected[key]) for key in expected)


def test_check_shows_what_waits_on_the_cpu(tmp_path, flux_dir, dataset_dir, capsys):
    """The tiny FLUX's blocks_to_swap 2: its second double block and both single blocks, in bf16."""
    config = flux_config(
        tmp_path, "plan", dataset_dir, base_model=str(flux_dir), blocks_to_swap=2, memory_profile="low"
    )
    assert main(["check", "--config", str(config), "--json"]) == 0
    speed = json.loads(capsys.readouterr().out)["speed"]
    transformer = build_tiny_flux_components().transformer
    blocks = [transformer.transformer_blocks[1], *transformer.single_transformer_blocks]
    assert speed["blocks_to_swap"] == 2 and speed["swapped_blocks"] == 3
    assert speed["swapped_parameters"] == sum(p.numel() for block in blocks for p in block.parameters())
    assert main(["check", "--config", str(config)]) == 0
    assert "blocks_to_swap      2: 3 blocks' frozen weights (0.0 GiB in bf16) wait on the CPU" in (
        capsys.readouterr().out
    )
