"""Every YAML file in configs/ loads through the full loader, once the paths it names exist."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from lora_scripts.config import load_config

from .conftest import REPO
from .test_loader import SEED_INK, SEED_STYLE

SHIPPED = sorted((REPO / "configs").glob("*.yaml"))


def create_referenced_paths(config_file: Path, root: Path) -> None:
    """Create, under `root`, the folders and files that `config_file` expects to exist."""
    data = yaml.safe_load(config_file.read_text(encoding="utf-8"))
    folders = [data[key] for key in ("train_data_dir", "base_model_config", "reg_data_dir") if key in data]
    folders += [entry["train_data_dir"] for entry in data.get("datasets", [])]
    for folder in folders:
        (root / folder).mkdir(parents=True, exist_ok=True)
    for key in ("metadata_path", "base_model", "vae", "clip_l", "t5xxl"):
        if key in data:
            (root / data[key]).parent.mkdir(parents=True, exist_ok=True)
            (root / data[key]).touch()


def test_the_shipped_configs_are_there() -> None:
    names = {path.name for path in SHIPPED}
    assert {"style_lora.yaml", "character_lora.yaml", "my_lora_config.yaml", "ink_painting.yaml"} <= names


@pytest.mark.parametrize("config_file", SHIPPED, ids=[path.name for path in SHIPPED])
def test_shipped_config_loads(config_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    create_referenced_paths(config_file, tmp_path)
    monkeypatch.chdir(tmp_path)
    config = load_config(config_file)
    assert config.output_name and config.lora_alpha and config.logging_dir  # resolved


def test_seed_configs_are_verbatim() -> None:
    assert (REPO / "configs" / "my_lora_config.yaml").read_text(encoding="utf-8") == SEED_STYLE
    assert (REPO / "configs" / "ink_painting.yaml").read_text(encoding="utf-8") == SEED_INK


def test_character_config_trains_the_text_encoder_gently(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = REPO / "configs" / "character_lora.yaml"
    create_referenced_paths(path, tmp_path)
    monkeypatch.chdir(tmp_path)
    config = load_config(path)
    assert config.train_text_encoder and config.text_encoder_lr is not None
    assert config.text_encoder_lr < config.learning_rate
    assert config.metadata_path is None  # captions from .txt files, with the trigger word


def test_buckets_config_uses_the_sd_scripts_depth(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = REPO / "configs" / "buckets_and_repeats.yaml"
    create_referenced_paths(path, tmp_path)
    monkeypatch.chdir(tmp_path)
    config = load_config(path)
    assert config.enable_bucket and config.cache_latents and config.cache_latents_to_disk
    assert config.datasets is not None and config.datasets[1].resolution == 640
    assert (config.target_modules, config.conv_rank, config.conv_alpha) == ("kohya", 8, 4)
    assert isinstance(config.lr_warmup_steps, float) and config.lr_warmup_steps == 0.05


def test_sdxl_character_config_caches_both_encoders_outputs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = REPO / "configs" / "sdxl_character.yaml"
    create_referenced_paths(path, tmp_path)
    monkeypatch.chdir(tmp_path)
    config = load_config(path)
    assert config.resolution == 1024 and config.enable_bucket
    assert config.min_bucket_reso < config.resolution < config.max_bucket_reso
    assert 16 <= config.lora_rank <= 32 and config.learning_rate == 1e-4
    assert config.cache_latents and config.cache_text_encoder_outputs and not config.train_text_encoder
    assert config.sample_prompts and config.sample_every_n_steps


def test_sdxl_character_config_commented_text_encoder_option_loads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The config's commented lines for training both text encoders, uncommented, give a valid config."""
    text = (REPO / "configs" / "sdxl_character.yaml").read_text(encoding="utf-8")
    options = ("# train_text_encoder: true", "# cache_text_encoder_outputs: false", "# text_encoder_lr: [")
    lines = [line.removeprefix("# ") if line.startswith(options) else line for line in text.splitlines()]
    lines = [line for line in lines if line != "cache_text_encoder_outputs: true"]
    variant = tmp_path / "variant.yaml"
    variant.write_text("\n".join(lines) + "\n", encoding="utf-8")
    create_referenced_paths(variant, tmp_path)
    monkeypatch.chdir(tmp_path)
    config = load_config(variant)
    assert config.train_text_encoder and config.text_encoder_lr == (1e-5, 1e-5)
    assert config.text_encoder_rates(2) == [1e-5, 1e-5]
