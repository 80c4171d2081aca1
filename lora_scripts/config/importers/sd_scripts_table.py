"""sd-scripts option -> our key + converter, or the reason it is dropped. One entry per option name as
train_network.py (and sdxl_/flux_train_network.py) spell it; docs/import.md shows the same table."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lora_scripts.config.importers import converters as c


@dataclass(frozen=True)
class Rule:
    """`key` is ours (None: dropped, `note` says why); `convert` raises ValueError for a value without an
    equivalent (the option is then dropped with that reason)."""

    key: str | None
    convert: c.Converter = c.same
    note: str = ""


def _const(value: Any) -> c.Converter:
    return lambda flag: value if c.true_if_set(flag) else None


def _not_flag(flag: Any) -> bool:
    return not c.true_if_set(flag)


# Network modules of the kohya family whose layer set is our `kohya` preset, and the network_type each trains
# (None: network_args.algo picks it, LyCORIS' lycoris.kohya).
NETWORK_MODULES: dict[str, str | None] = {
    "networks.lora": "lora",
    "networks.lora_flux": "lora",
    "networks.loha": "loha",  # sd-scripts' own LoHa/LoKr: networks.lora's layers, LyCORIS' tensors
    "networks.lokr": "lokr",
    "lycoris.kohya": None,
}


def _network_module(value: Any) -> str:
    name = str(value).strip()
    if name in NETWORK_MODULES:
        # networks.lora: every linear and 1x1 conv of the UNet's transformer blocks; networks.lora_flux: every
        # linear layer of FLUX.1's double and single blocks. Our `kohya` preset is each family's same set.
        # LyCORIS' preset full adds the ResNet blocks (its convs: see network_args.algo) and conv_in/out.
        return "kohya"
    raise ValueError(
        f"{name} trains another kind of network; LoRA, LoCon, LoHa, LoKr and DoRA "
        "(networks.lora, networks.loha, networks.lokr, lycoris.kohya) are trained here"
    )


# LyCORIS' algo (network_args, with lycoris.kohya) -> our network_type; LyCORIS' lora and locon are one
# algorithm, which trains the 3x3 convs too (conv_dim defaults to network_dim): our locon.
LYCORIS_ALGOS = {"lora": "locon", "locon": "locon", "loha": "loha", "lokr": "lokr"}
LYCORIS_NOT_TRAINED = {
    "ia3": "(IA)^3 is not trained here",
    "diag-oft": "Diag-OFT is not trained here",
    "boft": "BOFT is not trained here",
    "glora": "GLoRA is not trained here",
    "glokr": "GLoKr is not trained here",
    "full": "LyCORIS' native fine-tuning (a full weight difference) is not trained here",
    "dylora": "DyLoRA is not trained here",
}


def _lycoris_algo(value: Any) -> str:
    name = str(value).strip().strip("\"'").lower()
    if name in LYCORIS_ALGOS:
        return LYCORIS_ALGOS[name]
    reason = LYCORIS_NOT_TRAINED.get(name, f"LyCORIS algo '{name}' is not trained here")
    raise ValueError(f"{reason}; the import keeps a LoRA of the same layers (lora, locon, loha, lokr, dora)")


def _dora_wd(value: Any) -> str:
    if not c.as_bool(value):
        raise ValueError("false: the same as leaving it out")
    return "dora"


def _wd_on_output(value: Any) -> str:
    if c.as_bool(value):
        raise ValueError(
            "a DoRA magnitude per output channel (LyCORIS 3.2's default) is not trained here; ours is per "
            "input channel (wd_on_output=False, the one A1111 and ComfyUI apply)"
        )
    return "dora"


LYCORIS_PRESETS = {"full": True, "attn-mlp": False}  # preset -> whether it trains the 3x3 convs


def _lycoris_preset(value: Any) -> str:
    name = str(value).strip().strip("\"'")
    if name not in LYCORIS_PRESETS:
        raise ValueError(
            f"LyCORIS preset '{name}' has no equivalent here (full or attn-mlp); the full preset's layers "
            "are used"
        )
    return "kohya"


def _token_length(value: Any) -> int:
    length = c.as_int(value)
    if length not in (75, 150, 225):
        raise ValueError(f"max_token_length {length} has no equivalent here (75, 150 or 225)")
    return length


_OPTIMIZERS = {name.lower(): name for name in ("AdamW", "AdamW8bit", "Lion", "Prodigy", "Adafactor", "SGD")}
_SCHEDULERS = {
    n: n
    for n in ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")
}
_SAMPLERS = {
    "ddim": "ddim",
    "euler": "euler",
    "k_euler": "euler",
    "euler_a": "euler_a",
    "k_euler_a": "euler_a",
    "heun": "heun",
    "dpmsolver++": "dpm++ 2m",
}

MAPPED: dict[str, Rule] = {
    "pretrained_model_name_or_path": Rule("base_model", c.as_str),
    "output_dir": Rule("output_dir", c.as_str),
    "output_name": Rule("output_name", c.as_str),
    "train_data_dir": Rule("train_data_dir", c.as_str, "N_name repeat folders work the same"),
    "reg_data_dir": Rule("reg_data_dir", c.as_str),
    "num_repeats": Rule("num_repeats", c.as_int, "dataset config only"),
    "prior_loss_weight": Rule("prior_loss_weight", c.as_float),
    "network_module": Rule(
        "target_modules",
        _network_module,
        "`kohya`: networks.lora's layer set (networks.lora_flux's on FLUX.1)",
    ),
    "network_dim": Rule("lora_rank", c.as_int),
    "network_alpha": Rule("lora_alpha", c.as_float),
    "network_dropout": Rule("network_dropout", c.as_float),
    "network_weights": Rule("network_weights", c.as_str),
    "network_args.conv_dim": Rule("conv_rank", c.as_int),
    "network_args.conv_alpha": Rule("conv_alpha", c.as_float),
    "network_args.algo": Rule(
        "network_type",
        _lycoris_algo,
        "lycoris.kohya: lora and locon -> locon (lora under preset attn-mlp or on FLUX.1), loha, lokr",
    ),
    "network_args.dora_wd": Rule(
        "network_type",
        _dora_wd,
        "dora with algo lora/locon: a magnitude per input channel (LyCORIS' wd_on_output=False)",
    ),
    "network_args.wd_on_output": Rule(
        "network_type", _wd_on_output, "False only: our DoRA's magnitude is per input channel"
    ),
    "network_args.factor": Rule("lokr_factor", c.as_int, "LoKr only"),
    "network_args.full_matrix": Rule("lokr_full_matrix", c.as_bool, "LoKr only"),
    "network_args.dropout": Rule("network_dropout", c.as_float, "LyCORIS' dropout; not with LoHa/LoKr"),
    "network_args.preset": Rule(
        "target_modules", _lycoris_preset, "LyCORIS' full or attn-mlp (no 3x3 convs): `kohya`"
    ),
    "network_train_unet_only": Rule("train_text_encoder", _not_flag),
    "learning_rate": Rule("learning_rate", c.as_float),
    "unet_lr": Rule("unet_lr", c.as_float),
    "text_encoder_lr": Rule("text_encoder_lr", c.float_or_list),
    "lr_scheduler": Rule("lr_scheduler", c.choice(_SCHEDULERS, "lr_scheduler")),
    "lr_warmup_steps": Rule("lr_warmup_steps", c.int_or_float, "a value below 1 is a fraction of the run"),
    "lr_scheduler_num_cycles": Rule("lr_scheduler_num_cycles", c.as_int),
    "lr_restart_cycles": Rule("lr_scheduler_num_cycles", c.as_int, "Akegarasu SD-Trainer's older name"),
    "prompt_file": Rule("sample_prompts", c.as_str, "Akegarasu SD-Trainer's prompt file"),
    "lr_scheduler_power": Rule("lr_scheduler_power", c.as_float),
    "optimizer_type": Rule("optimizer_type", c.choice(_OPTIMIZERS, "optimizer_type")),
    "optimizer_args": Rule("optimizer_args", c.key_values),
    "use_8bit_adam": Rule("optimizer_type", _const("AdamW8bit")),
    "use_lion_optimizer": Rule("optimizer_type", _const("Lion")),
    "max_train_steps": Rule("max_train_steps", c.as_int),
    "max_train_epochs": Rule("epochs", c.as_int),
    "train_batch_size": Rule("batch_size", c.as_int),
    "gradient_accumulation_steps": Rule("gradient_accumulation_steps", c.as_int),
    "gradient_checkpointing": Rule("gradient_checkpointing", c.as_bool),
    "max_grad_norm": Rule("max_grad_norm", c.as_float),
    "mixed_precision": Rule(
        "mixed_precision", c.choice({"no": "no", "fp16": "fp16", "bf16": "bf16"}, "precision")
    ),
    "fp8_base": Rule("quantize_base", _const("float8"), "frozen weights stored in float8 (e4m3)"),
    "fp8_base_unet": Rule("quantize_base", _const("float8"), "frozen weights stored in float8 (e4m3)"),
    "seed": Rule("seed", c.as_int),
    "max_data_loader_n_workers": Rule("dataloader_num_workers", c.as_int),
    "torch_compile": Rule("torch_compile", c.as_bool),
    "save_precision": Rule("save_precision", c.precision),
    "save_every_n_steps": Rule("save_steps", c.as_int),
    "save_state": Rule("save_state", c.as_bool),
    "resume": Rule(
        "resume", c.as_str, "an sd-scripts state folder cannot be read here; start fresh or drop it"
    ),
    "logging_dir": Rule(
        "logging_dir", c.as_str, "logs go straight into it, not into a timestamped subfolder"
    ),
    "caption_extension": Rule("caption_extension", c.as_str),
    "caption_extention": Rule("caption_extension", c.as_str, "sd-scripts' old misspelling"),
    "shuffle_caption": Rule("shuffle_caption", c.as_bool),
    "keep_tokens": Rule("keep_tokens", c.as_int),
    "caption_separator": Rule("caption_separator", c.as_str),
    "caption_prefix": Rule("caption_prefix", c.as_str),
    "caption_suffix": Rule("caption_suffix", c.as_str),
    "caption_dropout_rate": Rule("caption_dropout_rate", c.as_float),
    "caption_tag_dropout_rate": Rule("caption_tag_dropout_rate", c.as_float),
    "flip_aug": Rule("flip_aug", c.as_bool),
    "random_crop": Rule("random_crop", c.as_bool),
    "resolution": Rule("resolution", c.resolution, "a width,height size keeps its area"),
    "enable_bucket": Rule("enable_bucket", c.as_bool),
    "min_bucket_reso": Rule("min_bucket_reso", c.as_int),
    "max_bucket_reso": Rule("max_bucket_reso", c.as_int),
    "bucket_reso_steps": Rule("bucket_reso_steps", c.as_int),
    "bucket_no_upscale": Rule("bucket_no_upscale", c.as_bool),
    "cache_latents": Rule("cache_latents", c.as_bool),
    "cache_latents_to_disk": Rule("cache_latents_to_disk", c.as_bool),
    "cache_text_encoder_outputs": Rule("cache_text_encoder_outputs", c.as_bool),
    "cache_text_encoder_outputs_to_disk": Rule(
        "cache_text_encoder_outputs", c.true_if_set, "cached in memory; there is no on-disk text cache here"
    ),
    "noise_offset": Rule("noise_offset", c.as_float),
    "multires_noise_iterations": Rule("multires_noise_iterations", c.as_int),
    "multires_noise_discount": Rule("multires_noise_discount", c.as_float),
    "min_snr_gamma": Rule("min_snr_gamma", c.as_float),
    "zero_terminal_snr": Rule("zero_terminal_snr", c.as_bool),
    "clip_skip": Rule("clip_skip", c.as_int),
    "max_token_length": Rule("max_token_length", _token_length),
    "loss_type": Rule("loss_type", c.choice({n: n for n in ("l2", "l1", "huber", "smooth_l1")}, "loss_type")),
    "huber_c": Rule("huber_c", c.as_float),
    "huber_schedule": Rule(
        "huber_schedule", c.choice({n: n for n in ("constant", "exponential", "snr")}, "sched")
    ),
    "v_parameterization": Rule("v_parameterization", c.as_bool),
    "sample_prompts": Rule("sample_prompts", c.as_str, "the same prompt-file syntax"),
    "sample_every_n_steps": Rule("sample_every_n_steps", c.as_int),
    "sample_every_n_epochs": Rule("sample_every_n_epochs", c.as_int),
    "sample_at_first": Rule("sample_at_first", c.as_bool),
    "sample_sampler": Rule("sample_sampler", c.choice(_SAMPLERS, "sample_sampler")),
    "validation_split": Rule("validation_split", c.as_float),
    "validate_every_n_steps": Rule("validate_every_n_steps", c.as_int),
    "ae": Rule("vae", c.as_str),
    "clip_l": Rule("clip_l", c.as_str),
    "t5xxl": Rule("t5xxl", c.as_str),
    "timestep_sampling": Rule(
        "timestep_sampling",
        c.choice({n: n for n in ("uniform", "sigmoid", "shift", "flux_shift")}, "sampling"),
    ),
    "discrete_flow_shift": Rule("discrete_flow_shift", c.as_float),
    "sigmoid_scale": Rule("sigmoid_scale", c.as_float),
    "model_prediction_type": Rule(
        "model_prediction_type",
        c.choice({n: n for n in ("raw", "additive", "sigma_scaled")}, "prediction type"),
    ),
    "guidance_scale": Rule("guidance_scale", c.as_float),
    "t5xxl_max_token_length": Rule("t5xxl_max_token_length", c.as_int),
    "blocks_to_swap": Rule("blocks_to_swap", c.as_int),
}

# Dropped, grouped by the reason.
_DROPPED_GROUPS: dict[str, tuple[str, ...]] = {
    "the model version is detected from the checkpoint": ("v2", "model_type"),
    "attention always uses PyTorch's scaled_dot_product_attention": ("xformers", "sdpa", "mem_eff_attn"),
    "logs are TensorBoard files in logging_dir": (
        "log_with",
        "log_prefix",
        "log_tracker_name",
        "log_tracker_config",
        "wandb_run_name",
        "wandb_api_key",
        "log_config",
    ),
    "LoRA files are always written as .safetensors with metadata": (
        "save_model_as",
        "use_safetensors",
        "no_metadata",
        "training_comment",
    ),
    "saving is by steps only here; use save_steps": ("save_every_n_epochs", "save_n_epoch_ratio"),
    "every save_steps file is kept; save_last_n_states limits the training states": (
        "save_last_n_epochs",
        "save_last_n_steps",
        "save_last_n_epochs_state",
        "save_last_n_steps_state",
        "save_state_on_train_end",
    ),
    "the LoRA trains in fp32 and mixed_precision sets the compute type": ("full_fp16", "full_bf16"),
    "memory and speed knobs that are automatic here": (
        "lowram",
        "highvram",
        "vae_batch_size",
        "text_encoder_batch_size",
        "disable_mmap_load_safetensors",
        "persistent_data_loader_workers",
        "no_half_vae",
        "cpu_offload_checkpointing",
        "skip_cache_check",
        "fused_backward_pass",
        "dynamo_backend",
        "ddp_timeout",
        "ddp_gradient_as_bucket_view",
        "ddp_static_graph",
        "tokenizer_cache_dir",
        "cache_info",
        "debug_dataset",
    ),
    "Hugging Face upload is not part of training here": (
        "huggingface_repo_id",
        "huggingface_repo_type",
        "huggingface_path_in_repo",
        "huggingface_repo_visibility",
        "save_state_to_huggingface",
        "resume_from_huggingface",
        "async_upload",
        "huggingface_token",
    ),
    "no equivalent here": (
        "color_aug",
        "face_crop_aug_range",
        "keep_tokens_separator",
        "secondary_separator",
        "enable_wildcard",
        "token_warmup_min",
        "token_warmup_step",
        "caption_dropout_every_n_epochs",
        "alpha_mask",
        "masked_loss",
        "min_timestep",
        "max_timestep",
        "ip_noise_gamma",
        "ip_noise_gamma_random_strength",
        "noise_offset_random_strength",
        "adaptive_noise_scale",
        "scale_weight_norms",
        "dim_from_weights",
        "base_weights",
        "base_weights_multiplier",
        "network_train_text_encoder_only",
        "lr_scheduler_args",
        "lr_decay_steps",
        "lr_scheduler_timescale",
        "lr_scheduler_min_lr_ratio",
        "huber_scale",
        "weighting_scheme",
        "logit_mean",
        "logit_std",
        "mode_scale",
        "apply_t5_attn_mask",
        "validation_seed",
        "validate_every_n_epochs",
        "max_validation_steps",
        "skip_until_initial_step",
        "initial_epoch",
        "initial_step",
        "resize_interpolation",
        "network_multiplier",
        "dataset_class",
        "conditioning_data_dir",
        "network_args.train_t5xxl",
        "network_args.down_lr_weight",
        "network_args.mid_lr_weight",
        "network_args.up_lr_weight",
        "network_args.block_dims",
        "network_args.block_alphas",
        "network_args.conv_block_dims",
        "network_args.conv_block_alphas",
        "network_args.loraplus_lr_ratio",
    ),
    "rank and module dropout are not trained here": (
        "network_args.rank_dropout",
        "network_args.module_dropout",
    ),
    "LyCORIS' Tucker (CP) decomposition of the 3x3 convs is not trained here; their flat factors are": (
        "network_args.use_tucker",
        "network_args.use_cp",
        "network_args.use_conv_cp",
        "network_args.disable_conv_cp",
    ),
    "LyCORIS' extra scalar is not trained here": ("network_args.use_scalar",),
    "LyCORIS' bypass mode only changes how the update is computed; the same network is trained": (
        "network_args.bypass_mode",
    ),
    "training the norm layers is not done here": ("network_args.train_norm",),
    "decomposing LoKr's small factor too is not trained here": ("network_args.decompose_both",),
    "an option of LyCORIS algorithms not trained here (OFT, DyLoRA, (IA)^3)": (
        "network_args.block_size",
        "network_args.constraint",
        "network_args.rescaled",
        "network_args.train_on_input",
    ),
    "no equivalent here (LyCORIS)": (
        "network_args.rank_dropout_scale",
        "network_args.rs_lora",
        "network_args.unbalanced_factorization",
    ),
    "LyCORIS' kohya wrapper reads wd_on_output, not wd_on_out: it is ignored there too": (
        "network_args.wd_on_out",
    ),
    "an SD 1.x/2.x/SDXL VAE override is not supported; the base model's own VAE is used": ("vae",),
    "sd-scripts' fine-tuning metadata JSON is not read here; write a metadata.csv (file_name,text) instead": (
        "in_json",
        "metadata_file",
        "dataset_repeats",
    ),
    "images need caption files here; reg images take their class from N_name folder names": ("class_tokens",),
    "an option of sd-scripts' tools, not of a training run": (
        "output_config",
        "config_file",
        "dataset_config",
    ),
    "Akegarasu SD-Trainer's own settings (its UI and the prompt file it writes); write the prompts as "
    "sample_prompts": (
        "model_train_type",
        "ui_custom_params",
        "enable_preview",
        "enable_base_weight",
        "positive_prompts",
        "negative_prompts",
        "sample_width",
        "sample_height",
        "sample_cfg",
        "sample_seed",
        "sample_steps",
        "randomly_choice_prompt",
        "random_prompt_include_subdirs",
        "gpu_ids",
    ),
}

# Akegarasu SD-Trainer's own fields for LyCORIS' network_args (its UI passes them with lycoris.kohya only).
SD_TRAINER_LYCORIS: dict[str, str] = {
    "lycoris_algo": "network_args.algo",
    "lokr_factor": "network_args.factor",
    "conv_dim": "network_args.conv_dim",
    "conv_alpha": "network_args.conv_alpha",
    "dropout": "network_args.dropout",
    "train_norm": "network_args.train_norm",
    "dora_wd": "network_args.dora_wd",
    "rank_dropout": "network_args.rank_dropout",
    "module_dropout": "network_args.module_dropout",
}

DROPPED: dict[str, str] = {name: reason for reason, names in _DROPPED_GROUPS.items() for name in names}

# sd-scripts' defaults that differ from ours: written out when the source leaves the option out, so the
# imported run does what sd-scripts would have done. (option, our key, value, why)
SD_SCRIPTS_DEFAULTS: tuple[tuple[str, str, Any, str], ...] = (
    ("network_dim", "lora_rank", 4, "sd-scripts' default rank is 4 (ours 8)"),
    ("network_alpha", "lora_alpha", 1.0, "sd-scripts' default alpha is 1 (ours: the rank)"),
    ("learning_rate", "learning_rate", 2e-6, "sd-scripts' default learning_rate is 2e-6 (ours 1e-4)"),
    ("caption_extension", "caption_extension", ".caption", "sd-scripts' default extension is .caption"),
    ("save_precision", "save_precision", "fp32", "sd-scripts saves the LoRA as trained (fp32) by default"),
)
# FLUX.1 defaults of sd-scripts' flux_train_network.py that differ from ours.
FLUX_DEFAULTS: tuple[tuple[str, str, Any, str], ...] = (
    ("model_prediction_type", "model_prediction_type", "sigma_scaled", "sd-scripts' FLUX.1 default"),
    ("guidance_scale", "guidance_scale", 3.5, "sd-scripts' FLUX.1 default"),
    ("discrete_flow_shift", "discrete_flow_shift", 3.0, "sd-scripts' FLUX.1 default"),
)
