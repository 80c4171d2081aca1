"""Everything `train()` prepares before the first step: accelerator, LoRA, data loader, optimizer, plan."""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping
from dataclasses import fields
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from accelerate.utils import ProjectConfiguration
from diffusers.models.attention_processor import AttnProcessor2_0
from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

from lora_scripts.config import TrainConfig
from lora_scripts.data.batching import BucketBatchSampler
from lora_scripts.data.dataset import EpochBatchSampler, TrainingDataset, collate
from lora_scripts.data.latent_cache import LatentRequest
from lora_scripts.data.training_set import TrainingSet
from lora_scripts.errors import UserError
from lora_scripts.export.kohya import LoraNetwork
from lora_scripts.export.kohya_import import load_network_weights
from lora_scripts.models.block_swap import BlockSwap
from lora_scripts.models.family import LoraTargets, ModelFamily
from lora_scripts.models.flow_matching import FlowSettings
from lora_scripts.models.flux import FluxLoad, FluxOptions
from lora_scripts.models.lora import LoraSpec, NetworkKind
from lora_scripts.models.quantize import quantize_frozen, stored_bytes
from lora_scripts.training.losses import LossSettings
from lora_scripts.training.optim import build_lr_scheduler, build_optimizer, trainable_parameters
from lora_scripts.training.plan import TrainingPlan

log = logging.getLogger(__name__)
# The attention processors that run PyTorch's fused SDPA kernel: UNet attention's and FLUX's (both diffusers'
# defaults).
SDPA_PROCESSORS = (AttnProcessor2_0, FluxAttnProcessor)

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


def speed_switches(family: ModelFamily, device: torch.device) -> None:
    """The free speed-ups: TF32 matmuls and convolutions on Ampere+ GPUs, channels_last UNet activations on
    CUDA (faster cuDNN convolution kernels; not measured to help on a CPU, so it stays off there), and a check
    that attention runs through PyTorch's fused SDPA kernel (SDPA_PROCESSORS, diffusers' defaults)."""
    if device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 8:
        # TF32 keeps fp32's range with a 10-bit mantissa: the usual trade for training (not bit-exact).
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if device.type == "cuda":
        family.denoiser.to(memory_format=torch.channels_last)
    slow = sorted(
        {
            type(p).__name__
            for p in getattr(family.denoiser, "attn_processors", {}).values()
            if not isinstance(p, SDPA_PROCESSORS)
        }
    )
    if slow:
        log.warning(
            "Attention does not use PyTorch SDPA (processors: %s): training is slower.", ", ".join(slow)
        )


def compiled_denoiser(denoiser: torch.nn.Module, enabled: bool, device: torch.device) -> torch.nn.Module:
    """`torch.compile(denoiser)` when `enabled` (config key torch_compile): it shares the parameters, so the
    LoRA layers it trains are the ones saved. The first step compiles (a minute or more for SD).

    On a CPU without inductor's layout optimization: for a convolution-heavy graph it switches to
    channels_last, which made SD 1.5's fp32 oneDNN convolutions 2.2x slower on the CPU machine and added a
    2 s layout kernel per step (a compiled SD 1.5 step at 256² took 6.3-7.1 s against 3.8 s eager; 3.8 s
    without it). On CUDA it stays on (channels_last is what cuDNN wants)."""
    if not enabled:
        return denoiser
    log.info("torch_compile: compiling the UNet (the first step takes longer)")
    if device.type == "cpu":
        return torch.compile(denoiser, options={"layout_optimization": False})
    return torch.compile(denoiser)


def _targets(value: str | tuple[str, ...]) -> list[str] | str:
    return value if isinstance(value, str) else list(value)


def lora_spec(config: TrainConfig) -> LoraSpec:
    """The network a (resolved) config trains: rank, alpha, LoCon's convs, dropout and the network type."""
    return LoraSpec(
        rank=config.lora_rank,
        alpha=config.lora_alpha,
        conv_rank=config.conv_rank,
        conv_alpha=config.conv_alpha,
        dropout=config.network_dropout,
        kind=NetworkKind(config.network_type, config.lokr_factor, config.lokr_full_matrix),
    )


def text_encoder_mask(config: TrainConfig, family: type[ModelFamily]) -> tuple[bool, ...]:
    """Which of the family's text encoders get LoRA: those with a rate above 0 (text_encoder_lr), and when
    text_encoder_lr is one number only those the family trains by default (FLUX.1: CLIP-L, not T5)."""
    rates = config.text_encoder_rates(len(family.text_encoder_parts))
    mask = tuple(rate > 0 for rate in rates)
    default = family.default_text_encoder_mask
    # The config holds a written list as a tuple (config/fields.py text_encoder_lrs).
    if default is not None and not isinstance(config.text_encoder_lr, tuple):
        mask = tuple(on and by_default for on, by_default in zip(mask, default, strict=True))
    return mask


def flux_load(config: TrainConfig) -> FluxLoad:
    """FLUX.1's part files and training options from the config (ignored by other families)."""
    options = FluxOptions(
        flow=FlowSettings(
            timestep_sampling=config.timestep_sampling,
            discrete_flow_shift=config.discrete_flow_shift,
            sigmoid_scale=config.sigmoid_scale,
            model_prediction_type=config.model_prediction_type,
        ),
        guidance_scale=config.guidance_scale,
        t5_max_token_length=config.t5xxl_max_token_length,
    )
    path = lambda value: None if value is None else str(value)  # noqa: E731
    return FluxLoad(path(config.vae), path(config.clip_l), path(config.t5xxl), options)


def attach_lora(family: ModelFamily, config: TrainConfig, accelerator: Accelerator) -> list[LoraNetwork]:
    """Freeze the base model (cast to the mixed-precision dtype), add LoRA in fp32 (continuing from
    `network_weights` if set), store the UNet's frozen weights in 8 bits if `quantize_base` asks, report the
    count. The VAE and text encoders go to the device; the denoiser stays on the CPU until `place_denoiser`,
    after the caches: the device then never holds it in full precision when it is quantized, nor with the
    text encoders that caching needs (FLUX.1: T5-XXL's 9 GiB, then its 22 GiB transformer)."""
    weight_dtype = WEIGHT_DTYPES[accelerator.mixed_precision]
    quantized = config.quantize_base != "no"
    # quantize_base also stores these encoders in 8 bits (FLUX.1's T5-XXL): quantized on the CPU, then moved
    quantized_encoders = (
        [family.text_encoders[i] for i in family.quantized_text_encoders] if quantized else []
    )
    for module in family.frozen_modules():
        module.requires_grad_(False)
        if module is family.denoiser or any(module is encoder for encoder in quantized_encoders):
            module.to(dtype=weight_dtype)
        elif weight_dtype == torch.float16 and getattr(
            getattr(module, "config", None), "force_upcast", False
        ):
            # A VAE that overflows in fp16 (SDXL's: diffusers marks it force_upcast, sd-scripts' no_half_vae).
            module.to(accelerator.device, dtype=torch.float32)
        else:
            module.to(accelerator.device, dtype=weight_dtype)
    targets = LoraTargets(
        unet=_targets(config.target_modules),
        text_encoder=_targets(config.text_encoder_target_modules) if config.train_text_encoder else None,
        text_encoder_mask=text_encoder_mask(config, type(family)),
    )
    networks = family.add_lora(targets, lora_spec(config))
    # LoRA weights train in fp32 even when the frozen weights are fp16/bf16 (autocast does the rest).
    for net in networks:
        for param in net.module.parameters():
            if param.requires_grad:
                param.data = param.data.float()
    if quantized:
        _quantize(family.denoiser, family.denoiser_name, config.quantize_base, weight_dtype)
    for encoder in quantized_encoders:
        _quantize(encoder, type(encoder).__name__, config.quantize_base, weight_dtype)
        encoder.to(accelerator.device)
    if config.network_weights is not None:
        report = load_network_weights(networks, Path(config.network_weights))
        log.info(
            "Continuing from %s: %d layers loaded (%d rescaled to this run's alpha), %d layers start fresh",
            config.network_weights,
            report.loaded,
            report.rescaled,
            report.not_in_file,
        )
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
        for encoder in family.trained_text_encoders:
            encoder.gradient_checkpointing_enable()
    return networks


def place_denoiser(family: ModelFamily, blocks_to_swap: int, accelerator: Accelerator) -> BlockSwap | None:
    """The denoiser to the device, except, with `blocks_to_swap`, the swapped blocks' frozen weights, which
    stay on the CPU and come to the device block by block (models/block_swap.py)."""
    if not blocks_to_swap:
        family.denoiser.to(accelerator.device)
        return None
    if accelerator.num_processes > 1:
        raise UserError(
            "blocks_to_swap: works on one GPU; set it to 0 for a multi-GPU run (each GPU then holds the "
            "whole model) or train on one GPU."
        )
    swap = BlockSwap(family.swap_blocks(family.denoiser, blocks_to_swap), accelerator.device)
    with swap.held_back():
        family.denoiser.to(accelerator.device)
    log.info(
        "blocks_to_swap %d: %d blocks' frozen weights (%.2f GiB) stay on the CPU",
        blocks_to_swap,
        len(swap.blocks),
        swap.hosted_bytes() / 2**30,
    )
    return swap


def _quantize(module: torch.nn.Module, name: str, kind: str, weight_dtype: torch.dtype) -> None:
    """quantize_base: the frozen weights of `module` (the denoiser, FLUX.1's T5) to 8 bits, still on the CPU
    where it was loaded (so the device never holds them in full precision); scales and biases stay in
    `weight_dtype`, the LoRA in fp32. `name` is the module's in the log line ("UNet", "transformer")."""
    before = stored_bytes(module)
    quantize_frozen(module, kind)
    log.info(
        "quantize_base %s: the %s's weights take %.1f MiB instead of %.1f MiB (frozen ones in %s)",
        kind,
        name,
        stored_bytes(module) / 2**20,
        before / 2**20,
        str(weight_dtype).removeprefix("torch."),
    )


def loader_workers(config: TrainConfig, latents: Mapping[LatentRequest, torch.Tensor] | None) -> int:
    """`dataloader_num_workers`, or when it is left out: on a CUDA GPU with images decoded during training
    (latents not cached), half this process's share of the CPU cores, at most 4, so that the GPU does not wait
    on decoding (a 1.5 MP JPEG fitted to a 768x512 bucket takes ~40 ms on one core: 160 ms for a batch of 4,
    about an SD 1.5 step on a fast GPU); else 0. Cached latents need no decoding, and on a CPU the workers
    would take cores from the training itself."""
    if config.dataloader_num_workers is not None:
        return config.dataloader_num_workers
    if latents is not None or not torch.cuda.is_available():
        return 0
    processes_here = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return min(4, (os.cpu_count() or 1) // (2 * processes_here))


def make_dataloader(
    training_set: TrainingSet,
    config: TrainConfig,
    latents: Mapping[LatentRequest, torch.Tensor] | None = None,
) -> torch.utils.data.DataLoader:
    """Batches drawn within one bucket each, in a seeded order per epoch; partial batches are kept."""
    seed = config.seed % 2**32
    dataset = TrainingDataset(
        training_set.samples,
        training_set.caption_options(),
        flip_aug=[d.flip_aug for d in training_set.datasets],
        random_crop=[d.random_crop for d in training_set.datasets],
        seed=seed,
        latents=latents,
    )
    buckets = [sample.bucket for sample in training_set.samples]
    sampler = EpochBatchSampler(BucketBatchSampler(buckets, config.batch_size, seed=seed))
    workers = loader_workers(config, latents)
    if config.dataloader_num_workers is None and workers:
        log.info("Loading images in %d background processes (dataloader_num_workers left out)", workers)
    return torch.utils.data.DataLoader(
        dataset,
        batch_sampler=sampler,
        collate_fn=collate,
        num_workers=workers,
        persistent_workers=workers > 0,
        # Page-locked host memory makes the copy to the GPU faster (and asynchronous); useless without one.
        pin_memory=torch.cuda.is_available(),
        # Its own generator for the workers' base seed, which the DataLoader would otherwise draw from the
        # global torch RNG at the start of every epoch: the training noise then depends only on the steps
        # run, so a resumed run draws exactly what an uninterrupted one does (training/state.py).
        generator=torch.Generator().manual_seed(seed),
    )


def loss_settings(config: TrainConfig) -> LossSettings:
    # LossSettings' fields are named after the config keys that set them.
    return LossSettings(**{f.name: getattr(config, f.name) for f in fields(LossSettings)})


def make_optimization(
    config: TrainConfig,
    family: ModelFamily,
    training_set: TrainingSet,
    dataloader: torch.utils.data.DataLoader,
    accelerator: Accelerator,
) -> tuple[torch.optim.Optimizer, TrainingPlan, object]:
    """The optimizer over the LoRA parameters (UNet at unet_lr, text encoders at text_encoder_lr), the run's
    step plan, and the learning-rate schedule over it."""
    groups = [(trainable_parameters(family.denoiser), config.unet_lr)]
    rates = config.text_encoder_rates(len(family.text_encoders))
    groups += [(trainable_parameters(te), rate) for te, rate in zip(family.text_encoders, rates, strict=True)]
    optimizer = build_optimizer(
        config.optimizer_type,
        groups,
        args=config.optimizer_args,
        weight_decay=config.adam_weight_decay,
        device=accelerator.device,
    )
    plan = TrainingPlan.compute(
        num_images=training_set.num_train_images,
        # accelerate deals batches out over processes (padding the last round so all get the same count)
        batches_per_epoch=math.ceil(len(dataloader) / accelerator.num_processes),
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        epochs=config.epochs,
        max_train_steps=config.max_train_steps,
        lr_warmup_steps=config.lr_warmup_steps,
    )
    lr_scheduler = build_lr_scheduler(
        config.lr_scheduler,
        optimizer,
        warmup_steps=plan.warmup_steps,
        total_steps=plan.max_train_steps,
        num_processes=accelerator.num_processes,
        num_cycles=config.lr_scheduler_num_cycles,
        power=config.lr_scheduler_power,
    )
    return optimizer, plan, lr_scheduler
