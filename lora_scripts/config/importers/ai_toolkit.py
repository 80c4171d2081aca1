"""Read an ai-toolkit (ostris/ai-toolkit) training job, the YAML `run.py` takes (`job: extension`,
`config.process[0]` of type sd_trainer), as our config. Its sections (network, save, datasets, train, model,
sample) are mapped by the tables below; docs/import.md shows them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from lora_scripts.config.importers import converters as c
from lora_scripts.config.importers.nested import NestedImport
from lora_scripts.config.importers.sd_scripts_table import Rule
from lora_scripts.errors import UserError

_DETECTED = "the model family is detected from the checkpoint"
_OPTIMIZERS = {
    "adamw": "AdamW",
    "adam": "AdamW",
    "adamw8bit": "AdamW8bit",
    "adam8bit": "AdamW8bit",
    "lion": "Lion",
    "prodigy": "Prodigy",
    "adafactor": "Adafactor",
    "sgd": "SGD",
}
_SCHEDULERS = {
    name: name for name in ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts")
}
_DTYPES = {
    "float32": "no",
    "fp32": "no",
    "float16": "fp16",
    "fp16": "fp16",
    "bfloat16": "bf16",
    "bf16": "bf16",
}
_SAVE_DTYPES = {"float32": "fp32", "fp32": "fp32", "float16": "fp16", "fp16": "fp16", "bf16": "bf16"}
_SAVE_DTYPES["bfloat16"] = "bf16"


# network.type values not trained here, with the reason (a LoRA of network.linear is trained instead).
NOT_TRAINED_TYPES = {
    "dora": "ai-toolkit's DoRA (toolkit/models/DoRA.py) learns a magnitude per output channel, ours one per "
    "input channel",
    "fullrank": "full-rank weights are not trained here",
    "lorm": "LoRM is not trained here",
}


def _caption_ext(value: Any) -> str:
    text = str(value).strip()
    return text if text.startswith(".") else f".{text}"


def _quantize(value: Any) -> str:
    # ai-toolkit quantizes the transformer/UNet with optimum-quanto's qfloat8 unless model.qtype says
    # otherwise; ours uses the same library, so float8 (e4m3) is the same storage.
    if not c.as_bool(value):
        raise ValueError("false: the same as leaving it out")
    return "float8"


def _low_vram(value: Any) -> str:
    if not c.as_bool(value):
        raise ValueError("false: the same as leaving it out")
    return "low"


def _timestep_type(value: Any) -> str:
    # ai-toolkit's sigmoid draws t = sigmoid(randn), sd-scripts' and our `sigmoid`; its other types
    # (linear, shift, weighted, lognorm_blend) space or weight the steps in ways we have no twin for.
    if str(value).lower() != "sigmoid":
        raise ValueError(f"{value}: no equivalent here (ours: sigmoid, uniform, shift, flux_shift)")
    return "sigmoid"


NETWORK: dict[str, Rule] = {
    "type": Rule(
        "network_type",
        note="lora, lokr; locon/lycoris: locon with conv (lora without); dora (a magnitude per output "
        "channel), fullrank, lorm are dropped; FLUX.1: lora only; every linear layer: our `kohya` preset",
    ),
    "linear": Rule("lora_rank", c.as_int),
    "linear_alpha": Rule("lora_alpha", c.as_float),
    "conv": Rule("conv_rank", c.as_int, "LoCon"),
    "conv_alpha": Rule("conv_alpha", c.as_float),
    "lokr_full_rank": Rule(
        "lokr_full_matrix", c.as_bool, "lokr only; true by default in ai-toolkit (and then the 3x3 convs too)"
    ),
    "lokr_factor": Rule("lokr_factor", c.as_int, "lokr only"),
    "old_lokr_format": Rule(None, note="ai-toolkit's own LoKr file layout; ours is LyCORIS'"),
    "dropout": Rule("network_dropout", c.as_float, "not with lokr (ai-toolkit's LoKr ignores it too)"),
    "network_kwargs": Rule(
        None, note="layer filters (only_if_contains, ignore_if_contains) have no equivalent"
    ),
}
SAVE: dict[str, Rule] = {
    "dtype": Rule("save_precision", c.choice(_SAVE_DTYPES, "save.dtype")),
    "save_every": Rule("save_steps", c.as_int),
    "max_step_saves_to_keep": Rule(None, note="every save_steps file is kept here"),
    "push_to_hub": Rule(None, note="uploading to the Hugging Face Hub is not part of training here"),
    "hf_repo_id": Rule(None, note="uploading to the Hugging Face Hub is not part of training here"),
    "hf_private": Rule(None, note="uploading to the Hugging Face Hub is not part of training here"),
}
DATASET: dict[str, Rule] = {
    "folder_path": Rule("train_data_dir", c.as_str),
    "caption_ext": Rule("caption_extension", _caption_ext),
    "caption_dropout_rate": Rule("caption_dropout_rate", c.as_float, "set for the whole run here"),
    "shuffle_tokens": Rule("shuffle_caption", c.as_bool),
    "keep_tokens": Rule("keep_tokens", c.as_int),
    "token_dropout_rate": Rule("caption_tag_dropout_rate", c.as_float, "set for the whole run here"),
    "flip_x": Rule("flip_aug", c.as_bool, "set for the whole run here"),
    "num_repeats": Rule("num_repeats", c.as_int),
    "is_reg": Rule("is_reg", c.as_bool),
    "cache_latents": Rule("cache_latents", c.as_bool, "set for the whole run here"),
    "cache_latents_to_disk": Rule("cache_latents_to_disk", c.as_bool, "set for the whole run here"),
    "resolution": Rule("resolution", note="one dataset entry per resolution, as ai-toolkit trains each"),
    "default_caption": Rule(None, note="an image without a caption file trains with an empty caption here"),
    "flip_y": Rule(None, note="no equivalent here"),
}
TRAIN: dict[str, Rule] = {
    "batch_size": Rule("batch_size", c.as_int),
    "steps": Rule("max_train_steps", c.as_int),
    "gradient_accumulation_steps": Rule("gradient_accumulation_steps", c.as_int),
    "gradient_accumulation": Rule("gradient_accumulation_steps", c.as_int),
    "train_unet": Rule(None, note="the UNet/transformer LoRA is always trained here"),
    "train_text_encoder": Rule("train_text_encoder", c.as_bool),
    "gradient_checkpointing": Rule("gradient_checkpointing", c.as_bool),
    "optimizer": Rule("optimizer_type", c.choice(_OPTIMIZERS, "optimizer")),
    "optimizer_params": Rule("optimizer_args", dict),
    "lr": Rule("learning_rate", c.as_float),
    "unet_lr": Rule("unet_lr", c.as_float),
    "text_encoder_lr": Rule("text_encoder_lr", c.as_float),
    "lr_scheduler": Rule("lr_scheduler", c.choice(_SCHEDULERS, "lr_scheduler")),
    "lr_warmup_steps": Rule("lr_warmup_steps", c.int_or_float),
    "dtype": Rule("mixed_precision", c.choice(_DTYPES, "train.dtype")),
    "max_grad_norm": Rule("max_grad_norm", c.as_float),
    "noise_offset": Rule("noise_offset", c.as_float),
    "min_snr_gamma": Rule("min_snr_gamma", c.as_float),
    "timestep_type": Rule("timestep_sampling", _timestep_type),
    "noise_scheduler": Rule(None, note="the family picks it: DDPM for SD, flow matching for FLUX.1"),
    "ema_config": Rule(None, note="no EMA of the LoRA weights here"),
    "content_or_style": Rule(None, note="its timestep weighting has no equivalent here"),
    "linear_timesteps": Rule(None, note="its timestep weighting has no equivalent here"),
    "skip_first_sample": Rule(None, note="read as sample_at_first: false"),
    "disable_sampling": Rule(None, note="read as: no sample_prompts"),
    "bypass_guidance_embedding": Rule(None, note="no equivalent here"),
}
MODEL: dict[str, Rule] = {
    "name_or_path": Rule("base_model", c.as_str, "a Hugging Face id is read from the local hub cache"),
    "quantize": Rule("quantize_base", _quantize, "ai-toolkit's default qtype is qfloat8 (optimum-quanto)"),
    "low_vram": Rule("memory_profile", _low_vram),
    "is_flux": Rule(None, note=_DETECTED),
    "is_xl": Rule(None, note=_DETECTED),
    "is_v2": Rule(None, note=_DETECTED),
    "is_v_pred": Rule("v_parameterization", c.as_bool),
    "quantize_te": Rule(None, note="quantize_base covers the UNet/transformer only"),
    "qtype": Rule(None, note="read with quantize"),
    "arch": Rule(None, note=_DETECTED),
}
SAMPLE: dict[str, Rule] = {
    "sample_every": Rule("sample_every_n_steps", c.as_int),
    "prompts": Rule("sample_prompts", note="each with --w --h --d --l --s --n from the keys below"),
    "sampler": Rule(None, note="the sample_sampler default fits the family (FLUX.1: its Euler)"),
    "sample_start_step": Rule(None, note="no equivalent here"),
    "width": Rule(None, note="--w of each prompt"),
    "height": Rule(None, note="--h of each prompt"),
    "neg": Rule(None, note="--n of each prompt"),
    "seed": Rule(None, note="--d of each prompt"),
    "walk_seed": Rule(None, note="--d counts up from seed, one per prompt"),
    "guidance_scale": Rule(None, note="--l of each prompt"),
    "sample_steps": Rule(None, note="--s of each prompt"),
}
PROCESS: dict[str, Rule] = {
    "type": Rule(None, note="sd_trainer is the only process read"),
    "training_folder": Rule("output_dir", note="training_folder/name, as ai-toolkit writes there"),
    "trigger_word": Rule(
        "trigger_word", c.as_str, "[trigger] in prompts is replaced; captions are not edited"
    ),
    "device": Rule(None, note="the GPU is picked when training starts"),
    "performance_log_every": Rule(None, note="no equivalent here"),
    "logging": Rule(None, note="TensorBoard logs go to output_dir/logs"),
}
SECTIONS = {
    "process": PROCESS,
    "network": NETWORK,
    "save": SAVE,
    "datasets[]": DATASET,
    "train": TRAIN,
    "model": MODEL,
    "sample": SAMPLE,
}


def is_ai_toolkit_job(data: Any) -> bool:
    return (
        isinstance(data, dict)
        and "job" in data
        and isinstance(data.get("config"), dict)
        and ("process" in data["config"])
    )


def read_yaml(path: Path) -> Any:
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise UserError(f"{path}: not valid YAML ({exc}).") from exc


def import_ai_toolkit(path: Path, data: dict[str, Any]) -> NestedImport:
    """Map the first sd_trainer process of the job at `path`; `data` is its parsed YAML."""
    out = NestedImport(str(path))
    config = data["config"]
    processes = config.get("process") or []
    trainers = [p for p in processes if isinstance(p, dict) and p.get("type") in ("sd_trainer", "ui_trainer")]
    if not trainers:
        raise UserError(f"{path}: no sd_trainer process in config.process; only LoRA training jobs are read.")
    process = trainers[0]
    for i, other in enumerate(processes):
        if other is not process:
            out.dropped(f"config.process[{i}]", other.get("type"), "one training run per config here")
    out.dropped("job", data["job"], "ai-toolkit's runner")
    for name in data:
        if name not in ("job", "config"):
            out.dropped(name, data[name], "ai-toolkit's own notes, not training settings")
    name = str(config.get("name", "lora"))
    folder = str(process.get("training_folder", "output"))
    out.config["output_dir"] = f"{folder.rstrip('/')}/{name}"
    out.mapped("config.name", name, "output_name", name)
    out.config["output_name"] = name
    sections = ("network", "save", "datasets", "train", "model", "sample")
    out.section("process", process, PROCESS, skip=(*sections, "training_folder"))
    out.mapped(
        "training_folder", folder, "output_dir", out.config["output_dir"], PROCESS["training_folder"].note
    )
    network = process.get("network") or {}
    out.section("network", network, NETWORK, skip=_NETWORK_KEYS)
    _network(out, network, process.get("model") or {})
    for section in ("save", "model"):
        out.section(section, process.get(section) or {}, SECTIONS[section])
    train = process.get("train") or {}
    out.section("train", train, TRAIN)
    _quantize_type(out, process.get("model") or {})
    out.config.setdefault("target_modules", "kohya")
    _datasets(out, process.get("datasets") or [])
    _samples(out, process.get("sample") or {}, train, process.get("trigger_word"))
    return out


_NETWORK_KEYS = ("type", "conv", "conv_alpha", "lokr_full_rank", "lokr_factor", "dropout")


def _network(out: NestedImport, network: dict[str, Any], model: dict[str, Any]) -> None:
    """network_type from network.type (ai-toolkit: lora and lokr in toolkit/lora_special.py, locon/lycoris
    through LyCORIS' LoConModule, 3x3 convs only with conv) and the keys that depend on it."""
    given = {key: network[key] for key in _NETWORK_KEYS if key in network}
    flux = str(model.get("is_flux", "")).lower() == "true" or "flux" in str(model.get("arch", "")).lower()

    def drop(key: str, note: str) -> None:
        if key in given:
            out.dropped(f"network.{key}", given.pop(key), note)

    def convert(key: str) -> Any:
        if key not in given:
            return None
        rule = NETWORK[key]
        value = out.convert(f"network.{key}", given.pop(key), rule)
        if value is not None:
            out.config[str(rule.key)] = value
        return value

    kind = str(given.get("type", "lora")).strip().lower()
    network_type = {"lora": "lora", "locon": "locon", "lycoris": "locon", "lokr": "lokr"}.get(kind)
    if network_type is None:
        reason = NOT_TRAINED_TYPES.get(kind, f"{kind} is not trained here")
        drop("type", f"{reason}; a LoRA of network.linear is trained instead")
        network_type = "lora"
    elif flux and network_type == "lokr":
        drop("type", "FLUX.1 trains network_type lora only here; a LoRA of network.linear is trained instead")
        network_type = "lora"
    elif network_type == "locon" and ("conv" not in given or flux):
        network_type = "lora"  # LyCORIS' LoConModule; ai-toolkit passes no conv dim without network.conv
    out.config["network_type"] = network_type
    if "type" in given:
        note = {
            "lora": "every linear layer (our `kohya` preset); the 3x3 convs with network.conv",
            "locon": "LyCORIS' LoCon: the 3x3 convs at network.conv",
            "lokr": "every linear layer (our `kohya` preset)",
        }[network_type]
        if kind in ("locon", "lycoris") and network_type == "lora":
            note = "ai-toolkit's LoCon trains the 3x3 convs only with network.conv: a LoRA"
        out.mapped("network.type", given.pop("type"), "network_type", network_type, note)
    if flux:
        drop("conv", "FLUX.1 has no 3x3 convs")
        drop("conv_alpha", "FLUX.1 has no 3x3 convs")
    convert("conv")
    convert("conv_alpha")
    if network_type == "lokr":
        full = "lokr_full_rank" not in given or convert("lokr_full_rank") is not False
        if "lokr_full_matrix" not in out.config and full:
            out.config["lokr_full_matrix"] = True
            out.mapped("network.type", "lokr", "lokr_full_matrix", True, "ai-toolkit's lokr_full_rank: true")
        if full and "conv_rank" not in out.config and not flux:
            # ai-toolkit sets conv (and every rank and alpha) to 9999999999: full-matrix convs; the rank does
            # not matter with lokr_full_matrix (its scale is 1).
            try:
                rank = c.as_int(network.get("linear", network.get("rank", 4)))
            except ValueError:
                rank = 4
            out.config["conv_rank"] = rank
            note = "ai-toolkit's full-rank LoKr trains the 3x3 convs too"
            if "lokr_full_rank" in network:
                out.mapped("network.lokr_full_rank", network["lokr_full_rank"], "conv_rank", rank, note)
            else:
                out.mapped("network.type", "lokr", "conv_rank", rank, note)
        convert("lokr_factor")
        drop("dropout", "ai-toolkit's LoKr ignores it; lokr takes no dropout here")
    else:
        ignored = f"lokr only; ai-toolkit ignores it with type {kind}"
        drop("lokr_full_rank", ignored)
        drop("lokr_factor", ignored)
    convert("dropout")


def _quantize_type(out: NestedImport, model: dict[str, Any]) -> None:
    qtype = str(model.get("qtype", "qfloat8")).lower()
    if "quantize_base" in out.config and qtype != "qfloat8":
        if qtype == "qint8":
            out.config["quantize_base"] = "int8"
        else:
            del out.config["quantize_base"]
            out.dropped("model.qtype", qtype, "quantize_base stores 8-bit weights only (float8, int8)")


def _datasets(out: NestedImport, datasets: list[dict[str, Any]]) -> None:
    """One entry per dataset and resolution; run-wide keys (caption dropout, caching) go to the top level."""
    entries: list[dict[str, Any]] = []
    largest = 0
    for i, dataset in enumerate(datasets):
        entry: dict[str, Any] = {}
        out.section(f"datasets[{i}]", dataset, DATASET, into=entry, skip=("resolution",))
        for key in ("caption_dropout_rate", "caption_tag_dropout_rate", "flip_aug"):
            if key in entry:
                out.config[key] = max(entry.pop(key), out.config.get(key, 0))
        for key in ("cache_latents", "cache_latents_to_disk"):
            if key in entry:
                out.config[key] = entry.pop(key)
        resolutions = dataset.get("resolution", 512)
        sides = resolutions if isinstance(resolutions, list) else [resolutions]
        sides = [c.resolution(side) for side in sides]
        out.mapped(
            f"datasets[{i}].resolution",
            resolutions,
            "datasets[].resolution",
            sides,
            DATASET["resolution"].note,
        )
        largest = max(largest, *sides)
        entries.extend({**entry, "resolution": side} for side in sides)
    if entries:
        out.config["datasets"] = entries
        out.config["resolution"] = largest
        out.config["enable_bucket"] = True
        out.config["max_bucket_reso"] = 2 * largest
        out.mapped(
            "datasets[].resolution",
            largest,
            "resolution",
            largest,
            "the largest (sample size default); ai-toolkit always buckets by aspect: enable_bucket: true, "
            f"max_bucket_reso: {2 * largest}",
        )


def _samples(out: NestedImport, sample: dict[str, Any], train: dict[str, Any], trigger: Any) -> None:
    """ai-toolkit's prompts and their shared settings become prompt lines with our --options."""
    out.section("sample", sample, SAMPLE, skip=("prompts",))
    if train.get("disable_sampling") is True:
        out.config.pop("sample_every_n_steps", None)
        return
    options = []
    for flag, key in (
        ("--w", "width"),
        ("--h", "height"),
        ("--s", "sample_steps"),
        ("--l", "guidance_scale"),
    ):
        if sample.get(key) is not None:
            options.append(f"{flag} {sample[key]}")
    negative = str(sample.get("neg") or "").strip()
    seed = sample.get("seed")
    prompts = []
    for i, prompt in enumerate(sample.get("prompts") or []):
        text = str(prompt).replace("[trigger]", str(trigger)) if trigger else str(prompt)
        line = " ".join([text.strip(), *options])
        if seed is not None:
            line += f" --d {int(seed) + (i if sample.get('walk_seed') else 0)}"
        if negative:
            line += f" --n {negative}"
        prompts.append(line)
    if prompts:
        out.config["sample_prompts"] = prompts
        out.config["sample_at_first"] = train.get("skip_first_sample") is not True
        out.mapped("sample.prompts", len(prompts), "sample_prompts", prompts)
        out.mapped(
            "train.skip_first_sample",
            train.get("skip_first_sample"),
            "sample_at_first",
            out.config["sample_at_first"],
            "ai-toolkit samples before the first step unless told not to",
        )
