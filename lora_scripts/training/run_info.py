"""The metadata every file of a run carries: sd-scripts' `ss_*` keys, from the config and the training set."""

from __future__ import annotations

import json
from pathlib import Path

from lora_scripts.config import TrainConfig
from lora_scripts.data import tag_frequency
from lora_scripts.data.training_set import TrainingSet
from lora_scripts.export.metadata import RunMetadata
from lora_scripts.models.family import ModelFamily
from lora_scripts.training.noise import resolve_zero_terminal_snr
from lora_scripts.training.plan import TrainingPlan


def _targets(value: str | tuple[str, ...]) -> list[str] | str:
    return value if isinstance(value, str) else list(value)


def run_metadata(
    config: TrainConfig, family: ModelFamily, training_set: TrainingSet, plan: TrainingPlan, optimizer: str
) -> RunMetadata:
    """sd-scripts' keys, spelt and valued as sd-scripts writes them (strings of Python values)."""
    network_module, network_args = _network_args(config)
    return RunMetadata(
        family=family.info,
        rank=config.lora_rank,
        alpha=config.lora_alpha,
        target_modules=_targets(config.target_modules),
        text_encoder_target_modules=(
            _targets(config.text_encoder_target_modules) if config.train_text_encoder else None
        ),
        resolution=config.resolution,
        # sd-scripts counts training images with their repeats.
        num_train_images=training_set.num_train_samples,
        num_batches_per_epoch=plan.batches_per_epoch,
        num_epochs=plan.num_epochs,
        max_train_steps=plan.max_train_steps,
        batch_size=config.batch_size,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        learning_rate=config.learning_rate,
        unet_lr=config.unet_lr,
        text_encoder_lr=config.text_encoder_lr if config.train_text_encoder else None,
        lr_scheduler=config.lr_scheduler,
        lr_warmup_steps=plan.warmup_steps,
        max_grad_norm=config.max_grad_norm,
        mixed_precision=config.mixed_precision,
        seed=config.seed,
        sd_model_name=Path(config.base_model).name,
        tag_frequency=_tag_frequency(training_set),
        optimizer=optimizer,
        network_args=network_args,
        network_module=network_module,
        extra=_extra(config, training_set, zero_terminal_snr=_zero_terminal_snr(config, family)),
    )


def _network_args(config: TrainConfig) -> tuple[str, dict[str, object]]:
    """sd-scripts' network module and args: networks.lora's (conv_dim, conv_alpha, dropout), or LyCORIS'
    (lycoris.kohya with algo lora / loha / lokr, factor, full_matrix, dora_wd; LyCORIS names, as its files
    carry them), all values strings as sd-scripts writes them ("conv_dim": "4")."""
    args: dict[str, object] = {}
    lycoris = config.network_type in ("loha", "lokr", "dora")
    if lycoris:
        args["algo"] = {"dora": "lora"}.get(config.network_type, config.network_type)
    if config.conv_rank is not None:
        args.update(conv_dim=str(config.conv_rank), conv_alpha=str(config.conv_alpha))
    if config.network_dropout:
        args["dropout"] = str(config.network_dropout)
    if config.network_type == "lokr":
        args.update(factor=str(config.lokr_factor), full_matrix=str(config.lokr_full_matrix))
    if config.network_type == "dora":
        args.update(dora_wd="True", wd_on_output="False")  # a magnitude per input channel (models/dora.py)
    return ("lycoris.kohya" if lycoris else "networks.lora"), args


def _zero_terminal_snr(config: TrainConfig, family: ModelFamily) -> bool:
    """What the run trains with: the config's value, or the base model's marker when it is left out."""
    return resolve_zero_terminal_snr(config.zero_terminal_snr, family.info.zero_terminal_snr)


def _tag_frequency(training_set: TrainingSet) -> dict[str, dict[str, int]]:
    """Per training dataset folder name, as sd-scripts keys `ss_tag_frequency`."""
    out: dict[str, dict[str, int]] = {}
    for index, dataset in enumerate(training_set.datasets):
        if dataset.is_reg:
            continue
        items = [item for item in training_set.images if item.subset == index]
        out[Path(dataset.train_data_dir).name] = tag_frequency(items)
    return out


def _extra(config: TrainConfig, training_set: TrainingSet, *, zero_terminal_snr: bool) -> dict[str, str]:
    # sd-scripts lists regularization folders apart, under ss_reg_dataset_dirs (train_network.py).
    dataset_dirs: dict[str, dict[str, int]] = {}
    reg_dataset_dirs: dict[str, dict[str, int]] = {}
    for item in training_set.images:
        folder = (
            Path(item.file_name).parent.name or Path(training_set.datasets[item.subset].train_data_dir).name
        )
        dirs = reg_dataset_dirs if item.is_reg else dataset_dirs
        entry = dirs.setdefault(folder, {"n_repeats": item.repeats, "img_count": 0})
        entry["img_count"] += 1
    buckets = {
        str(i): {"resolution": list(bucket), "count": count}
        for i, (bucket, count) in enumerate(training_set.bucket_counts().items())
    }
    first = training_set.datasets[0]
    return {
        "ss_num_reg_images": str(training_set.num_reg_images),
        "ss_prior_loss_weight": str(config.prior_loss_weight),
        "ss_dataset_dirs": json.dumps(dataset_dirs, ensure_ascii=False),
        "ss_reg_dataset_dirs": json.dumps(reg_dataset_dirs, ensure_ascii=False),
        "ss_enable_bucket": str(config.enable_bucket),
        "ss_min_bucket_reso": str(config.min_bucket_reso),
        "ss_max_bucket_reso": str(config.max_bucket_reso),
        "ss_bucket_no_upscale": str(config.bucket_no_upscale),
        "ss_bucket_info": json.dumps({"buckets": buckets}),
        "ss_shuffle_caption": str(first.shuffle_caption),
        "ss_keep_tokens": str(first.keep_tokens),
        "ss_caption_dropout_rate": str(first.caption_dropout_rate),
        "ss_caption_tag_dropout_rate": str(first.caption_tag_dropout_rate),
        "ss_flip_aug": str(first.flip_aug),
        "ss_random_crop": str(first.random_crop),
        "ss_cache_latents": str(config.cache_latents),
        "ss_network_dropout": str(config.network_dropout) if config.network_dropout else "None",
        "ss_min_snr_gamma": str(config.min_snr_gamma),
        "ss_noise_offset": str(config.noise_offset) if config.noise_offset else "None",
        "ss_multires_noise_iterations": str(config.multires_noise_iterations or None),
        "ss_multires_noise_discount": str(config.multires_noise_discount),
        "ss_zero_terminal_snr": str(zero_terminal_snr),
        "ss_clip_skip": str(config.clip_skip),
        "ss_max_token_length": str(config.max_token_length),
        "ss_loss_type": config.loss_type,
        "ss_huber_schedule": config.huber_schedule,
        "ss_huber_c": str(config.huber_c),
        # sd-scripts records its float8 base (--fp8_base) as ss_fp8_base; ours may also be int8.
        "ss_fp8_base": str(config.quantize_base == "float8"),
        "ss_quantize_base": config.quantize_base,
    }
