"""`lora-scripts import` of an ai-toolkit YAML job and a OneTrainer JSON config (their real keys)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from lora_scripts.config import load_config
from lora_scripts.config.importers import import_to_file, reference, render_report
from lora_scripts.errors import UserError

AI_TOOLKIT_FLUX = """\
job: extension
config:
  name: "my_first_flux_lora_v1"
  process:
    - type: 'sd_trainer'
      training_folder: "output"
      device: cuda:0
      trigger_word: "p3r5on"
      network:
        type: "lora"
        linear: 16
        linear_alpha: 16
      save:
        dtype: float16
        save_every: 250
        max_step_saves_to_keep: 4
        push_to_hub: false
      datasets:
        - folder_path: "/path/to/images/folder"
          caption_ext: "txt"
          caption_dropout_rate: 0.05
          shuffle_tokens: false
          cache_latents_to_disk: true
          resolution: [ 512, 768, 1024 ]
      train:
        batch_size: 1
        steps: 2000
        gradient_accumulation_steps: 1
        train_unet: true
        train_text_encoder: false
        gradient_checkpointing: true
        noise_scheduler: "flowmatch"
        optimizer: "adamw"  # the example says adamw8bit; CPU tests cannot load bitsandbytes
        lr: 1e-4
        ema_config:
          use_ema: true
          ema_decay: 0.99
        dtype: bf16
      model:
        name_or_path: "black-forest-labs/FLUX.1-dev"
        is_flux: true
        quantize: true
        low_vram: true
      sample:
        sampler: "flowmatch"
        sample_every: 250
        width: 1024
        height: 1024
        prompts:
          - "[trigger] holding a sign that says 'I LOVE PROMPTS!'"
          - "a bear building a log cabin in the snow covered mountains"
        neg: ""
        seed: 42
        walk_seed: true
        guidance_scale: 4
        sample_steps: 20
meta:
  name: "[name]"
  version: '1.0'
"""

AI_TOOLKIT_SDXL = """\
job: extension
config:
  name: "sdxl_style"
  process:
    - type: sd_trainer
      training_folder: /runs
      network: {type: lora, linear: 32, linear_alpha: 16, conv: 8, conv_alpha: 4}
      save: {dtype: bf16, save_every: 500}
      datasets:
        - {folder_path: /data/style, caption_ext: caption, num_repeats: 3, resolution: [1024]}
      train:
        batch_size: 2
        steps: 3000
        train_text_encoder: true
        optimizer: prodigy
        lr: 1.0
        lr_scheduler: cosine
        content_or_style: style
        timestep_type: sigmoid
        skip_first_sample: true
        dtype: fp16
      model: {name_or_path: stabilityai/stable-diffusion-xl-base-1.0, is_xl: true}
      sample:
        sample_every: 500
        width: 832
        height: 1216
        prompts: ["a castle, ink painting"]
        neg: "blurry"
        seed: 7
        guidance_scale: 6
        sample_steps: 28
"""

# An SD 1.5 LoRA config as OneTrainer saves it (TrainConfig's keys; a subset of its many fields).
ONETRAINER_SD15: dict[str, Any] = {
    "__version": 6,
    "training_method": "LORA",
    "model_type": "STABLE_DIFFUSION_15",
    "debug_mode": False,
    "workspace_dir": "workspace/run",
    "cache_dir": "workspace-cache/run",
    "tensorboard": True,
    "base_model_name": "runwayml/stable-diffusion-v1-5",
    "weight_dtype": "FLOAT_16",
    "output_dtype": "FLOAT_16",
    "output_model_format": "SAFETENSORS",
    "output_model_destination": "models/ink.safetensors",
    "gradient_checkpointing": "ON",
    "concept_file_name": "training_concepts/concepts.json",
    "concepts": [
        {
            "name": "ink",
            "path": "/data/ink",
            "enabled": True,
            "include_subdirectories": False,
            "image_variations": 1,
            "balancing": 2.0,
            "balancing_strategy": "REPEATS",
            "image": {"enable_crop_jitter": True, "enable_random_flip": False, "enable_random_rotate": False},
            "text": {
                "prompt_source": "sample",
                "prompt_path": "",
                "enable_tag_shuffling": True,
                "keep_tags_count": 1,
            },
        }
    ],
    "aspect_ratio_bucketing": True,
    "latent_caching": True,
    "learning_rate_scheduler": "COSINE",
    "learning_rate": 0.0003,
    "learning_rate_warmup_steps": 200,
    "learning_rate_cycles": 1,
    "epochs": 100,
    "batch_size": 4,
    "gradient_accumulation_steps": 1,
    "ema": "OFF",
    "train_dtype": "FLOAT_16",
    "resolution": "512",
    "text_encoder": {"train": True, "learning_rate": 0.0001, "weight_dtype": "NONE"},
    "unet": {"train": True, "learning_rate": 0.0003, "weight_dtype": "NONE"},
    "text_encoder_layer_skip": 1,
    "offset_noise_weight": 0.05,
    "lora_rank": 16,
    "lora_alpha": 1.0,
    "optimizer": {"optimizer": "ADAMW", "weight_decay": 0.01, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8},
    "sample_after": 10,
    "sample_after_unit": "MINUTE",
    "save_every": 500,
    "save_every_unit": "STEP",
    "samples": [
        {
            "enabled": True,
            "prompt": "an ink cat",
            "negative_prompt": "blurry",
            "height": 512,
            "width": 512,
            "seed": 42,
            "random_seed": False,
            "diffusion_steps": 20,
            "cfg_scale": 7.0,
        }
    ],
    "masked_training": False,
}

ONETRAINER_FLUX: dict[str, Any] = {
    "training_method": "LORA",
    "model_type": "FLUX_DEV_1",
    "base_model_name": "black-forest-labs/FLUX.1-dev",
    "batch_size": 4,
    "learning_rate": 0.0003,
    "output_model_destination": "models/lora.safetensors",
    "output_model_format": "SAFETENSORS",
    "resolution": "768",
    "prior": {"train": True, "weight_dtype": "NFLOAT_4"},
    "text_encoder": {"train": False, "weight_dtype": "NFLOAT_4"},
    "text_encoder_2": {"train": False},
    "vae": {"weight_dtype": "FLOAT_32"},
    "train_dtype": "BFLOAT_16",
    "weight_dtype": "BFLOAT_16",
    "timestep_distribution": "LOGIT_NORMAL",
    "concepts": [{"path": "/data/me", "text": {"prompt_source": "filename"}}],
    "sample_after": 2,
    "sample_after_unit": "EPOCH",
    "samples": [{"prompt": "photo of me", "width": 768, "height": 768, "seed": 1}],
}


def _run(tmp_path: Path, name: str, text: str) -> tuple[dict[str, Any], str, Path]:
    source = tmp_path / name
    source.write_text(text, encoding="utf-8")
    out = tmp_path / "config.yaml"
    report = import_to_file(source, out)
    load_config(out, check_paths=False)
    return yaml.safe_load(out.read_text(encoding="utf-8")), render_report(report, str(out)), out


def test_ai_toolkit_flux_job(tmp_path: Path) -> None:
    config, report, _ = _run(tmp_path, "flux.yaml", AI_TOOLKIT_FLUX)
    assert config["base_model"] == "black-forest-labs/FLUX.1-dev"
    assert config["output_dir"] == "output/my_first_flux_lora_v1"
    assert config["output_name"] == "my_first_flux_lora_v1"
    assert (config["lora_rank"], config["lora_alpha"], config["target_modules"]) == (16, 16.0, "kohya")
    assert config["quantize_base"] == "float8" and config["memory_profile"] == "low"
    assert config["max_train_steps"] == 2000 and config["learning_rate"] == 1e-4
    assert config["optimizer_type"] == "AdamW" and config["mixed_precision"] == "bf16"
    assert config["save_precision"] == "fp16" and config["save_steps"] == 250
    assert [d["resolution"] for d in config["datasets"]] == [512, 768, 1024]
    assert config["datasets"][0] == {
        "train_data_dir": "/path/to/images/folder",
        "caption_extension": ".txt",
        "shuffle_caption": False,
        "resolution": 512,
    }
    assert config["resolution"] == 1024 and config["enable_bucket"] is True
    assert config["caption_dropout_rate"] == 0.05 and config["cache_latents_to_disk"] is True
    assert config["sample_prompts"] == [
        "p3r5on holding a sign that says 'I LOVE PROMPTS!' --w 1024 --h 1024 --s 20 --l 4 --d 42",
        "a bear building a log cabin in the snow covered mountains --w 1024 --h 1024 --s 20 --l 4 --d 43",
    ]
    assert config["sample_every_n_steps"] == 250 and config["sample_at_first"] is True
    assert "train.ema_config" in report and "no EMA" in report
    assert "Unknown" not in report


def test_ai_toolkit_sdxl_job(tmp_path: Path) -> None:
    config, report, _ = _run(tmp_path, "sdxl.yml", AI_TOOLKIT_SDXL)
    assert config["output_dir"] == "/runs/sdxl_style"
    assert (config["conv_rank"], config["conv_alpha"]) == (8, 4.0)
    assert config["optimizer_type"] == "Prodigy" and config["lr_scheduler"] == "cosine"
    assert config["timestep_sampling"] == "sigmoid" and config["train_text_encoder"] is True
    assert config["datasets"] == [
        {
            "train_data_dir": "/data/style",
            "caption_extension": ".caption",
            "num_repeats": 3,
            "resolution": 1024,
        }
    ]
    assert config["sample_prompts"] == [
        "a castle, ink painting --w 832 --h 1216 --s 28 --l 6 --d 7 --n blurry"
    ]
    assert config["sample_at_first"] is False
    assert "train.content_or_style" in report


def test_onetrainer_sd15(tmp_path: Path) -> None:
    config, report, _ = _run(tmp_path, "ot.json", json.dumps(ONETRAINER_SD15))
    assert config["base_model"] == "runwayml/stable-diffusion-v1-5"
    assert (config["output_dir"], config["output_name"]) == ("models", "ink")
    assert (config["lora_rank"], config["lora_alpha"]) == (16, 1.0)
    assert config["lr_scheduler"] == "cosine" and config["lr_warmup_steps"] == 200
    assert config["epochs"] == 100 and config["batch_size"] == 4 and config["resolution"] == 512
    assert config["mixed_precision"] == "fp16" and config["save_precision"] == "fp16"
    assert config["train_text_encoder"] is True and config["text_encoder_lr"] == 0.0001
    assert config["unet_lr"] == 0.0003 and config["clip_skip"] == 2
    assert config["gradient_checkpointing"] is True and config["save_steps"] == 500
    assert config["optimizer_type"] == "AdamW" and config["adam_weight_decay"] == 0.01
    assert config["optimizer_args"] == {"eps": 1e-8, "betas": [0.9, 0.999]}
    assert config["datasets"] == [
        {
            "train_data_dir": "/data/ink",
            "num_repeats": 2,
            "caption_extension": ".txt",
            "shuffle_caption": True,
            "keep_tokens": 1,
            "flip_aug": False,  # OneTrainer's enable_random_flip (on by default: see the FLUX config)
        }
    ]
    assert "concepts[0].image = 'enable_crop_jitter': OneTrainer's other augmentations" in report
    assert config["sample_prompts"] == ["an ink cat --w 512 --h 512 --d 42 --s 20 --l 7.0 --n blurry"]
    assert "sample_every_n_steps" not in config and "MINUTE: no equivalent" in report
    assert "Unknown" not in report


def test_onetrainer_flux(tmp_path: Path) -> None:
    config, report, _ = _run(tmp_path, "flux.json", json.dumps(ONETRAINER_FLUX))
    assert config["base_model"] == "black-forest-labs/FLUX.1-dev" and config["resolution"] == 768
    assert config["quantize_base"] == "int8" and config["train_text_encoder"] is False
    assert config["sample_every_n_epochs"] == 2
    assert config["datasets"] == [{"train_data_dir": "/data/me", "flip_aug": True}]
    assert "prompt_source = 'filename'" in report


def test_onetrainer_refuses_a_fine_tune(tmp_path: Path) -> None:
    source = tmp_path / "ft.json"
    source.write_text(json.dumps({**ONETRAINER_SD15, "training_method": "FINE_TUNE"}), encoding="utf-8")
    with pytest.raises(UserError, match="training_method FINE_TUNE: only LORA runs are imported"):
        import_to_file(source, tmp_path / "out.yaml")


def test_the_docs_page_shows_both_key_tables() -> None:
    page = (Path(__file__).parents[2] / "docs" / "import.md").read_text(encoding="utf-8")
    assert reference.ai_toolkit_table() in page and reference.onetrainer_table() in page
