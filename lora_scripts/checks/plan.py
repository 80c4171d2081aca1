"""What a run will do, worked out without loading weights: its steps, its LoRA's size, the files it writes.

The trainable-parameter count builds the UNet (and the text encoder) from its config on the meta device
(shapes only, no memory), adds the same peft adapter training adds, and counts; this also checks
`target_modules` against the real layer names, with the message training would give.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from accelerate import init_empty_weights
from diffusers import UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from lora_scripts.config import TrainConfig
from lora_scripts.errors import UserError
from lora_scripts.models.detect import SDVersion, detect_sd_version, read_checkpoint
from lora_scripts.models.locate import locate_base_model
from lora_scripts.models.lora import add_lora_adapter, check_targets

# The loader's own rules for a diffusers folder, so that `check` and `train` refuse the same models.
from lora_scripts.models.sd_loading import folder_config, shipped_config_dir, version_from_unet_config
from lora_scripts.training.plan import TrainingPlan
from lora_scripts.training.saving import FINAL_DIFFUSERS_NAME, step_file_name

CONFIG_FILE_NAME = "config.yaml"  # what train() dumps the resolved config as


@dataclass(frozen=True)
class PlanFacts:
    """Step arithmetic of a run on `num_processes` processes. A step is one optimizer update."""

    num_images: int
    repeats: int  # times each image is seen per epoch (always 1 until repeats exist in the config)
    num_processes: int
    batch_size: int
    gradient_accumulation_steps: int
    batches_per_epoch: int  # per process, a partial last batch included
    steps_per_epoch: int
    epochs: int  # epochs started (the last one may be cut short by max_train_steps)
    total_steps: int
    limited_by: str  # "epochs" or "max_train_steps"

    @property
    def effective_batch_size(self) -> int:
        """Images per optimizer step over all processes."""
        return self.batch_size * self.gradient_accumulation_steps * self.num_processes


def plan_facts(
    num_images: int, config: TrainConfig, *, repeats: int = 1, num_processes: int = 1
) -> PlanFacts:
    """The same TrainingPlan train() computes, for a dataset of `num_images` images.

    `repeats` is the seam for kohya-style repeats: they multiply the samples of an epoch, nothing else.
    Batches are counted as train()'s DataLoader makes them (last partial batch kept) and as accelerate
    shards them over processes (every process gets the same count).
    """
    samples = num_images * repeats
    batches = math.ceil(math.ceil(samples / config.batch_size) / num_processes)
    plan = TrainingPlan.compute(
        num_images=num_images,
        batches_per_epoch=batches,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        epochs=config.epochs,
        max_train_steps=config.max_train_steps,
    )
    return PlanFacts(
        num_images=num_images,
        repeats=repeats,
        num_processes=num_processes,
        batch_size=config.batch_size,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        batches_per_epoch=plan.batches_per_epoch,
        steps_per_epoch=plan.steps_per_epoch,
        epochs=plan.num_epochs,
        total_steps=plan.max_train_steps,
        limited_by="epochs" if config.max_train_steps is None else "max_train_steps",
    )


@dataclass(frozen=True)
class NetworkFacts:
    """The base model as far as the LoRA is concerned, and the LoRA's trainable parameter counts."""

    base_model_kind: str  # "single_file", "diffusers_folder" or "hub_cache"
    sd_version: SDVersion
    architecture_from: Path  # the folder whose unet/ and text_encoder/ configs describe the model
    rank: int
    alpha: float
    unet_parameters: int
    text_encoder_parameters: int  # 0 when train_text_encoder is false

    @property
    def total_parameters(self) -> int:
        return self.unet_parameters + self.text_encoder_parameters


def network_facts(config: TrainConfig) -> NetworkFacts:
    """Count the LoRA's trainable parameters without reading any weight.

    Raises UserError for a base model training could not use (as the loader words it) and for every
    target name that matches no layer (as training words it).
    """
    location = locate_base_model(config.base_model)
    if location.kind == "single_file":
        version = detect_sd_version(_checkpoint_shapes(location.path), location.path)
        config_dir = Path(config.base_model_config or shipped_config_dir(version))
        for sub in ("unet", "vae", "text_encoder"):
            if not (config_dir / sub / "config.json").is_file():
                raise UserError(
                    f"base_model_config: '{config_dir}' has no {sub}/config.json; "
                    "give a folder of diffusers-layout configs."
                )
        unet_config = dict(
            UNet2DConditionModel.load_config(config_dir, subfolder="unet", local_files_only=True)
        )
    else:
        config_dir = location.path
        unet_config = folder_config(UNet2DConditionModel, config_dir, "unet")
        version = version_from_unet_config(unet_config, config_dir)

    alpha = float(config.lora_alpha if config.lora_alpha is not None else config.lora_rank)
    with init_empty_weights():  # meta tensors: an SD 1.5 UNet builds in ~0.1 s and takes no memory
        unet = UNet2DConditionModel.from_config(unet_config)
        text_encoder = CLIPTextModel(_text_encoder_config(config_dir)) if config.train_text_encoder else None
        problems = _target_problems(unet, list(config.target_modules), "target_modules", "UNet")
        if text_encoder is not None:
            te_targets = list(config.text_encoder_target_modules)
            problems += _target_problems(
                text_encoder, te_targets, "text_encoder_target_modules", "text encoder"
            )
        if problems:
            raise UserError(problems)
        unet_count = add_lora_adapter(unet, list(config.target_modules), config.lora_rank, alpha)
        te_count = (
            add_lora_adapter(text_encoder, list(config.text_encoder_target_modules), config.lora_rank, alpha)
            if text_encoder is not None
            else 0
        )
    return NetworkFacts(location.kind, version, config_dir, config.lora_rank, alpha, unet_count, te_count)


def _text_encoder_config(config_dir: Path) -> CLIPTextConfig:
    if not (config_dir / "text_encoder" / "config.json").is_file():
        raise UserError(
            f"base_model: '{config_dir}' has no text_encoder/config.json; it is not a complete SD model."
        )
    return CLIPTextConfig.from_pretrained(config_dir, subfolder="text_encoder", local_files_only=True)


def _target_problems(module: Any, targets: list[str], key: str, component: str) -> list[str]:
    """check_targets' messages, collected instead of raised, so UNet and text-encoder ones come together."""
    try:
        check_targets(module, targets, key=key, component=component)
    except UserError as err:
        return err.messages
    return []


@dataclass(frozen=True)
class _Shape:
    """Stands in for a tensor where only its shape is read (detect_sd_version looks at conv_in's)."""

    shape: tuple[int, ...]


def _checkpoint_shapes(path: Path) -> dict[str, Any]:
    """Key -> object with `.shape` of a single-file checkpoint.

    For .safetensors only the header is read (names and shapes), so a 4 GB file costs milliseconds. A
    pickled .ckpt has no such header and is read whole (read_checkpoint, which also words every error).
    """
    if path.suffix.lower() == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(path, framework="pt") as handle:
                return {key: _Shape(tuple(handle.get_slice(key).get_shape())) for key in handle.keys()}
        except Exception:  # noqa: BLE001 - unreadable: read_checkpoint raises the loader's UserError for it
            pass
    return dict(read_checkpoint(path))


@dataclass(frozen=True)
class OutputFacts:
    """Where a run writes. File names are relative to `output_dir`; `step_files` is None when the number
    of steps is unknown (the dataset has problems)."""

    output_dir: Path
    output_name: str
    step_files: list[str] | None
    final_files: list[str]
    config_file: str
    logging_dir: Path
    existing_files: list[str]  # *.safetensors and config.yaml already in output_dir: a run was there


def output_facts(config: TrainConfig, total_steps: int | None) -> OutputFacts:
    """The files train() will write for `config` (resolved) and what already lies in output_dir."""
    name = config.output_name or config.resolved().output_name
    assert name is not None
    step_files = None
    if total_steps is not None:
        every = config.save_steps
        step_files = (
            [step_file_name(name, step) for step in range(every, total_steps + 1, every)] if every else []
        )
    existing: list[str] = []
    if config.output_dir.is_dir():
        existing = sorted(
            p.name
            for p in config.output_dir.iterdir()
            if p.is_file() and (p.suffix == ".safetensors" or p.name == CONFIG_FILE_NAME)
        )
    return OutputFacts(
        output_dir=config.output_dir,
        output_name=name,
        step_files=step_files,
        final_files=[FINAL_DIFFUSERS_NAME, f"{name}.safetensors"],
        config_file=CONFIG_FILE_NAME,
        logging_dir=config.logging_dir or config.output_dir / "logs",
        existing_files=existing,
    )
