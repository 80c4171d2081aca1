"""Read a OneTrainer (Nerogar/OneTrainer) training config, the JSON its UI saves or exports
(modules/util/config/TrainConfig.py), as our config. Only LORA runs of SD 1.x/2.x, SDXL and FLUX.1
are read; its peft_type (LORA, with lora_decompose DoRA; LOHA; LOKR) picks network_type
(modules/module/LoRAModule.py builds them)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lora_scripts.config.importers import converters as c
from lora_scripts.config.importers.nested import NestedImport
from lora_scripts.config.importers.sd_scripts_table import Rule
from lora_scripts.errors import UserError

_FAMILIES = ("STABLE_DIFFUSION_15", "STABLE_DIFFUSION_20", "STABLE_DIFFUSION_21", "STABLE_DIFFUSION_XL_10")
_FAMILIES += ("FLUX_DEV_1",)
_OPTIMIZERS = {
    "adamw": "AdamW",
    "adam": "AdamW",
    "adamw_8bit": "AdamW8bit",
    "adam_8bit": "AdamW8bit",
    "lion": "Lion",
    "prodigy": "Prodigy",
    "adafactor": "Adafactor",
    "sgd": "SGD",
}
_SCHEDULERS = {
    "constant": "constant",
    "linear": "linear",
    "cosine": "cosine",
    "cosine_with_restarts": "cosine_with_restarts",
    "cosine_with_hard_restarts": "cosine_with_restarts",
}
_TRAIN_DTYPES = {"float_32": "no", "float_16": "fp16", "bfloat_16": "bf16"}
_OUTPUT_DTYPES = {"float_32": "fp32", "float_16": "fp16", "bfloat_16": "bf16"}


def _checkpointing(value: Any) -> bool:
    # ON and CPU_OFFLOADED both recompute activations; the offload has no equivalent and is left out.
    return str(value).upper() in ("ON", "CPU_OFFLOADED", "TRUE")


def _weight_dtype(value: Any) -> str:
    # OneTrainer's FLOAT_8 stores frozen weights in float8 as our quantize_base: float8 does; its NFLOAT_4 is
    # 4-bit, and int8 is our nearest (twice its memory, closer to the original weights).
    name = str(value).upper()
    if name == "FLOAT_8":
        return "float8"
    if name == "NFLOAT_4":
        return "int8"
    if name == "INT_8":
        return "int8"
    raise ValueError(f"{value}: kept in the training precision here")


_OFT = "OFT only; OFT is not trained here"
_PEFT_TYPES = {"LORA": "lora", "LOHA": "loha", "LOKR": "lokr"}
_SAME = "false: the same as leaving it out"
_OUTPUT_AXIS = "true (a magnitude per output channel) is not trained here: lora_decompose is dropped"
# The network keys read together by _network (each depends on peft_type).
_NETWORK_KEYS = (
    "peft_type",
    "lora_rank",
    "lora_decompose",
    "lora_decompose_output_axis",
    "lora_decompose_norm_epsilon",
    "dropout_probability",
    "lokr_dim",
    "lokr_decompose_factor",
    "lokr_full_matrix",
    "lokr_decompose_both",
    "lokr_use_tucker",
    "lokr_weight_decompose",
    "lokr_dora_on_output",
    "lokr_vec_trick",
    "oft_block_size",
    "oft_block_share",
    "oft_scaled",
)

TOP: dict[str, Rule] = {
    "base_model_name": Rule("base_model", c.as_str, "a Hugging Face id is read from the local hub cache"),
    "peft_type": Rule(
        "network_type",
        note="LORA: lora (dora with lora_decompose), LOHA: loha, LOKR: lokr; OFT_2 is dropped (OFT is not "
        "trained here: a LoRA is); FLUX.1: lora only",
    ),
    "lora_rank": Rule("lora_rank", c.as_int, "LORA and LOHA; LOKR takes lokr_dim"),
    "lora_alpha": Rule("lora_alpha", c.as_float),
    "lora_decompose": Rule(
        "network_type",
        note="dora (peft_type LORA): a magnitude per input channel, with lora_decompose_output_axis false "
        "(OneTrainer's default)",
    ),
    "lora_decompose_output_axis": Rule(
        "network_type",
        note="false only (OneTrainer's default, a magnitude per input channel); true (per output channel) is "
        "not trained here: lora_decompose is then dropped",
    ),
    "lora_decompose_norm_epsilon": Rule(None, note="OneTrainer's guard on DoRA's norm; no setting here"),
    "lokr_dim": Rule("lora_rank", c.as_int, "LOKR: its rank"),
    "lokr_decompose_factor": Rule("lokr_factor", c.as_int, "LOKR only"),
    "lokr_full_matrix": Rule("lokr_full_matrix", c.as_bool, "LOKR only"),
    "lokr_decompose_both": Rule(None, note="decomposing LoKr's small factor too is not trained here"),
    "lokr_use_tucker": Rule(None, note="LoKr's Tucker decomposition of the 3x3 convs is not trained here"),
    "lokr_weight_decompose": Rule(None, note="DoRA on LoKr is not trained here; the LoKr is kept"),
    "lokr_dora_on_output": Rule(None, note="applies to lokr_weight_decompose only"),
    "lokr_vec_trick": Rule(
        None, note="only changes how OneTrainer computes LoKr; the same network is trained"
    ),
    "oft_block_size": Rule(None, note=_OFT),
    "oft_block_share": Rule(None, note=_OFT),
    "oft_scaled": Rule(None, note=_OFT),
    "dropout_probability": Rule(
        "network_dropout", c.as_float, "not with LOHA/LOKR: they take no dropout here"
    ),
    "lora_model_name": Rule("network_weights", c.as_str),
    "learning_rate": Rule("learning_rate", c.as_float),
    "learning_rate_scheduler": Rule("lr_scheduler", c.choice(_SCHEDULERS, "learning_rate_scheduler")),
    "learning_rate_warmup_steps": Rule("lr_warmup_steps", c.int_or_float),
    "learning_rate_cycles": Rule("lr_scheduler_num_cycles", c.as_int),
    "epochs": Rule("epochs", c.as_int),
    "batch_size": Rule("batch_size", c.as_int),
    "gradient_accumulation_steps": Rule("gradient_accumulation_steps", c.as_int),
    "gradient_checkpointing": Rule("gradient_checkpointing", _checkpointing, "CPU_OFFLOADED: recompute only"),
    "train_dtype": Rule("mixed_precision", c.choice(_TRAIN_DTYPES, "train_dtype")),
    "output_dtype": Rule("save_precision", c.choice(_OUTPUT_DTYPES, "output_dtype")),
    "resolution": Rule("resolution", c.resolution),
    "aspect_ratio_bucketing": Rule("enable_bucket", c.as_bool),
    "latent_caching": Rule("cache_latents", c.as_bool),
    "offset_noise_weight": Rule("noise_offset", c.as_float),
    "rescale_noise_scheduler_to_zero_terminal_snr": Rule("zero_terminal_snr", c.as_bool),
    "force_v_prediction": Rule("v_parameterization", c.true_if_set),
    "text_encoder_layer_skip": Rule("clip_skip", lambda v: c.as_int(v) + 1, "skip 1 layer = clip_skip 2"),
    "max_grad_norm": Rule("max_grad_norm", c.as_float),
    "seed": Rule("seed", c.as_int),
    "weight_decay": Rule("adam_weight_decay", c.as_float, "older configs"),
    "train_text_encoder": Rule("train_text_encoder", c.as_bool, "older configs"),
    "text_encoder_learning_rate": Rule("text_encoder_lr", c.as_float, "older configs"),
    "unet_learning_rate": Rule("unet_lr", c.as_float, "older configs"),
    "weight_dtype": Rule("quantize_base", _weight_dtype, "FLOAT_8: float8; NFLOAT_4: int8, our nearest"),
    "model_type": Rule(None, note="the model family is detected from the checkpoint"),
    "training_method": Rule(None, note="LORA"),
    "output_model_destination": Rule("output_dir", note="its folder; output_name: its file name"),
    "output_model_format": Rule(None, note="LoRA files are written as safetensors here"),
}
_DROPPED_TOP = {
    "OneTrainer's own settings (workspace, UI, backups, devices)": (
        "__version",
        "debug_mode",
        "debug_dir",
        "workspace_dir",
        "cache_dir",
        "tensorboard",
        "tensorboard_expose",
        "continue_last_backup",
        "include_train_config",
        "backup_after",
        "backup_after_unit",
        "rolling_backup",
        "rolling_backup_count",
        "backup_before_save",
        "train_device",
        "temp_device",
        "only_cache",
        "clear_cache_before_training",
        "latent_caching_epochs",
        "extra_model_name",
        "vae_weight_dtype",
        "text_encoder_weight_dtype",
        "unet_weight_dtype",
        "sample_definition_file_name",
        "sample_image_format",
        "samples_to_tensorboard",
        "non_ema_sampling",
        "secrets",
        "attention_mechanism",
    ),
    "no equivalent here": (
        "ema",
        "ema_decay",
        "ema_update_step_interval",
        "masked_training",
        "unmasked_probability",
        "unmasked_weight",
        "normalize_masked_area_loss",
        "max_noising_strength",
        "min_noising_strength",
        "circular_mask_generation",
        "random_rotate_and_crop",
        "train_text_encoder_epochs",
        "train_unet_epochs",
        "timestep_distribution",
        "force_epsilon_prediction",
        "loss_weight_fn",
        "loss_scaler",
        "learning_rate_scaler",
        "token_count",
        "initial_embedding_text",
        "embedding",
        "additional_embeddings",
        "lora_weight_dtype",
        "lora_layer_preset",
        "lora_layers",
        "bundle_additional_embeddings",
    ),
}
for _reason, _names in _DROPPED_TOP.items():
    TOP.update({name: Rule(None, note=_reason) for name in _names})

# The newer nested parts: {"train": bool, "learning_rate": float, "weight_dtype": ...}.
PART: dict[str, Rule] = {
    "train": Rule("train", c.as_bool),
    "learning_rate": Rule("lr", c.as_float),
    "weight_dtype": Rule("quantize_base", _weight_dtype, "FLOAT_8: float8; NFLOAT_4: int8, our nearest"),
    "model_name": Rule(None, note="the base model's own part is used"),
    "stop_training_after": Rule(None, note="no equivalent here"),
    "stop_training_after_unit": Rule(None, note="no equivalent here"),
    "include": Rule(None, note="no equivalent here"),
    "attention_mask": Rule(None, note="no equivalent here"),
    "guidance_scale": Rule("guidance_scale", c.as_float),
}
CONCEPT: dict[str, Rule] = {
    "path": Rule("train_data_dir", c.as_str),
    "include_subdirectories": Rule(None, note="subfolders are always read here"),
    "name": Rule(None, note="a label in OneTrainer's UI"),
    "enabled": Rule(None, note="disabled concepts are left out"),
    "image_variations": Rule(None, note="no equivalent here"),
    "text_variations": Rule(None, note="no equivalent here"),
    "balancing": Rule("num_repeats", lambda v: max(1, round(float(v))), "with balancing_strategy REPEATS"),
    "balancing_strategy": Rule(None, note="REPEATS is read as num_repeats; SAMPLES has no equivalent"),
    "loss_weight": Rule(None, note="no equivalent here"),
    "seed": Rule(None, note="no equivalent here"),
    "validation_concept": Rule(None, note="validation_data_dir takes a folder of its own"),
    "concept_type": Rule(None, note="STANDARD is read; others are left out"),
    "image": Rule(
        None, note="enable_random_flip is flip_aug; its other augmentations have no equivalent here"
    ),
}
SAMPLES: dict[str, str] = {"width": "--w", "height": "--h", "seed": "--d", "diffusion_steps": "--s"}
SAMPLES["cfg_scale"] = "--l"
SECTIONS = {"": TOP, "unet / prior / transformer": PART, "concepts[]": CONCEPT}


def is_onetrainer_config(data: Any) -> bool:
    return isinstance(data, dict) and "model_type" in data and "training_method" in data


def import_onetrainer(path: Path, data: dict[str, Any]) -> NestedImport:
    method = str(data["training_method"]).upper()
    if method != "LORA":
        raise UserError(f"{path}: training_method {method}: only LORA runs are imported.")
    model_type = str(data["model_type"]).upper()
    if not model_type.startswith(_FAMILIES) or "INPAINT" in model_type:
        raise UserError(
            f"{path}: model_type {model_type}: not a family trained here (SD 1.x/2.x, SDXL, FLUX.1)."
        )
    out = NestedImport(str(path))
    parts = ("unet", "prior", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3", "vae")
    nested = ("optimizer", "concepts", "samples", "concept_file_name", "save_every", "save_every_unit")
    nested += ("sample_after", "sample_after_unit", "output_model_destination", "lora_weight_dtype")
    out.section("", data, TOP, skip=(*parts, *nested, *_NETWORK_KEYS))
    _network(out, data, flux=model_type.startswith("FLUX"))
    _output(out, str(data.get("output_model_destination", "models/lora.safetensors")))
    for part in parts:
        if isinstance(data.get(part), dict):
            _part(out, part, data[part])
    _optimizer(out, data.get("optimizer"))
    _every(out, data, "save_every", "save_steps", None)
    _every(out, data, "sample_after", "sample_every_n_steps", "sample_every_n_epochs")
    _concepts(out, path, data)
    _samples(out, data.get("samples"))
    return out


def _network(out: NestedImport, data: dict[str, Any], flux: bool) -> None:
    """network_type and its rank from peft_type and the keys of each type (LoRAModuleWrapper: LORA and LOHA
    take lora_rank, LOKR lokr_dim; lora_alpha is every type's); the other types' keys are dropped."""
    given = {key: data[key] for key in _NETWORK_KEYS if key in data}

    def drop(key: str, note: str) -> None:
        if key in given:
            out.dropped(key, given.pop(key), note)

    def convert(key: str) -> None:
        if key in given:
            rule = TOP[key]
            value = out.convert(key, given.pop(key), rule)
            if value is not None:
                out.config[str(rule.key)] = value

    peft = str(given.get("peft_type", "LORA")).upper()
    network_type = _PEFT_TYPES.get(peft)
    if network_type is None:
        kind = "OFT" if peft.startswith("OFT") else peft
        drop("peft_type", f"{kind} is not trained here; a LoRA of lora_rank is trained instead")
        network_type = "lora"
    elif flux and network_type != "lora":
        drop("peft_type", "FLUX.1 trains network_type lora only here; a LoRA of lora_rank is trained instead")
        network_type = "lora"
    ours = network_type
    if _flag(given.get("lora_decompose")):
        if peft != "LORA":
            drop("lora_decompose", f"OneTrainer applies it with peft_type LORA only, not {peft}")
        elif _flag(given.get("lora_decompose_output_axis")):
            note = "with lora_decompose_output_axis true: a magnitude per output channel; ours is per input "
            drop("lora_decompose", note + "channel, so a LoRA is trained instead")
        elif flux:
            drop("lora_decompose", "FLUX.1 trains network_type lora only here; a LoRA is trained instead")
        else:
            ours = "dora"
            note = "a magnitude per input channel (lora_decompose_output_axis false), as here"
            out.mapped("lora_decompose", given.pop("lora_decompose"), "network_type", "dora", note)
    drop("lora_decompose", _SAME)
    if ours == "dora" and "lora_decompose_output_axis" in given:
        note = "false: a magnitude per input channel, as here"
        out.mapped(
            "lora_decompose_output_axis", given.pop("lora_decompose_output_axis"), "network_type", ours, note
        )
    elif _flag(given.get("lora_decompose_output_axis")) and _flag(data.get("lora_decompose")):
        drop("lora_decompose_output_axis", _OUTPUT_AXIS)
    drop("lora_decompose_output_axis", "applies to lora_decompose only")
    drop("lora_decompose_norm_epsilon", TOP["lora_decompose_norm_epsilon"].note)
    out.config["network_type"] = ours
    if "peft_type" in given:
        note = {"dora": "with lora_decompose: dora", "lokr": "its rank is lokr_dim"}.get(ours, "")
        out.mapped("peft_type", given.pop("peft_type"), "network_type", ours, note)
    if network_type == "lokr":
        drop("lora_rank", "peft_type LOKR takes lokr_dim as its rank")
        convert("lokr_dim")
        convert("lokr_decompose_factor")
        convert("lokr_full_matrix")
        for key in ("lokr_decompose_both", "lokr_use_tucker", "lokr_weight_decompose"):
            drop(key, TOP[key].note if _flag(given.get(key)) else _SAME)
    else:
        convert("lora_rank")
    other = f"LoKr only; OneTrainer ignores it with {peft}" if peft != "LOKR" else "LoKr only; see peft_type"
    for key in [key for key in given if key.startswith("lokr_")]:
        drop(key, TOP[key].note if network_type == "lokr" else other)
    for key in ("oft_block_size", "oft_block_share", "oft_scaled"):
        drop(key, _OFT)
    if ours in ("loha", "lokr") and _nonzero(given.get("dropout_probability")):
        drop("dropout_probability", f"{ours} takes no dropout here (OneTrainer drops out its factors)")
    convert("dropout_probability")


def _flag(value: Any) -> bool:
    try:
        return value is not None and c.as_bool(value)
    except ValueError:
        return False


def _nonzero(value: Any) -> bool:
    try:
        return value is not None and c.as_float(value) != 0
    except ValueError:
        return True


def _output(out: NestedImport, destination: str) -> None:
    target = Path(destination)
    out.config["output_dir"] = str(target.parent) if str(target.parent) != "" else "."
    out.config["output_name"] = target.stem
    out.mapped("output_model_destination", destination, "output_dir", out.config["output_dir"])
    out.mapped("output_model_destination", destination, "output_name", target.stem)


def _part(out: NestedImport, name: str, data: dict[str, Any]) -> None:
    values: dict[str, Any] = {}
    out.section(name, data, PART, into=values)
    unet = name in ("unet", "prior", "transformer")
    if unet and "quantize_base" in values:
        out.config["quantize_base"] = values["quantize_base"]
    elif "quantize_base" in values:
        out.report.lines[-1:] = []
        out.dropped(f"{name}.weight_dtype", data.get("weight_dtype"), "quantize_base covers the UNet only")
    if "guidance_scale" in values:
        out.config["guidance_scale"] = values["guidance_scale"]
    if unet:
        if "lr" in values:
            out.config["unet_lr"] = values["lr"]
    elif name.startswith("text_encoder"):
        if values.get("train") is True:
            out.config["train_text_encoder"] = True
        elif "train_text_encoder" not in out.config and values.get("train") is False:
            out.config["train_text_encoder"] = False
        if "lr" in values and values.get("train"):
            out.config["text_encoder_lr"] = values["lr"]


def _optimizer(out: NestedImport, value: Any) -> None:
    if value is None:
        return
    settings = value if isinstance(value, dict) else {"optimizer": value}
    name = settings.get("optimizer")
    rule = Rule("optimizer_type", c.choice(_OPTIMIZERS, "optimizer"))
    ours = out.convert("optimizer.optimizer", name, rule)
    if ours is not None:
        out.config["optimizer_type"] = ours
    args = {}
    for key, arg in settings.items():
        if key == "optimizer" or arg is None:
            continue
        if key == "weight_decay" and ours in ("AdamW", "AdamW8bit"):
            out.config["adam_weight_decay"] = float(arg)
            out.mapped("optimizer.weight_decay", arg, "adam_weight_decay", float(arg))
        elif key in (
            "beta1",
            "beta2",
            "eps",
            "weight_decay",
            "d_coef",
            "use_bias_correction",
            "safeguard_warmup",
        ):
            args[key] = arg
    if "beta1" in args and "beta2" in args:
        args["betas"] = [args.pop("beta1"), args.pop("beta2")]
    if args:
        out.config["optimizer_args"] = args
        out.mapped("optimizer", "…", "optimizer_args", args, "OneTrainer writes every optimizer's fields")


def _every(out: NestedImport, data: dict[str, Any], key: str, steps_key: str, epochs_key: str | None) -> None:
    if key not in data:
        return
    unit = str(data.get(f"{key}_unit", "NEVER")).upper()
    value = data[key]
    if unit == "STEP" and c.as_int(value) > 0:
        out.config[steps_key] = c.as_int(value)
        out.mapped(key, value, steps_key, c.as_int(value), f"{key}_unit STEP")
    elif unit == "EPOCH" and epochs_key is not None and c.as_int(value) > 0:
        out.config[epochs_key] = c.as_int(value)
        out.mapped(key, value, epochs_key, c.as_int(value), f"{key}_unit EPOCH")
    else:
        out.dropped(key, f"{value} {unit}", f"{unit}: no equivalent here")


def _concepts(out: NestedImport, path: Path, data: dict[str, Any]) -> None:
    concepts = data.get("concepts")
    if concepts is None and data.get("concept_file_name"):
        file = Path(str(data["concept_file_name"]))
        if not file.is_absolute() and not file.exists():
            file = path.parent / file
        try:
            concepts = json.loads(file.read_text(encoding="utf-8"))
            out.mapped("concept_file_name", str(file), "datasets", f"{len(concepts)} concepts", "read below")
        except (OSError, json.JSONDecodeError):
            out.dropped(
                "concept_file_name", data["concept_file_name"], "not readable here: add datasets by hand"
            )
            return
    entries = []
    for i, concept in enumerate(concepts or []):
        where = f"concepts[{i}]"
        if concept.get("enabled") is False or str(concept.get("concept_type", "STANDARD")) != "STANDARD":
            out.dropped(where, concept.get("path"), "disabled, or not a training concept")
            continue
        entry: dict[str, Any] = {}
        out.section(where, concept, CONCEPT, into=entry, skip=("text", "image"))
        if str(concept.get("balancing_strategy", "REPEATS")).upper() != "REPEATS":
            entry.pop("num_repeats", None)
        _concept_text(out, where, concept.get("text") or {}, entry)
        _concept_image(out, where, concept.get("image") or {}, entry)
        entries.append(entry)
    if entries:
        out.config["datasets"] = entries


def _concept_image(out: NestedImport, where: str, image: dict[str, Any], entry: dict[str, Any]) -> None:
    """OneTrainer flips images at random unless told not to (ConceptImageConfig's enable_random_flip, on by
    default): our flip_aug. Its other augmentations are dropped where they are on."""
    flip = bool(image.get("enable_random_flip", True))
    entry["flip_aug"] = flip
    out.mapped(f"{where}.image.enable_random_flip", flip, "flip_aug", flip, "on by default in OneTrainer")
    others = sorted(
        key
        for key, value in image.items()
        if key.startswith("enable_") and value is True and "flip" not in key
    )
    if others:
        out.dropped(
            f"{where}.image", ", ".join(others), "OneTrainer's other augmentations have no equivalent here"
        )


def _concept_text(out: NestedImport, where: str, text: dict[str, Any], entry: dict[str, Any]) -> None:
    source = str(text.get("prompt_source", "sample"))
    if source == "sample":
        entry["caption_extension"] = ".txt"
        out.mapped(
            f"{where}.text.prompt_source", source, "caption_extension", ".txt", "a .txt beside each image"
        )
    else:
        note = "captions from a file beside each image only; write .txt captions"
        out.dropped(f"{where}.text.prompt_source", source, note)
    if text.get("enable_tag_shuffling"):
        entry["shuffle_caption"] = True
        out.mapped(f"{where}.text.enable_tag_shuffling", True, "shuffle_caption", True)
    if text.get("keep_tags_count"):
        entry["keep_tokens"] = c.as_int(text["keep_tags_count"])
        out.mapped(
            f"{where}.text.keep_tags_count", text["keep_tags_count"], "keep_tokens", entry["keep_tokens"]
        )


def _samples(out: NestedImport, samples: Any) -> None:
    prompts = []
    for sample in samples or []:
        if not isinstance(sample, dict) or sample.get("enabled") is False or not sample.get("prompt"):
            continue
        line = str(sample["prompt"]).strip()
        for key, flag in SAMPLES.items():
            if sample.get(key) is not None and not (key == "seed" and sample.get("random_seed")):
                line += f" {flag} {sample[key]}"
        if sample.get("negative_prompt"):
            line += f" --n {sample['negative_prompt']}"
        prompts.append(line)
    if prompts:
        out.config["sample_prompts"] = prompts
        out.mapped("samples", len(prompts), "sample_prompts", prompts, "--w --h --d --s --l --n per prompt")
