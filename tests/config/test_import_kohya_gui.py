"""`lora-scripts import` of the sd-scripts front ends: a kohya_ss GUI JSON preset and an Akegarasu
lora-scripts (SD-Trainer) TOML become a config we load."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from lora_scripts.config import load_config
from lora_scripts.config.importers import import_to_file, reference, render_report
from lora_scripts.config.importers.sd_scripts import import_sd_scripts
from lora_scripts.errors import UserError

# An SD 1.5 LoRA as kohya_ss' LoRA tab saves it (its real keys; kohya_ss writes every field, "" when unset).
KOHYA_SD15: dict[str, Any] = {
    "LoRA_type": "Standard",
    "adaptive_noise_scale": 0,
    "additional_parameters": "",
    "block_alphas": "",
    "block_dims": "",
    "bucket_no_upscale": True,
    "bucket_reso_steps": 64,
    "cache_latents": True,
    "cache_latents_to_disk": False,
    "caption_dropout_every_n_epochs": 0.0,
    "caption_dropout_rate": 0,
    "caption_extension": ".txt",
    "clip_skip": "2",
    "color_aug": False,
    "conv_alpha": 1,
    "conv_dim": 1,
    "enable_bucket": True,
    "epoch": 10,
    "flip_aug": False,
    "full_fp16": False,
    "gradient_accumulation_steps": 1,
    "gradient_checkpointing": True,
    "keep_tokens": "1",
    "learning_rate": 0.0001,
    "lora_network_weights": "",
    "lr_scheduler": "cosine",
    "lr_scheduler_num_cycles": "",
    "lr_scheduler_power": "",
    "lr_warmup": 10,
    "max_bucket_reso": 1024,
    "max_data_loader_n_workers": "0",
    "max_resolution": "512,512",
    "max_timestep": 1000,
    "max_token_length": "75",
    "max_train_epochs": "",
    "max_train_steps": "",
    "mem_eff_attn": False,
    "min_bucket_reso": 256,
    "min_snr_gamma": 5,
    "min_timestep": 0,
    "mixed_precision": "fp16",
    "module_dropout": 0,
    "multires_noise_discount": 0.3,
    "multires_noise_iterations": 6,
    "network_alpha": 8,
    "network_dim": 16,
    "network_dropout": 0,
    "noise_offset": 0.05,
    "noise_offset_type": "Original",
    "num_cpu_threads_per_process": 2,
    "optimizer": "AdamW",  # AdamW8bit needs a CUDA GPU in the loader
    "optimizer_args": "weight_decay=0.01 betas=0.9,0.99",
    "output_dir": "/out/ink",
    "output_name": "ink_v1",
    "persistent_data_loader_workers": False,
    "pretrained_model_name_or_path": "/models/v1-5-pruned.safetensors",
    "prior_loss_weight": 1.0,
    "random_crop": False,
    "rank_dropout": 0,
    "reg_data_dir": "",
    "sample_every_n_epochs": 0,
    "sample_every_n_steps": 200,
    "sample_prompts": "ink painting of a fox --n blurry --w 512 --h 512\n\nink painting of a crane",
    "sample_sampler": "euler_a",
    "save_every_n_epochs": 1,
    "save_every_n_steps": 0,
    "save_model_as": "safetensors",
    "save_precision": "fp16",
    "scale_weight_norms": 0,
    "sdxl": False,
    "seed": "1234",
    "shuffle_caption": True,
    "stop_text_encoder_training_pct": 0,
    "text_encoder_lr": 5e-05,
    "train_batch_size": 2,
    "train_data_dir": "/data/ink",
    "unet_lr": 0.0001,
    "use_wandb": False,
    "v2": False,
    "v_parameterization": False,
    "xformers": "xformers",
}

# Trimmed from kohya_ss' presets/lora/SDXL - LoRA AI_Now prodigy v1.0.json, with paths added.
KOHYA_SDXL: dict[str, Any] = {
    "LoRA_type": "Standard",
    "cache_latents": True,
    "cache_latents_to_disk": True,
    "caption_extension": ".txt",
    "clip_skip": "1",
    "conv_alpha": 32,
    "conv_dim": 32,
    "enable_bucket": True,
    "epoch": 160,
    "gradient_checkpointing": True,
    "learning_rate": 1.0,
    "lr_scheduler": "constant",
    "lr_warmup": 0,
    "max_bucket_reso": 2048,
    "max_resolution": "1024,1024",
    "min_bucket_reso": 256,
    "min_snr_gamma": 5,
    "mixed_precision": "bf16",
    "network_alpha": 16,
    "network_dim": 32,
    "noise_offset_type": "Original",
    "optimizer": "Prodigy",
    "optimizer_args": "weight_decay=0.01 decouple=True d0=0.0001 use_bias_correction=True",
    "output_dir": "/out/queen",
    "pretrained_model_name_or_path": "/models/sd_xl_base_1.0.safetensors",
    "save_every_n_epochs": 10,
    "save_precision": "bf16",
    "scale_weight_norms": 5,
    "sdxl": True,
    "sdxl_cache_text_encoder_outputs": False,
    "sdxl_no_half_vae": True,
    "seed": "",
    "text_encoder_lr": 1.0,
    "train_batch_size": 8,
    "train_data_dir": "/data/queen",
    "training_comment": "trigger: the queen of heart 1a",
    "unet_lr": 1.0,
    "xformers": "xformers",
}

# An Akegarasu lora-scripts (SD-Trainer) train TOML as its UI writes it: sd-scripts keys in sections.
AKEGARASU_TOML = """
model_train_type = "sd-lora"
pretrained_model_name_or_path = "./sd-models/model.safetensors"
v2 = false
train_data_dir = "./train/aki"
prior_loss_weight = 1
resolution = "512,512"
enable_bucket = true
min_bucket_reso = 256
max_bucket_reso = 1024
bucket_reso_steps = 64
output_name = "aki"
output_dir = "./output"
save_model_as = "safetensors"
save_precision = "fp16"
save_every_n_epochs = 2
max_train_epochs = 10
train_batch_size = 1
gradient_checkpointing = false
network_train_unet_only = false
network_train_text_encoder_only = false
learning_rate = 0.0001
unet_lr = 0.0001
text_encoder_lr = 0.00001
lr_scheduler = "cosine_with_restarts"
lr_warmup_steps = 0
lr_scheduler_num_cycles = 1
optimizer_type = "AdamW"
network_module = "networks.lora"
network_dim = 32
network_alpha = 32
log_with = "tensorboard"
logging_dir = "./logs"
caption_extension = ".txt"
shuffle_caption = true
keep_tokens = 0
max_token_length = 255
seed = 1337
clip_skip = 2
mixed_precision = "fp16"
xformers = true
lowram = false
cache_latents = true
cache_latents_to_disk = true
persistent_data_loader_workers = true
network_args_custom = ["conv_dim=8", "conv_alpha=4"]
enable_preview = false
positive_prompts = "1girl, solo"
sample_sampler = "euler_a"
sample_every_n_epochs = 1
ui_custom_params = ""
"""


def _write_json(tmp_path: Path, data: dict[str, Any], name: str = "preset.json") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(data, indent=4), encoding="utf-8")
    return path


def _line(report: Any, option: str) -> Any:
    return next(line for line in report.lines if line.option == option)


def test_kohya_sd15_preset(tmp_path: Path) -> None:
    out = tmp_path / "config.yaml"
    report = import_to_file(_write_json(tmp_path, KOHYA_SD15), out)
    config = load_config(out, check_paths=False)
    assert config.base_model == "/models/v1-5-pruned.safetensors"
    assert str(config.train_data_dir) == "/data/ink"
    assert (config.lora_rank, config.lora_alpha) == (16, 8)
    assert config.target_modules == "kohya"
    assert config.conv_rank is None  # "Standard" ignores conv_dim, as kohya_ss does
    assert config.epochs == 10
    assert config.max_train_steps is None
    assert config.resolution == 512
    assert config.optimizer_type == "AdamW"
    assert config.optimizer_args == {"weight_decay": 0.01, "betas": [0.9, 0.99]}
    assert config.lr_warmup_steps == pytest.approx(0.1)
    assert (config.batch_size, config.seed, config.clip_skip, config.keep_tokens) == (2, 1234, 2, 1)
    assert config.noise_offset == 0.05 and config.min_snr_gamma == 5
    assert config.sample_prompts == [
        "ink painting of a fox --n blurry --w 512 --h 512",
        "ink painting of a crane",
    ]
    assert config.caption_extension == ".txt"
    assert report.problems == []
    text = render_report(report, str(out))
    assert "LoRA_type 'Standard': network_module = 'networks.lora' -> target_modules: 'kohya'" in text
    assert "max_resolution = '512,512' -> resolution: 512" in text
    assert "epoch = 10 -> epochs: 10" in text
    assert "conv_dim = 1: kohya_ss passes it only for LoCon types" in text
    assert "multires_noise_iterations = 6: not passed with noise_offset_type 'Original'" in text
    assert "num_cpu_threads_per_process = 2: accelerate launch settings" in text
    assert "xformers = 'xformers': attention always uses" in text
    assert "save_every_n_steps" not in text  # 0: off in kohya_ss, which passes nothing for it
    assert report.of("unknown") == []


def test_kohya_sdxl_preset(tmp_path: Path) -> None:
    out = tmp_path / "config.yaml"
    report = import_to_file(_write_json(tmp_path, KOHYA_SDXL), out)
    config = load_config(out, check_paths=False)
    assert config.base_model == "/models/sd_xl_base_1.0.safetensors"
    assert config.resolution == 1024
    assert config.optimizer_type == "Prodigy"
    assert config.optimizer_args["d0"] == 0.0001 and config.optimizer_args["decouple"] is True
    assert config.epochs == 160 and config.batch_size == 8
    assert config.cache_latents_to_disk is True
    assert config.lr_warmup_steps == 0
    assert _line(report, "sdxl").status == "dropped"
    assert _line(report, "scale_weight_norms").status == "dropped"
    assert report.of("unknown") == []
    assert report.problems == []


@pytest.mark.parametrize(("percent", "fraction"), [(5, 0.05), (10, 0.1), ("25", 0.25), (50.0, 0.5)])
def test_lr_warmup_is_a_percent_of_the_steps(tmp_path: Path, percent: Any, fraction: float) -> None:
    preset = {**KOHYA_SD15, "lr_warmup": percent, "max_train_steps": 1000}
    imported = import_sd_scripts(_write_json(tmp_path, preset))
    assert imported.config["lr_warmup_steps"] == pytest.approx(fraction)
    assert imported.config["max_train_steps"] == 1000
    line = _line(imported.report, "lr_warmup")
    assert (line.status, line.key) == ("mapped", "lr_warmup_steps")


def test_lr_warmup_steps_of_newer_kohya_ss_wins(tmp_path: Path) -> None:
    imported = import_sd_scripts(_write_json(tmp_path, {**KOHYA_SD15, "lr_warmup_steps": 40}))
    assert imported.config["lr_warmup_steps"] == 40
    assert _line(imported.report, "lr_warmup").status == "dropped"


@pytest.mark.parametrize(("lora_type", "network_type"), [("Kohya LoCon", "lora"), ("LyCORIS/LoCon", "locon")])
def test_locon_types_train_conv_layers(tmp_path: Path, lora_type: str, network_type: str) -> None:
    out = tmp_path / "config.yaml"
    import_to_file(_write_json(tmp_path, {**KOHYA_SD15, "LoRA_type": lora_type, "conv_dim": 8}), out)
    config = load_config(out, check_paths=False)
    assert (config.conv_rank, config.conv_alpha) == (8, 1)
    assert config.target_modules == "kohya" and config.network_type == network_type


# The LyCORIS fields of kohya_ss' presets/lora/sd15 - LoKr v2.0.json (its LyCORIS/LoKr, full dimension).
KOHYA_LOKR = {
    "LoRA_type": "LyCORIS/LoKr",
    "LyCORIS_preset": "full",
    "constrain": 0.0,
    "conv_alpha": 1,
    "conv_dim": 100000,
    "decompose_both": False,
    "factor": 6,
    "module_dropout": 0,
    "network_alpha": 1,
    "network_dim": 100000,
    "network_dropout": 0,
    "rank_dropout": 0,
    "rank_dropout_scale": False,
    "rescaled": False,
    "train_norm": False,
    "train_on_input": False,
    "unit": 1,
    "use_cp": False,
    "use_scalar": False,
    "use_tucker": False,
    "dora_wd": False,
    "bypass_mode": False,
}


def test_lycoris_lokr_preset(tmp_path: Path) -> None:
    out = tmp_path / "config.yaml"
    report = import_to_file(_write_json(tmp_path, {**KOHYA_SD15, **KOHYA_LOKR}), out)
    config = load_config(out, check_paths=False)
    assert (config.network_type, config.lokr_factor, config.lora_rank, config.conv_rank) == (
        "lokr",
        6,
        100000,
        100000,
    )
    assert config.target_modules == "kohya"
    text = render_report(report, str(out))
    assert "LoRA_type 'LyCORIS/LoKr': network_args.algo = 'lokr' -> network_type: 'lokr'" in text
    assert "factor = 6 -> lokr_factor: 6" in text
    assert "use_cp = False: false: the same as leaving it out" in text
    assert report.of("unknown") == [] and report.problems == []


@pytest.mark.parametrize(
    ("fields", "network_type", "reason"),
    [
        ({"LoRA_type": "LyCORIS/LoHa"}, "loha", None),
        ({"LoRA_type": "LyCORIS/LoCon", "dora_wd": True}, "dora", None),
        ({"LoRA_type": "LyCORIS/LoHa", "dora_wd": True}, "loha", "DoRA on LoHa/LoKr is not trained here"),
        ({"LoRA_type": "LyCORIS/LoKr", "use_cp": True}, "lokr", "Tucker"),
        ({"LoRA_type": "LyCORIS/LoHa", "use_scalar": True}, "loha", "scalar"),
        ({"LoRA_type": "LyCORIS/LoKr", "decompose_both": True}, "lokr", "small factor"),
        ({"LoRA_type": "LyCORIS/LoCon", "train_norm": True}, "locon", "norm layers"),
        ({"LoRA_type": "LyCORIS/LoCon", "rank_dropout": 0.1}, "locon", "rank and module dropout"),
        ({"LoRA_type": "LyCORIS/LoCon", "module_dropout": 0.1}, "locon", "rank and module dropout"),
        ({"LoRA_type": "Kohya LoHa", "conv_dim": 0, "sdxl": True}, "loha", "no 3x3 convs"),
        ({"LoRA_type": "Standard", "factor": 4}, "lora", "only for LyCORIS types"),
    ],
)
def test_lycoris_types_and_fields(
    tmp_path: Path, fields: dict[str, Any], network_type: str, reason: str | None
) -> None:
    imported = import_sd_scripts(_write_json(tmp_path, {**KOHYA_SD15, **fields}))
    assert imported.config.get("network_type", "lora") == network_type
    dropped = [line.note for line in imported.report.of("dropped")]
    assert reason is None or any(reason in note for note in dropped), dropped


@pytest.mark.parametrize(
    ("lora_type", "reason"),
    [
        ("LyCORIS/iA3", "(IA)^3 is not trained here"),
        ("LyCORIS/DyLoRA", "DyLoRA is not trained here"),
        ("LyCORIS/Diag-OFT", "Diag-OFT is not trained here"),
        ("LyCORIS/BOFT", "BOFT is not trained here"),
        ("LyCORIS/GLoRA", "GLoRA is not trained here"),
        ("LyCORIS/Native Fine-Tuning", "native fine-tuning is not trained here"),
        ("Kohya DyLoRA", "DyLoRA is not trained here"),
        ("Flux1 OFT", "OFT is not trained here"),
    ],
)
def test_types_not_trained_are_dropped(tmp_path: Path, lora_type: str, reason: str) -> None:
    imported = import_sd_scripts(_write_json(tmp_path, {**KOHYA_SD15, "LoRA_type": lora_type}))
    line = _line(imported.report, "LoRA_type")
    assert line.status == "dropped" and reason in line.note
    assert "target_modules" not in imported.config and "network_type" not in imported.config


def test_multires_noise_type(tmp_path: Path) -> None:
    preset = {**KOHYA_SD15, "noise_offset_type": "Multires"}
    imported = import_sd_scripts(_write_json(tmp_path, preset))
    assert imported.config["multires_noise_iterations"] == 6
    assert "noise_offset" not in imported.config


def test_json_that_is_not_a_kohya_ss_preset(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="not a kohya_ss GUI preset"):
        import_sd_scripts(_write_json(tmp_path, {"name": "x"}))
    bad = tmp_path / "bad.json"
    bad.write_text("{", encoding="utf-8")
    with pytest.raises(UserError, match="not valid JSON"):
        import_sd_scripts(bad)


def test_akegarasu_toml(tmp_path: Path) -> None:
    source = tmp_path / "train.toml"
    source.write_text(AKEGARASU_TOML, encoding="utf-8")
    out = tmp_path / "config.yaml"
    report = import_to_file(source, out)
    config = load_config(out, check_paths=False)
    assert config.base_model == "./sd-models/model.safetensors"
    assert (config.lora_rank, config.lora_alpha) == (32, 32)
    assert (config.conv_rank, config.conv_alpha) == (8, 4)  # from network_args_custom
    assert config.epochs == 10
    assert config.lr_scheduler == "cosine_with_restarts"
    assert config.resolution == 512
    assert config.train_text_encoder is True
    assert config.sample_prompts is None  # enable_preview = false
    assert _line(report, "model_train_type").status == "dropped"
    assert _line(report, "ui_custom_params").status == "dropped"
    assert "enable_preview = false" in _line(report, "sample_sampler").note
    assert _line(report, "max_token_length").status == "dropped"  # 255 is not 75/150/225
    assert report.of("unknown") == []


def test_akegarasu_lycoris_fields(tmp_path: Path) -> None:
    """SD-Trainer's own LyCORIS fields (lycoris_algo, lokr_factor, ...) are the network_args its UI passes."""
    source = tmp_path / "train.toml"
    text = AKEGARASU_TOML.replace('network_module = "networks.lora"', 'network_module = "lycoris.kohya"')
    text = text.replace('network_args_custom = ["conv_dim=8", "conv_alpha=4"]\n', "")
    text += 'lycoris_algo = "lokr"\nlokr_factor = 8\nconv_dim = 4\nconv_alpha = 1\n'
    text += "dropout = 0\ntrain_norm = false\n"
    source.write_text(text, encoding="utf-8")
    out = tmp_path / "config.yaml"
    report = import_to_file(source, out)
    config = load_config(out, check_paths=False)
    assert (config.network_type, config.lokr_factor, config.conv_rank, config.conv_alpha) == ("lokr", 8, 4, 1)
    assert _line(report, "lycoris_algo").key == "network_type"
    assert "no dropout" in _line(report, "dropout").note
    assert report.of("unknown") == []


def test_akegarasu_lycoris_fields_without_lycoris_are_dropped(tmp_path: Path) -> None:
    source = tmp_path / "train.toml"
    source.write_text(AKEGARASU_TOML + 'lycoris_algo = "loha"\n', encoding="utf-8")
    imported = import_sd_scripts(source)
    assert "network_type" not in imported.config
    assert "only with network_module lycoris.kohya" in _line(imported.report, "lycoris_algo").note


def test_akegarasu_older_default_toml_sections(tmp_path: Path) -> None:
    """Akegarasu's config/default.toml: sections ([model], [optimizer], ...) and lr_restart_cycles."""
    source = tmp_path / "default.toml"
    source.write_text(
        '[model]\npretrained_model_name_or_path = "./models/model.ckpt"\n[dataset]\n'
        'train_data_dir = "./train/input"\n[additional_network]\nnetwork_dim = 32\nnetwork_alpha = 16\n'
        'network_module = "networks.lora"\n[optimizer]\nunet_lr = 1e-4\n'
        'lr_scheduler = "cosine_with_restarts"\n'
        'lr_restart_cycles = 2\n[training]\nmax_train_epochs = 10\n[saving]\noutput_dir = "./output"\n',
        encoding="utf-8",
    )
    out = tmp_path / "config.yaml"
    import_to_file(source, out)
    config = load_config(out, check_paths=False)
    assert config.lr_scheduler_num_cycles == 2 and config.lora_rank == 32


def test_the_docs_page_shows_the_kohya_ss_table() -> None:
    page = (Path(__file__).parents[2] / "docs" / "import.md").read_text(encoding="utf-8")
    assert reference.kohya_gui_table() in page
