"""Everything `train()` prepares before the first step: accelerator, model, LoRA, data, optimizer."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from accelerate.utils import ProjectConfiguration

from lora_scripts.config import TrainConfig
from lora_scripts.data import CaptionDataset, CaptionedImage, collate, tag_frequency
from lora_scripts.export.kohya import LoraNetwork
from lora_scripts.export.metadata import RunMetadata
from lora_scripts.models.family import LoraTargets, ModelFamily
from lora_scripts.training.plan import TrainingPlan

log = logging.getLogger(__name__)

WEIGHT_DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def make_accelerator(config: TrainConfig) -> Accelerator:
    """Accelerator with TensorBoard logging under `logging_dir`; fp16 without CUDA falls back to fp32."""
    precision = config.mixed_precision
    if precision == "fp16" and not torch.cuda.is_available():
        log.warning("mixed_precision: fp16 needs a CUDA GPU; training in fp32 on this machine.")
        precision = "no"
    # accelerate keeps its settings in process-wide singletons; a second run in one process (tests, a UI)
    # with another precision would be refused. Keep the distributed part, reset the rest.
    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()
    accelerator = Accelerator(
        mixed_precision=precision,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        log_with="tensorboard",
        project_config=ProjectConfiguration(
            project_dir=str(config.output_dir), logging_dir=str(config.logging_dir)
        ),
    )
    if not accelerator.is_main_process:  # one copy of each message under `accelerate launch`
        logging.getLogger("lora_scripts").setLevel(logging.WARNING)
    return accelerator


def attach_lora(family: ModelFamily, config: TrainConfig, accelerator: Accelerator) -> list[LoraNetwork]:
    """Freeze the base model (cast to the mixed-precision dtype), add LoRA in fp32, report the count."""
    weight_dtype = WEIGHT_DTYPES[accelerator.mixed_precision]
    for module in family.frozen_modules():
        module.requires_grad_(False)
        module.to(accelerator.device, dtype=weight_dtype)
    targets = LoraTargets(
        unet=list(config.target_modules),
        text_encoder=list(config.text_encoder_target_modules) if config.train_text_encoder else None,
    )
    networks = family.add_lora(targets, config.lora_rank, config.lora_alpha)
    # LoRA weights train in fp32 even when the frozen weights are fp16/bf16 (autocast does the rest).
    for net in networks:
        for param in net.module.parameters():
            if param.requires_grad:
                param.data = param.data.float()
    counts = {
        net.kohya_prefix: sum(p.numel() for p in net.module.parameters() if p.requires_grad)
        for net in networks
    }
    log.info(
        "Trainable LoRA parameters: %s (%s)",
        f"{sum(counts.values()):,}",
        ", ".join(f"{k}: {v:,}" for k, v in counts.items()),
    )
    if config.gradient_checkpointing:
        family.denoiser.enable_gradient_checkpointing()
        if config.train_text_encoder:
            for encoder in family.text_encoders:
                encoder.gradient_checkpointing_enable()
    return networks


def make_dataloader(items: list[CaptionedImage], config: TrainConfig) -> torch.utils.data.DataLoader:
    """Shuffled (seeded) batches; the last partial batch is kept."""
    generator = torch.Generator().manual_seed(config.seed)
    return torch.utils.data.DataLoader(
        CaptionDataset(items, config.resolution),
        batch_size=config.batch_size,
        shuffle=True,
        generator=generator,
        collate_fn=collate,
        num_workers=config.dataloader_num_workers,
        drop_last=False,
    )


def run_metadata(
    config: TrainConfig, family: ModelFamily, items: list[CaptionedImage], plan: TrainingPlan
) -> RunMetadata:
    """The metadata every file of this run carries (sd-scripts' keys)."""
    return RunMetadata(
        family=family.info,
        rank=config.lora_rank,
        alpha=config.lora_alpha,
        target_modules=list(config.target_modules),
        text_encoder_target_modules=(
            list(config.text_encoder_target_modules) if config.train_text_encoder else None
        ),
        resolution=config.resolution,
        num_train_images=plan.num_images,
        num_batches_per_epoch=plan.batches_per_epoch,
        num_epochs=plan.num_epochs,
        max_train_steps=plan.max_train_steps,
        batch_size=config.batch_size,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        learning_rate=config.learning_rate,
        text_encoder_lr=config.text_encoder_lr if config.train_text_encoder else None,
        lr_scheduler=config.lr_scheduler,
        lr_warmup_steps=config.lr_warmup_steps,
        max_grad_norm=config.max_grad_norm,
        mixed_precision=config.mixed_precision,
        seed=config.seed,
        sd_model_name=Path(config.base_model).name,
        # sd-scripts keys tag counts by dataset folder name.
        tag_frequency={Path(config.train_data_dir).name: tag_frequency(items)},
    )
