"""The SDXL plan without weights: trainable parameters of the full-size model, per-encoder text-encoder rates,
and the resolution an SDXL config trains at when it leaves `resolution` out."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

from lora_scripts.checks.plan import network_facts
from lora_scripts.config import load_config, validate_config_dict
from lora_scripts.errors import UserError

# Hand count, rank 4 on to_q/to_k/to_v/to_out.0. A transformer block of width C has self-attention (four
# C -> C layers: 8C per rank) and cross-attention (q and out C -> C, k and v 2048 -> C: 6C + 4096). SDXL has
# 10 blocks at 640 (2 x 2 down, 3 x 2 up) and 60 at 1280 (2 x 10 down, 10 mid, 3 x 10 up).
SDXL_UNET_RANK4_ATTENTION = 4 * (10 * (14 * 640 + 4096) + 60 * (14 * 1280 + 4096))  # 5,806,080
CLIP_L_RANK4 = 12 * 4 * 4 * (768 + 768)  # 12 layers x q/k/v/out x rank 4
OPEN_CLIP_BIGG_RANK4 = 32 * 4 * 4 * (1280 + 1280)  # 32 layers


def _sdxl_header_file(path: Path) -> Path:
    """The keys version detection reads, with tiny tensors: an SDXL base file to the check."""
    save_file(
        {
            "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(1, 4, 1, 1),
            "conditioner.embedders.0.transformer.text_model.final_layer_norm.bias": torch.zeros(1),
            "conditioner.embedders.1.model.token_embedding.weight": torch.zeros(1),
            "first_stage_model.encoder.conv_in.weight": torch.zeros(1),
        },
        path,
    )
    return path


def _sd15_header_file(path: Path) -> Path:
    save_file(
        {
            "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(1, 4, 1, 1),
            "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": torch.zeros(1),
        },
        path,
    )
    return path


def _config(base_model: Path, **values: object):
    base = {"train_data_dir": "data", "base_model": str(base_model), "output_dir": "out/run"}
    return validate_config_dict({**base, **values}, "test.yaml", check_paths=False)


def test_full_size_sdxl_counts(tmp_path: Path) -> None:
    path = _sdxl_header_file(tmp_path / "illustriousXL_v01.safetensors")
    assert SDXL_UNET_RANK4_ATTENTION == 5_806_080
    unet_only = network_facts(_config(path, lora_rank=4))
    assert (unet_only.sd_version, unet_only.unet_parameters) == ("sdxl", SDXL_UNET_RANK4_ATTENTION)
    assert unet_only.text_encoder_parameters == 0
    both = network_facts(_config(path, lora_rank=4, train_text_encoder=True))
    assert both.text_encoder_parameters == CLIP_L_RANK4 + OPEN_CLIP_BIGG_RANK4
    only_te1 = network_facts(_config(path, lora_rank=4, train_text_encoder=True, text_encoder_lr=[1e-5, 0]))
    assert only_te1.text_encoder_parameters == CLIP_L_RANK4
    only_te2 = network_facts(_config(path, lora_rank=4, train_text_encoder=True, text_encoder_lr=[0, 2e-5]))
    assert only_te2.text_encoder_parameters == OPEN_CLIP_BIGG_RANK4


def test_two_rates_on_an_sd15_model_are_refused_by_name(tmp_path: Path) -> None:
    path = _sd15_header_file(tmp_path / "v1-5.safetensors")
    with pytest.raises(UserError) as refused:
        network_facts(_config(path, train_text_encoder=True, text_encoder_lr=[1e-5, 1e-5]))
    assert str(refused.value) == (
        "text_encoder_lr: [1e-05, 1e-05] gives 2 rates but this model has 1 text encoder(s); give one number."
    )


@pytest.mark.parametrize(
    ("value", "expected"),
    [(5e-5, 5e-5), ([5e-5], 5e-5), ([1e-5, 0], (1e-5, 0.0)), ([0, 3e-5], (0.0, 3e-5))],
)
def test_text_encoder_lr_takes_a_number_or_one_per_encoder(tmp_path: Path, value, expected) -> None:
    config = _config(tmp_path / "m.safetensors", text_encoder_lr=value)
    assert config.text_encoder_lr == expected


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ([0, 0], "gives every text encoder rate 0; set train_text_encoder: false instead"),
        ([1e-5, 1e-5, 1e-5], "must be a number, or a list of one or two numbers >= 0"),
        ([1e-5, -1], "must be a number, or a list of one or two numbers >= 0"),
        (0, "must be greater than 0 (got 0)"),
        (True, "is a boolean, not a learning rate"),
    ],
)
def test_bad_text_encoder_rates_say_what_is_wrong(tmp_path: Path, value, problem) -> None:
    with pytest.raises(UserError) as refused:
        _config(tmp_path / "m.safetensors", text_encoder_lr=value)
    assert f"test.yaml: text_encoder_lr: {problem}" in str(refused.value)


def test_resolution_defaults_to_the_base_models_native_size(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    sdxl = _sdxl_header_file(tmp_path / "pony.safetensors")
    sd15 = _sd15_header_file(tmp_path / "v1-5.safetensors")

    def load(model: Path, **values: object) -> int:
        cfg = tmp_path / "c.yaml"
        data = {"train_data_dir": str(tmp_path / "data"), "base_model": str(model), "output_dir": "out"}
        cfg.write_text(yaml.safe_dump({**data, **values}), encoding="utf-8")
        return load_config(cfg).resolution

    assert load(sdxl) == 1024
    assert load(sd15) == 512
    assert load(sdxl, resolution=768) == 768  # a value the user wrote wins
