"""`lora-scripts import`: sd-scripts config TOML, dataset TOML and command lines become a config we load."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from lora_scripts.cli import main
from lora_scripts.config import load_config
from lora_scripts.config.importers import import_to_file, reference, render_report
from lora_scripts.config.importers.sd_scripts import import_sd_scripts
from lora_scripts.config.importers.sd_scripts_table import MAPPED
from lora_scripts.errors import UserError

# An SD 1.5 run as sd-scripts' docs write it: train_network.py's options as TOML keys, in sections.
SD15_CONFIG = """
[model_arguments]
pretrained_model_name_or_path = "/models/v1-5-pruned.safetensors"

[additional_network_arguments]
network_module = "networks.lora"
network_dim = 16
network_alpha = 8
network_args = ["conv_dim=4", "conv_alpha=2"]
unet_lr = 1e-4
text_encoder_lr = 5e-5

[optimizer_arguments]
optimizer_type = "AdamW"
learning_rate = 1e-4
lr_scheduler = "cosine"
lr_warmup_steps = 100
max_grad_norm = 1.0

[training_arguments]
output_dir = "/out/ink"
output_name = "ink_v1"
save_precision = "fp16"
save_every_n_steps = 200
train_batch_size = 2
max_train_steps = 1200
mixed_precision = "bf16"
gradient_checkpointing = true
xformers = true
clip_skip = 2
seed = 7
cache_latents = true
noise_offset = 0.05
min_snr_gamma = 5.0
logging_dir = "/out/logs"

[sample_prompt_arguments]
sample_every_n_steps = 200
sample_sampler = "k_euler_a"

[dataset_arguments]
dataset_config = "dataset.toml"
"""

SD15_DATASET = """
[general]
shuffle_caption = true
caption_extension = ".txt"
keep_tokens = 1
flip_aug = true

[[datasets]]
resolution = 512
batch_size = 4
enable_bucket = true
min_bucket_reso = 256
max_bucket_reso = 1024
bucket_reso_steps = 64

  [[datasets.subsets]]
  image_dir = "/data/ink"
  num_repeats = 10
  class_tokens = "inkstyle"

  [[datasets.subsets]]
  image_dir = "/data/reg"
  is_reg = true
  color_aug = true
  flip_aug = false

  [[datasets.subsets]]
  image_dir = "/data/ft"
  metadata_file = "/data/ft/meta.json"
"""

CLI_SCRIPT = r"""#!/bin/bash
# a comment line
accelerate launch --num_cpu_threads_per_process=2 "./sd-scripts/train_network.py" \
  --pretrained_model_name_or_path="/models/my model.safetensors" \
  --train_data_dir=/data/train \
  --output_dir /out --output_name=char \
  --resolution=768,512 --enable_bucket \
  --network_module=networks.lora --network_dim 32 --network_alpha=16 \
  --network_args "conv_dim=8" "conv_alpha=4" "rank_dropout=0.1" \
  --optimizer_type=lion --optimizer_args "weight_decay=0.1" "betas=(0.9,0.99)" \
  --lr_scheduler=cosine_with_restarts --lr_scheduler_num_cycles=3 --lr_warmup_steps=0.05 \
  --max_train_epochs=10 --save_every_n_epochs=2 --network_train_unet_only \
  --xformers --color_aug --made_up_option=3
"""

SDXL_CONFIG = """
pretrained_model_name_or_path = "/models/sd_xl_base_1.0.safetensors"
output_dir = "/out/xl"
train_data_dir = "/data/xl"
resolution = "1024,1024"
network_module = "networks.lora"
network_dim = 32
network_alpha = 32
network_train_unet_only = true
cache_text_encoder_outputs = true
cache_text_encoder_outputs_to_disk = true
cache_latents_to_disk = true
learning_rate = 1.0
text_encoder_lr = [1.0, 0]
optimizer_type = "Prodigy"
optimizer_args = ["d_coef=2", "use_bias_correction=True"]
mixed_precision = "bf16"
max_train_epochs = 8
caption_extension = ".caption"
"""

FLUX_SCRIPT = r"""accelerate launch --mixed_precision bf16 flux_train_network.py \
  --pretrained_model_name_or_path flux1-dev.safetensors --clip_l clip_l.safetensors \
  --t5xxl t5xxl_fp16.safetensors --ae ae.safetensors --output_dir /out/flux \
  --train_data_dir /data/flux --network_module networks.lora_flux --network_dim 16 \
  --network_train_unet_only --cache_text_encoder_outputs --fp8_base --blocks_to_swap 18 \
  --timestep_sampling shift --discrete_flow_shift 3.1582 --model_prediction_type raw \
  --guidance_scale 1.0 --t5xxl_max_token_length 512 --learning_rate 1e-4 --max_train_steps 2000 \
  --gradient_checkpointing --mixed_precision bf16 --save_precision bf16
"""


def _write(folder: Path, name: str, text: str) -> Path:
    path = folder / name
    path.write_text(text, encoding="utf-8")
    return path


def _import(tmp_path: Path, name: str, text: str, **kwargs: Any) -> Any:
    """Import and write the YAML, then read it back with our loader (the output must load)."""
    report = import_to_file(_write(tmp_path, name, text), tmp_path / "out.yaml", **kwargs)
    assert report.problems == []
    return load_config(tmp_path / "out.yaml", check_paths=False), report


def _lines(report: Any, status: str) -> dict[str, str]:
    return {line.option: line.note for line in report.of(status)}


def test_sd15_config_and_dataset_toml(tmp_path: Path) -> None:
    _write(tmp_path, "dataset.toml", SD15_DATASET)
    config, report = _import(tmp_path, "config.toml", SD15_CONFIG)
    assert config.base_model == "/models/v1-5-pruned.safetensors"
    assert (config.lora_rank, config.lora_alpha, config.conv_rank, config.conv_alpha) == (16, 8, 4, 2)
    assert config.target_modules == "kohya" and config.train_text_encoder is True
    assert (config.unet_lr, config.text_encoder_lr, config.learning_rate) == (1e-4, 5e-5, 1e-4)
    assert (config.lr_scheduler, config.lr_warmup_steps, config.max_train_steps) == ("cosine", 100, 1200)
    assert (config.save_steps, config.save_precision, config.mixed_precision) == (200, "fp16", "bf16")
    assert (config.clip_skip, config.seed, config.noise_offset, config.min_snr_gamma) == (2, 7, 0.05, 5.0)
    assert config.sample_sampler == "euler_a" and config.sample_every_n_steps == 200
    assert str(config.output_dir) == "/out/ink" and config.output_name == "ink_v1"
    # [general] and dataset-level keys are top-level; each subset is one datasets entry.
    assert (config.batch_size, config.enable_bucket, config.shuffle_caption, config.flip_aug) == (
        4,
        True,
        True,
        True,
    )
    assert config.caption_extension == ".txt" and config.keep_tokens == 1
    ink, reg, ft = config.datasets
    assert (str(ink.train_data_dir), ink.num_repeats, ink.resolution, ink.is_reg) == (
        "/data/ink",
        10,
        512,
        False,
    )
    assert (reg.is_reg, reg.flip_aug, reg.num_repeats) == (True, False, 1)
    assert str(ft.train_data_dir) == "/data/ft"
    dropped = _lines(report, "dropped")
    assert "caption files" in dropped["datasets[0].subsets[0].class_tokens"]
    assert dropped["datasets[0].subsets[1].color_aug"] == "no equivalent here"
    assert "metadata.csv" in dropped["datasets[0].subsets[2].metadata_file"]
    assert "scaled_dot_product_attention" in dropped["xformers"]


def test_command_line_with_continuations(tmp_path: Path) -> None:
    config, report = _import(tmp_path, "train.sh", CLI_SCRIPT)
    assert config.base_model == "/models/my model.safetensors"
    assert str(config.train_data_dir) == "/data/train" and str(config.output_dir) == "/out"
    assert config.resolution == 624  # 768x512 keeps its area: sqrt(768*512) = 627 -> a multiple of 8
    assert (config.lora_rank, config.lora_alpha, config.conv_rank, config.conv_alpha) == (32, 16, 8, 4)
    assert config.optimizer_type == "Lion"
    assert config.optimizer_args == {"weight_decay": 0.1, "betas": [0.9, 0.99]}
    assert (config.lr_scheduler_num_cycles, config.lr_warmup_steps, config.epochs) == (3, 0.05, 10)
    assert config.train_text_encoder is False
    # sd-scripts' own defaults where ours differ.
    assert (config.learning_rate, config.caption_extension, config.save_precision) == (
        2e-6,
        ".caption",
        "fp32",
    )
    dropped = _lines(report, "dropped")
    assert set(dropped) >= {"network_args.rank_dropout", "save_every_n_epochs", "xformers", "color_aug"}
    assert "save_steps" in dropped["save_every_n_epochs"]
    assert _lines(report, "unknown") == {"made_up_option": "not an option the importer knows"}


def test_sdxl_toml(tmp_path: Path) -> None:
    config, report = _import(tmp_path, "sdxl.toml", SDXL_CONFIG)
    assert config.resolution == 1024 and tuple(config.text_encoder_lr) == (1.0, 0)
    assert config.train_text_encoder is False and config.cache_text_encoder_outputs is True
    assert config.cache_latents_to_disk is True and config.optimizer_type == "Prodigy"
    assert config.optimizer_args == {"d_coef": 2, "use_bias_correction": True}
    assert (config.lora_rank, config.lora_alpha, config.epochs, config.max_train_steps) == (32, 32, 8, None)
    assert (
        "on-disk" in {line.option: line.note for line in report.lines}["cache_text_encoder_outputs_to_disk"]
    )


def test_flux_command_line(tmp_path: Path) -> None:
    config, report = _import(tmp_path, "flux.txt", FLUX_SCRIPT)
    assert [str(p) for p in (config.vae, config.clip_l, config.t5xxl)] == [
        "ae.safetensors",
        "clip_l.safetensors",
        "t5xxl_fp16.safetensors",
    ]
    assert (config.timestep_sampling, config.discrete_flow_shift, config.model_prediction_type) == (
        "shift",
        3.1582,
        "raw",
    )
    assert (config.guidance_scale, config.t5xxl_max_token_length, config.blocks_to_swap) == (1.0, 512, 18)
    assert config.quantize_base == "float8" and config.max_train_steps == 2000
    assert config.target_modules == "kohya"  # networks.lora_flux: every linear of the double/single blocks
    assert "network_module" not in _lines(report, "dropped")


def test_flux_defaults_of_sd_scripts(tmp_path: Path) -> None:
    source = _write(
        tmp_path, "f.sh", "python flux_train_network.py --pretrained_model_name_or_path m --ae a\n"
    )
    imported = import_sd_scripts(source)
    assert imported.config["model_prediction_type"] == "sigma_scaled"
    assert imported.config["guidance_scale"] == 3.5 and imported.config["discrete_flow_shift"] == 3.0
    assert imported.config["max_train_steps"] == 1600
    assert "sigma" in _lines(imported.report, "dropped")["timestep_sampling"]


# One source value per mapped option, and what it must become. Every option of the table is here.
MAPPING_CASES: dict[str, tuple[Any, Any]] = {
    "pretrained_model_name_or_path": ("m.safetensors", "m.safetensors"),
    "output_dir": ("/o", "/o"),
    "output_name": ("n", "n"),
    "train_data_dir": ("/d", "/d"),
    "reg_data_dir": ("/r", "/r"),
    "num_repeats": ("3", 3),
    "prior_loss_weight": ("0.5", 0.5),
    "network_module": ("networks.lora", "kohya"),
    "network_dim": ("32", 32),
    "network_alpha": ("16", 16.0),
    "network_dropout": ("0.1", 0.1),
    "network_weights": ("w.safetensors", "w.safetensors"),
    "network_args.conv_dim": ("8", 8),
    "network_args.conv_alpha": ("4", 4.0),
    "network_args.algo": ("loha", "loha"),
    "network_args.dora_wd": ("True", "dora"),
    "network_args.wd_on_output": ("False", "dora"),
    "network_args.factor": ("8", 8),
    "network_args.full_matrix": ("True", True),
    "network_args.dropout": ("0.1", 0.1),
    "network_args.preset": ("attn-mlp", "kohya"),
    "network_train_unet_only": (True, False),
    "learning_rate": ("2e-4", 2e-4),
    "unet_lr": (1e-4, 1e-4),
    "text_encoder_lr": (["5e-5", "0"], [5e-5, 0.0]),
    "lr_scheduler": ("polynomial", "polynomial"),
    "lr_warmup_steps": ("150", 150),
    "lr_scheduler_num_cycles": ("2", 2),
    "lr_restart_cycles": (3, 3),
    "prompt_file": ("prompts.txt", "prompts.txt"),
    "lr_scheduler_power": ("0.5", 0.5),
    "optimizer_type": ("lion", "Lion"),
    "optimizer_args": (["eps=1e-8"], {"eps": 1e-8}),
    "use_8bit_adam": (True, "AdamW8bit"),
    "use_lion_optimizer": (True, "Lion"),
    "max_train_steps": ("500", 500),
    "max_train_epochs": ("5", 5),
    "train_batch_size": ("3", 3),
    "gradient_accumulation_steps": ("4", 4),
    "gradient_checkpointing": (True, True),
    "max_grad_norm": ("0", 0.0),
    "mixed_precision": ("fp16", "fp16"),
    "fp8_base": (True, "float8"),
    "fp8_base_unet": (True, "float8"),
    "seed": ("1", 1),
    "max_data_loader_n_workers": ("2", 2),
    "torch_compile": (True, True),
    "save_precision": ("float", "fp32"),
    "save_every_n_steps": ("100", 100),
    "save_state": (True, True),
    "resume": ("/o/state", "/o/state"),
    "logging_dir": ("/logs", "/logs"),
    "caption_extension": (".txt", ".txt"),
    "caption_extention": (".txt", ".txt"),
    "shuffle_caption": (True, True),
    "keep_tokens": ("2", 2),
    "caption_separator": (";", ";"),
    "caption_prefix": ("sks", "sks"),
    "caption_suffix": ("photo", "photo"),
    "caption_dropout_rate": ("0.1", 0.1),
    "caption_tag_dropout_rate": ("0.2", 0.2),
    "flip_aug": (True, True),
    "random_crop": (True, True),
    "resolution": ("512", 512),
    "enable_bucket": (True, True),
    "min_bucket_reso": ("320", 320),
    "max_bucket_reso": ("1536", 1536),
    "bucket_reso_steps": ("32", 32),
    "bucket_no_upscale": (True, True),
    "cache_latents": (True, True),
    "cache_latents_to_disk": (True, True),
    "cache_text_encoder_outputs": (True, True),
    "cache_text_encoder_outputs_to_disk": (True, True),
    "noise_offset": ("0.1", 0.1),
    "multires_noise_iterations": ("6", 6),
    "multires_noise_discount": ("0.3", 0.3),
    "min_snr_gamma": ("5", 5.0),
    "zero_terminal_snr": (True, True),
    "clip_skip": ("2", 2),
    "max_token_length": ("225", 225),
    "loss_type": ("huber", "huber"),
    "huber_c": ("0.2", 0.2),
    "huber_schedule": ("exponential", "exponential"),
    "v_parameterization": (True, True),
    "sample_prompts": ("prompts.txt", "prompts.txt"),
    "sample_every_n_steps": ("50", 50),
    "sample_every_n_epochs": ("1", 1),
    "sample_at_first": (True, True),
    "sample_sampler": ("dpmsolver++", "dpm++ 2m"),
    "validation_split": ("0.1", 0.1),
    "validate_every_n_steps": ("100", 100),
    "ae": ("ae.safetensors", "ae.safetensors"),
    "clip_l": ("clip_l.safetensors", "clip_l.safetensors"),
    "t5xxl": ("t5.safetensors", "t5.safetensors"),
    "timestep_sampling": ("flux_shift", "flux_shift"),
    "discrete_flow_shift": ("3.0", 3.0),
    "sigmoid_scale": ("1.5", 1.5),
    "model_prediction_type": ("sigma_scaled", "sigma_scaled"),
    "guidance_scale": ("3.5", 3.5),
    "t5xxl_max_token_length": ("256", 256),
    "blocks_to_swap": ("10", 10),
}


def test_every_mapped_option_has_a_case() -> None:
    assert set(MAPPING_CASES) == set(MAPPED)


@pytest.mark.parametrize("option", sorted(MAPPING_CASES))
def test_option_mapping(option: str) -> None:
    value, expected = MAPPING_CASES[option]
    rule = MAPPED[option]
    assert rule.key is not None
    assert rule.convert(value) == expected


@pytest.mark.parametrize(
    ("option", "value", "reason"),
    [
        ("optimizer_type", "DAdaptAdam", "optimizer_type 'DAdaptAdam' has no equivalent"),
        ("lr_scheduler", "adafactor", "lr_scheduler 'adafactor' has no equivalent"),
        ("timestep_sampling", "sigma", "sampling 'sigma' has no equivalent"),
        ("sample_sampler", "k_dpm_2", "sample_sampler 'k_dpm_2' has no equivalent"),
        ("network_module", "networks.oft", "networks.oft trains another kind of network"),
        ("max_token_length", "300", "max_token_length 300 has no equivalent"),
    ],
)
def test_value_without_equivalent_is_dropped_with_reason(
    tmp_path: Path, option: str, value: str, reason: str
) -> None:
    source = _write(tmp_path, "t.sh", f"python train_network.py --{option}={value}\n")
    assert reason in _lines(import_sd_scripts(source).report, "dropped")[option]


def _lycoris(tmp_path: Path, *args: str, extra: str = "") -> tuple[Any, Any]:
    """An SDXL run of LyCORIS' kohya module with these network_args, imported and loaded."""
    items = ", ".join(f'"{arg}"' for arg in args)
    text = (
        'pretrained_model_name_or_path = "/m/sdxl.safetensors"\noutput_dir = "/o"\ntrain_data_dir = "/d"\n'
        f'network_module = "lycoris.kohya"\nnetwork_dim = 16\nnetwork_alpha = 8\nnetwork_args = [{items}]\n'
        + extra
    )
    folder = tmp_path / f"run{len(list(tmp_path.iterdir()))}"  # one folder per import of a test
    folder.mkdir()
    return _import(folder, "lycoris.toml", text)


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (("algo=loha",), ("loha", 16, 8.0)),  # LyCORIS trains the 3x3 convs at network_dim / network_alpha
        (("algo=lokr", "factor=8", "conv_dim=4"), ("lokr", 4, 4.0)),
        (("algo=lora",), ("locon", 16, 8.0)),  # lora and locon are one algo: the convs too
        (("algo=locon", "conv_dim=8", "conv_alpha=2"), ("locon", 8, 2.0)),
        (("algo=lora", "preset=attn-mlp"), ("lora", None, None)),
        (("algo=locon", "dora_wd=True"), ("dora", 16, 8.0)),
        ((), ("locon", 16, 8.0)),  # LyCORIS' default algo is lora
    ],
)
def test_lycoris_network_args(tmp_path: Path, args: tuple[str, ...], expected: tuple[Any, ...]) -> None:
    config, _ = _lycoris(tmp_path, *args)
    assert (config.network_type, config.conv_rank, config.conv_alpha) == expected
    assert config.target_modules == "kohya"
    assert config.lokr_factor == (8 if "factor=8" in args else -1)


def test_lycoris_lokr_full_matrix_and_dropout(tmp_path: Path) -> None:
    config, report = _lycoris(tmp_path, "algo=lokr", "factor=4", "full_matrix=True", "dropout=0.1")
    assert (config.network_type, config.lokr_factor, config.lokr_full_matrix) == ("lokr", 4, True)
    assert config.network_dropout == 0
    assert "no dropout" in _lines(report, "dropped")["network_args.dropout"]
    config, report = _lycoris(
        tmp_path, "algo=locon", "dropout=0.1", "factor=4", extra="network_dropout = 0.3\n"
    )
    assert config.network_dropout == 0.1 and config.lokr_factor == -1
    dropped = _lines(report, "dropped")
    assert "LoKr only" in dropped["network_args.factor"] and "LyCORIS ignores" in dropped["network_dropout"]


def test_lycoris_dora_axis_and_dora_on_loha(tmp_path: Path) -> None:
    config, report = _lycoris(tmp_path, "algo=lora", "dora_wd=True")
    assert config.network_type == "dora"
    assert "per output channel" in _lines(report, "mapped")["network_args.dora_wd"]  # LyCORIS 3.2's default
    config, report = _lycoris(tmp_path, "algo=lora", "dora_wd=True", "wd_on_output=True")
    assert config.network_type == "dora"
    assert "per output channel" in _lines(report, "dropped")["network_args.wd_on_output"]
    config, report = _lycoris(tmp_path, "algo=lora", "dora_wd=True", "wd_on_output=False", "wd_on_out=True")
    assert _lines(report, "mapped")["network_args.wd_on_output"] == "a magnitude per input channel, as here"
    assert "reads wd_on_output" in _lines(report, "dropped")["network_args.wd_on_out"]
    config, report = _lycoris(tmp_path, "algo=loha", "dora_wd=True")
    assert config.network_type == "loha"
    assert _lines(report, "dropped")["network_args.dora_wd"] == (
        "DoRA on LoHa/LoKr is not trained here; the LoHa/LoKr is kept"
    )


@pytest.mark.parametrize(
    ("arg", "reason"),
    [
        ("algo=ia3", "(IA)^3 is not trained here"),
        ("algo=diag-oft", "Diag-OFT is not trained here"),
        ("algo=boft", "BOFT is not trained here"),
        ("algo=glora", "GLoRA is not trained here"),
        ("algo=full", "native fine-tuning"),
        ("algo=dylora", "DyLoRA is not trained here"),
        ("use_tucker=True", "Tucker"),
        ("use_cp=True", "Tucker"),
        ("use_scalar=True", "scalar"),
        ("bypass_mode=True", "bypass"),
        ("rank_dropout=0.1", "rank and module dropout"),
        ("module_dropout=0.1", "rank and module dropout"),
        ("train_norm=True", "norm layers"),
        ("decompose_both=True", "small factor"),
        ("preset=attn-only", "preset 'attn-only' has no equivalent"),
        ("use_tucker=False", "false: the same as leaving it out"),
    ],
)
def test_lycoris_options_not_trained_are_dropped_with_reason(tmp_path: Path, arg: str, reason: str) -> None:
    config, report = _lycoris(tmp_path, "algo=lokr", arg)
    assert reason in _lines(report, "dropped")[f"network_args.{arg.partition('=')[0]}"]


def test_lycoris_args_with_networks_lora_and_sd_scripts_lokr(tmp_path: Path) -> None:
    source = _write(
        tmp_path, "t.sh", "python train_network.py --network_module networks.lora --network_args algo=loha\n"
    )
    imported = import_sd_scripts(source)
    assert "network_type" not in imported.config
    assert "networks.lora ignores it" in _lines(imported.report, "dropped")["network_args.algo"]
    source = _write(
        tmp_path,
        "t.sh",
        "python sdxl_train_network.py --network_module networks.lokr --network_args factor=4\n",
    )
    imported = import_sd_scripts(source)
    assert imported.config["network_type"] == "lokr" and imported.config["lokr_factor"] == 4
    assert imported.config["target_modules"] == "kohya"


def test_report_text_lists_dropped_keys_with_reasons(tmp_path: Path) -> None:
    report = import_to_file(_write(tmp_path, "t.sh", CLI_SCRIPT), tmp_path / "out.yaml")
    text = render_report(report, "out.yaml")
    assert "  network_dim = '32' -> lora_rank: 32\n" in text
    assert "  save_every_n_epochs = '2': saving is by steps only here; use save_steps\n" in text
    assert "  made_up_option = '3': not an option the importer knows\n" in text
    assert "(not set) -> caption_extension: '.caption'" in text


def test_missing_required_keys_are_reported_not_raised(tmp_path: Path) -> None:
    report = import_to_file(
        _write(tmp_path, "t.sh", "python train_network.py --network_dim=8\n"), tmp_path / "o.yaml"
    )
    assert any("base_model" in problem for problem in report.problems)
    assert (tmp_path / "o.yaml").is_file()


def test_cli_never_overwrites_without_force(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = _write(tmp_path, "sdxl.toml", SDXL_CONFIG)
    output = _write(tmp_path, "config.yaml", "keep: me\n")
    assert main(["import", str(source), "-o", str(output)]) == 2
    assert "already exists" in capsys.readouterr().err and output.read_text() == "keep: me\n"
    assert main(["import", str(source), "-o", str(output), "--force"]) == 0
    assert "Mapped:" in capsys.readouterr().out
    assert load_config(output, check_paths=False).lora_rank == 32


def test_cli_dataset_config_option(tmp_path: Path) -> None:
    dataset = _write(tmp_path, "ds.toml", SD15_DATASET)
    source = _write(
        tmp_path,
        "t.sh",
        "python train_network.py --train_data_dir=/ignored --output_dir=/o "
        "--pretrained_model_name_or_path=m\n",
    )
    assert (
        main(["import", str(source), "--dataset-config", str(dataset), "-o", str(tmp_path / "c.yaml")]) == 0
    )
    config = load_config(tmp_path / "c.yaml", check_paths=False)
    assert config.train_data_dir is None and len(config.datasets) == 3


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("x.toml", "a = [", "not valid TOML"),
        ("x.sh", "echo hello\n", "no sd-scripts command found"),
        ("x.sh", "python train_network.py --a 'b\n", "cannot read the command line"),
    ],
)
def test_user_errors(tmp_path: Path, name: str, text: str, message: str) -> None:
    with pytest.raises(UserError, match=message):
        import_sd_scripts(_write(tmp_path, name, text))
    with pytest.raises(UserError, match="no such file"):
        import_sd_scripts(tmp_path / "missing.toml")


def test_the_docs_page_shows_the_importers_own_tables() -> None:
    """docs/import.md's mapped and dropped tables are what `python -m lora_scripts.config.importers.reference`
    prints from the importer's table: a changed rule without the page fails here."""
    page = (Path(__file__).parents[2] / "docs" / "import.md").read_text(encoding="utf-8")
    assert reference.mapped_table() in page
    assert reference.dropped_table() in page
