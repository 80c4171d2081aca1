"""Settings that are each valid but do not work together: checked up front, each naming the key to change.

Runs on the validated, not yet resolved config, so `model_fields_set` still says which keys the user wrote
(a key that only matters with another one is an error only when it was written).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from lora_scripts.config.schema import TrainConfig
from lora_scripts.models.quantize import INSTALL_HINT, quanto_available

Problem = tuple[str, str]


def cross_key_problems(config: TrainConfig) -> list[Problem]:
    """(key path, problem) for every conflict in `config`."""
    problems: list[Problem] = []
    rules = (
        _dataset_rules,
        _warmup_rules,
        _crop_and_cache_rules,
        _bucket_rules,
        _loss_rules,
        _safety_rules,
        _quantize_rules,
        _block_swap_rules,
        _network_type_rules,
    )
    for rule in rules:
        problems += rule(config)
    problems += _optimizer_rules(config)
    return problems


def _written(config: TrainConfig, key: str) -> bool:
    """The user set `key` to something other than its default (a dumped config.yaml lists every key)."""
    return key in config.model_fields_set and getattr(config, key) != TrainConfig.model_fields[key].default


def _per_dataset(config: TrainConfig, key: str) -> Iterator[tuple[str, object]]:
    """(key path, value) of `key` at the top level and in every `datasets` entry that sets it."""
    yield key, getattr(config, key)
    for i, entry in enumerate(config.datasets or []):
        value = getattr(entry, key)
        if value is not None:
            yield f"datasets[{i}].{key}", value


def _dataset_rules(config: TrainConfig) -> list[Problem]:
    problems: list[Problem] = []
    if config.train_data_dir is not None and config.datasets is not None:
        problems.append(
            (
                "datasets",
                "use either train_data_dir (one dataset) or datasets (several), not both; move "
                "train_data_dir into datasets as its first entry",
            )
        )
    if config.datasets is not None and config.metadata_path is not None:
        problems.append(
            ("metadata_path", "with datasets, set metadata_path inside the entry whose folder it describes")
        )
    if config.datasets is not None and all(entry.is_reg for entry in config.datasets):
        problems.append(("datasets", "every entry has is_reg: true; at least one must hold training images"))
    has_reg = config.reg_data_dir is not None or any(e.is_reg for e in config.datasets or [])
    if _written(config, "prior_loss_weight") and not has_reg:
        problems.append(
            ("prior_loss_weight", "has no effect without regularization images (set reg_data_dir)")
        )
    if config.conv_alpha is not None and config.conv_rank is None:
        problems.append(
            ("conv_alpha", "has no effect without conv_rank (set conv_rank to train conv layers)")
        )
    return problems


def _network_type_rules(config: TrainConfig) -> list[Problem]:
    problems: list[Problem] = []
    for key in ("lokr_factor", "lokr_full_matrix"):
        if _written(config, key) and config.network_type != "lokr":
            problems.append(
                (key, f"applies to network_type: lokr only (this config has {config.network_type})")
            )
    if config.lokr_factor == 0 or config.lokr_factor < -1:
        problems.append(
            ("lokr_factor", f"{config.lokr_factor} is neither -1 (automatic) nor a size of 1 or more")
        )
    if config.network_type in ("loha", "lokr") and config.network_dropout:
        problems.append(
            (
                "network_dropout",
                f"applies to lora, locon and dora networks; {config.network_type} has no dropout on its "
                "input (leave network_dropout out)",
            )
        )
    return problems


def _warmup_rules(config: TrainConfig) -> list[Problem]:
    problems: list[Problem] = []
    warmup = config.lr_warmup_steps
    if warmup > 0 and config.lr_scheduler == "constant":
        problems.append(
            (
                "lr_warmup_steps",
                f"{warmup} has no effect with lr_scheduler 'constant' "
                "(use 'constant_with_warmup', or leave lr_warmup_steps out)",
            )
        )
    if isinstance(warmup, int) and config.max_train_steps is not None and warmup >= config.max_train_steps:
        problems.append(
            ("lr_warmup_steps", f"{warmup} is not less than max_train_steps ({config.max_train_steps})")
        )
    return problems


def _crop_and_cache_rules(config: TrainConfig) -> list[Problem]:
    problems: list[Problem] = []
    # Only when both were written: `center_crop: false` alone is the diffusers spelling of random_crop: true.
    both = config.center_crop is not None and "random_crop" in config.model_fields_set
    if both and config.center_crop == config.random_crop:
        problems.append(
            (
                "center_crop",
                f"{'true' if config.center_crop else 'false'} contradicts random_crop: "
                f"{'true' if config.random_crop else 'false'}; keep only one of the two keys",
            )
        )
    cached = config.cache_latents or config.cache_latents_to_disk
    random_crops = config.random_crop_keys()  # an explicit true only: left out, the cache turns itself off
    if cached and random_crops:
        problems.append(
            (
                "cache_latents",
                f"cannot be used with random crops ({', '.join(random_crops)}): a cached latent has one "
                "fixed "
                "crop; turn off the random crop or set cache_latents: false",
            )
        )
    if _written(config, "cache_dir") and not config.cache_latents_to_disk:
        problems.append(("cache_dir", "has no effect without cache_latents_to_disk: true"))
    if config.cache_text_encoder_outputs:
        if config.train_text_encoder:
            problems.append(
                (
                    "cache_text_encoder_outputs",
                    "cannot be used with train_text_encoder: true (a trained text encoder changes its "
                    "outputs); turn one of them off",
                )
            )
        changing = config.changing_caption_keys()
        if changing:
            problems.append(
                (
                    "cache_text_encoder_outputs",
                    f"needs captions that stay the same, but {' and '.join(changing)} "
                    f"{'changes' if len(changing) == 1 else 'change'} them at every "
                    "step; turn those off or set cache_text_encoder_outputs: false",
                )
            )
    return problems


def _bucket_rules(config: TrainConfig) -> list[Problem]:
    problems: list[Problem] = []
    if not config.enable_bucket:
        for key in ("min_bucket_reso", "max_bucket_reso", "bucket_reso_steps", "bucket_no_upscale"):
            if _written(config, key):
                problems.append((key, "has no effect without enable_bucket: true"))
        return problems
    low, high = config.min_bucket_reso, config.max_bucket_reso
    if low > high:
        problems.append(("min_bucket_reso", f"{low} is larger than max_bucket_reso ({high})"))
        return problems
    steps = config.bucket_reso_steps
    for key in ("min_bucket_reso", "max_bucket_reso"):
        if getattr(config, key) % steps:
            problems.append((key, f"{getattr(config, key)} is not a multiple of bucket_reso_steps ({steps})"))
    for path, value in _per_dataset(config, "resolution"):
        if not low <= value <= high:  # type: ignore[operator]
            problems.append(
                (
                    path,
                    f"{value} is outside min_bucket_reso..max_bucket_reso ({low}..{high}); widen the range",
                )
            )
    return problems


def _loss_rules(config: TrainConfig) -> list[Problem]:
    problems: list[Problem] = []
    if config.loss_type in ("l2", "l1"):
        for key in ("huber_c", "huber_schedule"):
            if _written(config, key):
                problems.append((key, "is only used by loss_type 'huber' or 'smooth_l1'"))
    if _written(config, "multires_noise_discount") and config.multires_noise_iterations == 0:
        problems.append(("multires_noise_discount", "has no effect without multires_noise_iterations"))
    # Only an explicit true: left out, it follows the checkpoint's marker (training warns for epsilon).
    if config.zero_terminal_snr is True and config.v_parameterization is False:
        problems.append(
            (
                "zero_terminal_snr",
                "needs a v-prediction model (v_parameterization: true): with epsilon prediction the model "
                "cannot learn what to do at the pure-noise last timestep",
            )
        )
    return problems


def _safety_rules(config: TrainConfig) -> list[Problem]:
    problems: list[Problem] = []
    validating = config.validation_split > 0 or config.validation_data_dir is not None
    if config.validation_split > 0 and config.validation_data_dir is not None:
        problems.append(("validation_split", "use either validation_split or validation_data_dir, not both"))
    for key in ("validate_every_n_steps", "early_stopping_patience"):
        if _written(config, key) and not validating:
            problems.append((key, "has no effect without validation_split or validation_data_dir"))
    if _written(config, "save_last_n_states") and not config.save_state:
        problems.append(("save_last_n_states", "has no effect with save_state: false"))
    return problems


def _quantize_rules(config: TrainConfig) -> list[Problem]:
    if config.quantize_base == "no" or quanto_available():
        return []
    return [
        (
            "quantize_base",
            f"{config.quantize_base} needs optimum-quanto; install it ({INSTALL_HINT}) or set "
            "quantize_base: no",
        )
    ]


def _block_swap_rules(config: TrainConfig) -> list[Problem]:
    if not config.blocks_to_swap:
        return []
    problems: list[Problem] = []
    resolved = config.with_memory_profile() if config.memory_profile == "low" else config
    if not resolved.gradient_checkpointing:
        problems.append(
            (
                "blocks_to_swap",
                "needs gradient_checkpointing: true (the backward brings each swapped block back by "
                "recomputing its forward); set it, or use memory_profile: low, which sets it",
            )
        )
    if config.torch_compile:
        problems.append(
            (
                "blocks_to_swap",
                "moves weights between the CPU and the GPU, which torch_compile cannot follow; "
                "set torch_compile: false",
            )
        )
    return problems


def _optimizer_rules(config: TrainConfig) -> list[Problem]:
    # Imported here: the optimizer module imports diffusers, which only this rule needs.
    from lora_scripts.training.optim import optimizer_problems

    unet_lr = config.unet_lr or config.learning_rate
    return optimizer_problems(
        config.optimizer_type,
        config.optimizer_args,
        lr_scheduler=config.lr_scheduler,
        learning_rate=unet_lr,
        cuda_available=torch.cuda.is_available(),
        text_encoder_lr=(config.text_encoder_lr or config.learning_rate)
        if config.train_text_encoder
        else None,
    )
