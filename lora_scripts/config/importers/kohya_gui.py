"""Read a kohya_ss GUI preset (the JSON its LoRA tab saves) as sd-scripts options, the way kohya_ss builds its
sd-scripts command from it; the sd-scripts table then maps those options (see sd_scripts_table)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lora_scripts.config.importers.report import ReportLine
from lora_scripts.errors import UserError

# Keys only kohya_ss writes; one of them marks a JSON file as a kohya_ss preset.
_MARKERS = ("LoRA_type", "max_resolution", "lr_warmup", "epoch", "optimizer", "sdxl")

# kohya_ss key -> the sd-scripts option kohya_ss passes it as.
RENAMED: dict[str, str] = {
    "epoch": "max_train_epochs",
    "max_resolution": "resolution",
    "optimizer": "optimizer_type",
    "lora_network_weights": "network_weights",
    "sdxl_cache_text_encoder_outputs": "cache_text_encoder_outputs",
    "sdxl_no_half_vae": "no_half_vae",
    "use_wandb": "log_with",
    "conv_dim": "network_args.conv_dim",
    "conv_alpha": "network_args.conv_alpha",
    "rank_dropout": "network_args.rank_dropout",
    "module_dropout": "network_args.module_dropout",
    "block_dims": "network_args.block_dims",
    "block_alphas": "network_args.block_alphas",
    "conv_block_dims": "network_args.conv_block_dims",
    "conv_block_alphas": "network_args.conv_block_alphas",
    "down_lr_weight": "network_args.down_lr_weight",
    "mid_lr_weight": "network_args.mid_lr_weight",
    "up_lr_weight": "network_args.up_lr_weight",
    "loraplus_lr_ratio": "network_args.loraplus_lr_ratio",
    "LyCORIS_preset": "network_args.preset",
    "factor": "network_args.factor",
    "dora_wd": "network_args.dora_wd",
    "use_tucker": "network_args.use_tucker",
    "use_cp": "network_args.use_cp",
    "use_scalar": "network_args.use_scalar",
    "decompose_both": "network_args.decompose_both",
    "train_norm": "network_args.train_norm",
    "bypass_mode": "network_args.bypass_mode",
    "rank_dropout_scale": "network_args.rank_dropout_scale",
}

# kohya_ss-only keys without an sd-scripts option of their own, grouped by the reason.
DROPPED_GROUPS: dict[str, tuple[str, ...]] = {
    "the model version is detected from the checkpoint": ("sdxl", "flux1_checkbox", "sd3_checkbox"),
    "accelerate launch settings; a run here is one process": (
        "num_cpu_threads_per_process",
        "num_processes",
        "num_machines",
        "multi_gpu",
        "gpu_ids",
        "main_process_port",
        "extra_accelerate_launch_args",
        "dynamo_backend",
        "dynamo_mode",
        "dynamo_use_fullgraph",
        "dynamo_use_dynamic",
    ),
    "options of LyCORIS types not trained here (iA3, Diag-OFT, DyLoRA) or of block weights": (
        "train_on_input",
        "constrain",
        "rescaled",
        "unit",
        "block_lr_zero_threshold",
    ),
    "no equivalent here": (
        "stop_text_encoder_training_pct",
        "stop_text_encoder_training",
        "weighted_captions",
        "no_token_padding",
        "scale_v_pred_loss_like_noise_pred",
        "noise_offset_type",
    ),
    "kohya_ss' own settings (GUI state, presets, folders it prepares)": (
        "model_list",
        "training_preset",
        "save_as_bool",
        "sdxl_checkbox",
        "v_pred_like_loss",
        "log_tracker_config_dir",
        "save_state_to_huggingface",
    ),
}
_DROPPED: dict[str, str] = {name: reason for reason, names in DROPPED_GROUPS.items() for name in names}

# kohya_ss saves every field; at these values it passes nothing to sd-scripts, so neither does the import.
_OFF_VALUES: dict[str, Any] = {
    "max_train_steps": 0,
    "max_train_epochs": 0,
    "seed": 0,
    "save_every_n_steps": 0,
    "save_every_n_epochs": 0,
    "save_last_n_steps": 0,
    "save_last_n_steps_state": 0,
    "sample_every_n_steps": 0,
    "sample_every_n_epochs": 0,
    "noise_offset": 0,
    "adaptive_noise_scale": 0,
    "multires_noise_iterations": 0,
    "multires_noise_discount": 0,
    "min_snr_gamma": 0,
    "network_dropout": 0,
    "rank_dropout": 0,
    "module_dropout": 0,
    "scale_weight_norms": 0,
    "caption_dropout_rate": 0,
    "caption_dropout_every_n_epochs": 0,
    "vae_batch_size": 0,
    "ip_noise_gamma": 0,
    "min_timestep": 0,
    "max_timestep": 1000,
    "stop_text_encoder_training_pct": 0,
    "stop_text_encoder_training": 0,
    "loraplus_lr_ratio": 0,
    "unit": 1,
    "factor": -1,
    "lr_warmup": 0,
    "lr_warmup_steps": 0,
}

# The LyCORIS fields kohya_ss passes as network_args for its LyCORIS/LoCon, LoHa and LoKr types (lora_gui.py).
_LYCORIS_FIELDS = (
    "LyCORIS_preset",
    "conv_dim",
    "conv_alpha",
    "use_tucker",
    "bypass_mode",
    "dora_wd",
    "use_scalar",
    "rank_dropout_scale",
    "train_norm",
)
_LYCORIS_ONLY = (*_LYCORIS_FIELDS, "factor", "use_cp", "decompose_both")
# LoRA_type -> sd-scripts' network module, LyCORIS' algo (lycoris.kohya) and the fields passed for it.
_LORA_TYPES: dict[str, tuple[str, str | None, tuple[str, ...]]] = {
    "standard": ("networks.lora", None, ()),
    "kohya locon": ("networks.lora", None, ("conv_dim", "conv_alpha")),
    "locon": ("lycoris.kohya", "locon", _LYCORIS_FIELDS),
    "lycoris/locon": ("lycoris.kohya", "locon", _LYCORIS_FIELDS),
    "lycoris/loha": ("lycoris.kohya", "loha", _LYCORIS_FIELDS),
    "lycoris/lokr": ("lycoris.kohya", "lokr", (*_LYCORIS_FIELDS, "factor", "use_cp", "decompose_both")),
    "kohya loha": ("networks.loha", None, ("conv_dim", "conv_alpha", "use_tucker")),
    "kohya lokr": ("networks.lokr", None, ("conv_dim", "conv_alpha", "use_tucker", "factor")),
    "flux1": ("networks.lora_flux", None, ()),
}
# LoRA_type values of networks not trained here, with the reason.
NOT_TRAINED_TYPES = {
    "LyCORIS/iA3": "(IA)^3 is not trained here",
    "LyCORIS/Diag-OFT": "Diag-OFT is not trained here",
    "LyCORIS/BOFT": "BOFT is not trained here",
    "LyCORIS/GLoRA": "GLoRA is not trained here",
    "LyCORIS/DyLoRA": "DyLoRA is not trained here",
    "LyCORIS/Native Fine-Tuning": "LyCORIS' native fine-tuning is not trained here",
    "Kohya DyLoRA": "DyLoRA is not trained here",
    "LoRA-FA": "LoRA-FA is not trained here",
    "Flux1 OFT": "OFT is not trained here",
}


@dataclass
class KohyaPreset:
    """`options`: sd-scripts options as kohya_ss passes them (`labels`: the kohya_ss key each came from, where
    it differs); `config`: keys of ours set directly, each with its line in `lines` (so are the dropped keys);
    `script`: the sd-scripts script kohya_ss would run."""

    options: dict[str, Any] = field(default_factory=dict)
    labels: dict[str, str] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    lines: list[ReportLine] = field(default_factory=list)
    script: str = ""


def is_kohya_gui_preset(data: Any) -> bool:
    return isinstance(data, dict) and any(key in data for key in _MARKERS)


def read_kohya_gui(path: Path) -> KohyaPreset:
    """The preset at `path` as the sd-scripts options kohya_ss would pass (empty and "off" fields skipped)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}: not valid JSON ({exc}).") from exc
    if not is_kohya_gui_preset(data):
        raise UserError(
            f"{path}: not a kohya_ss GUI preset (none of {', '.join(_MARKERS)}); "
            "only kohya_ss' LoRA JSON is read from .json files."
        )
    preset = KohyaPreset()
    given = {k: v for k, v in data.items() if v not in ("", None) and _OFF_VALUES.get(k, object()) != v}
    _lora_type(given, preset)
    _warmup(given, preset)
    _noise(given, preset.lines)
    _sample_prompts(given, preset)
    if "max_train_epochs" in given:
        given.pop("epoch", None)  # kohya_ss' own max_train_epochs field wins over epoch
    if str(given.get("xformers", "")).lower() == "none":
        given.pop("xformers")
    for key, value in given.items():
        if key in _DROPPED:
            preset.lines.append(ReportLine(key, value, "dropped", note=_DROPPED[key]))
        elif key == "additional_parameters":
            note = "extra command-line text: add its options by hand"
            preset.lines.append(ReportLine(key, value, "dropped", note=note))
        else:
            name = RENAMED.get(key, key)
            preset.options[name] = value
            if name != key:
                preset.labels[name] = key
    if data.get("sdxl") is True:
        preset.script = "sdxl_train_network.py"
    if preset.options.get("network_module") == "networks.lora_flux" or data.get("flux1_checkbox") is True:
        preset.script = "flux_train_network.py"
    return preset


def _lora_type(given: dict[str, Any], preset: KohyaPreset) -> None:
    lora_type = str(given.pop("LoRA_type", "Standard"))
    known = _LORA_TYPES.get(lora_type.lower())
    if known is None:
        reasons = {name.lower(): reason for name, reason in NOT_TRAINED_TYPES.items()}
        reason = reasons.get(lora_type.lower(), f"{lora_type} is not trained here")
        note = f"{reason}; a LoRA of our default layers is trained instead"
        preset.lines.append(ReportLine("LoRA_type", lora_type, "dropped", note=note))
        passed: tuple[str, ...] = ()
    else:
        module, algo, passed = known
        preset.options["network_module"] = module
        preset.labels["network_module"] = f"LoRA_type {lora_type!r}: network_module"
        if module in ("networks.loha", "networks.lokr") and str(given.get("conv_dim", "")) in ("0", "0.0"):
            note = "0: kohya_ss passes no conv_dim (no 3x3 convs)"
            preset.lines.append(ReportLine("conv_dim", given.pop("conv_dim"), "dropped", note=note))
            given.pop("conv_alpha", None)
        if algo is not None:
            preset.options["network_args.algo"] = algo
            preset.labels["network_args.algo"] = f"LoRA_type {lora_type!r}: network_args.algo"
    for key in ("conv_dim", "conv_alpha", *_LYCORIS_ONLY):
        if key in given and key not in passed:
            kind = "LoCon types" if key.startswith("conv") else "LyCORIS types"
            note = f"kohya_ss passes it only for {kind}"
            preset.lines.append(ReportLine(key, given.pop(key), "dropped", note=note))


def _warmup(given: dict[str, Any], preset: KohyaPreset) -> None:
    """kohya_ss' lr_warmup is a percent of the run's steps; its newer lr_warmup_steps (steps) wins."""
    percent = given.pop("lr_warmup", None)
    lines = preset.lines
    if percent is None or "lr_warmup_steps" in given:
        if percent is not None:
            lines.append(
                ReportLine("lr_warmup", percent, "dropped", note="lr_warmup_steps is given and wins")
            )
        return
    try:
        fraction = float(percent) / 100
    except (TypeError, ValueError):
        lines.append(ReportLine("lr_warmup", percent, "dropped", note=f"{percent!r} is not a percent"))
        return
    if not 0 < fraction < 1:
        lines.append(ReportLine("lr_warmup", percent, "dropped", note="a percent between 0 and 100"))
        return
    preset.config["lr_warmup_steps"] = fraction
    lines.append(
        ReportLine("lr_warmup", percent, "mapped", "lr_warmup_steps", fraction, "a percent of the steps")
    )


def _noise(given: dict[str, Any], lines: list[ReportLine]) -> None:
    """noise_offset_type picks which of noise_offset and multires_noise_* kohya_ss passes."""
    multires = str(given.get("noise_offset_type", "Original")).lower() == "multires"
    unused = (
        ("noise_offset", "adaptive_noise_scale")
        if multires
        else (
            "multires_noise_iterations",
            "multires_noise_discount",
        )
    )
    for key in unused:
        if key in given:
            note = f"not passed with noise_offset_type {given.get('noise_offset_type', 'Original')!r}"
            lines.append(ReportLine(key, given.pop(key), "dropped", note=note))


def _sample_prompts(given: dict[str, Any], preset: KohyaPreset) -> None:
    """kohya_ss keeps the prompts' text (it writes the prompt file itself); ours takes them as a list."""
    text = given.pop("sample_prompts", None)
    if text is None:
        return
    prompts = [line.strip() for line in str(text).splitlines() if line.strip() and not line.startswith("#")]
    if not prompts:
        return
    preset.config["sample_prompts"] = prompts
    preset.lines.append(
        ReportLine("sample_prompts", text, "mapped", "sample_prompts", prompts, "one prompt per line")
    )
