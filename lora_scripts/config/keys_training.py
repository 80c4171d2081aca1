"""Config keys for the network's depth (LoCon, dropout, continuing from a file), the loss and noise tricks,
and the optimizer. Mixed into `TrainConfig` (schema.py); names are sd-scripts'."""

from __future__ import annotations

import logging
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator
from pydantic_core import PydanticCustomError

from lora_scripts.config.fields import Float, Int, PathValue, field, yaml_no

log = logging.getLogger(__name__)

LossType = Literal["l2", "l1", "huber", "smooth_l1"]
HuberSchedule = Literal["constant", "exponential", "snr"]
NetworkType = Literal["lora", "locon", "loha", "lokr", "dora"]


def _optimizer_name(value: Any) -> Any:
    """sd-scripts' optimizer names, matched without regard to case ('adamw8bit' → 'AdamW8bit')."""
    from lora_scripts.training.optim import OPTIMIZERS, canonical_optimizer

    if not isinstance(value, str):
        return value
    name = canonical_optimizer(value)
    if name is None:
        raise PydanticCustomError(
            "lora_optimizer",
            "'{value}' is not one of {choices}",
            {"value": value, "choices": ", ".join(f"'{o}'" for o in OPTIMIZERS)},
        )
    return name


def _warmup(value: Any) -> Any:
    """A step count (integer ≥ 0) or a fraction of the run (a number in (0, 1))."""
    if isinstance(value, bool):
        raise PydanticCustomError("lora_bool_not_number", "true or false is not a number", {})
    if isinstance(value, float) and value.is_integer() and value >= 1:
        return int(value)
    if isinstance(value, float) and not 0 < value < 1:
        raise PydanticCustomError(
            "lora_warmup",
            "{value} is neither a step count (a whole number) nor a fraction of the run between 0 and 1",
            {"value": value},
        )
    return value


class NetworkDepthKeys(BaseModel):
    """The network type, LoCon, dropout, a separate UNet learning rate and continuing from a file (section
    "network")."""

    network_type: NetworkType = field(
        "network",
        "The kind of adapter: lora (kohya LoRA), locon (LoRA on the 3x3 convs too; conv_rank defaults to "
        "lora_rank), loha (LyCORIS LoHa: a Hadamard product of two rank-lora_rank LoRAs), lokr (LyCORIS "
        "LoKr: a Kronecker product, see lokr_factor) or dora (LoRA plus a learned magnitude per input "
        "channel, LyCORIS' DoRA). Every type is written in the LyCORIS/kohya layout A1111, Forge and "
        "ComfyUI load; conv_rank adds the 3x3 convs to any of them.",
        "lora",
    )
    lokr_factor: Int = field(
        "network",
        "LoKr: the size of the small Kronecker factor (LyCORIS' factor); -1 splits each dimension near its "
        "square root. Smaller values give smaller files.",
        -1,
    )
    lokr_full_matrix: bool = field(
        "network",
        "LoKr: keep the large Kronecker factor as a full matrix instead of a rank-lora_rank product "
        "(LyCORIS' full_matrix); the update's scale is then 1, whatever lora_alpha says.",
        False,
    )

    conv_rank: Int | None = field(
        "network",
        "LoCon: also train a LoRA of this rank on the UNet's 3x3 convolutions (ResNet blocks, down- and "
        "upsamplers), kohya's conv_dim. Learns texture and colour better; bigger file.",
        None,
        default_doc="none (no conv layers)",
        ge=1,
    )
    conv_alpha: Float | None = field(
        "network",
        "Scale of the conv LoRA (kohya: conv_alpha): the update is multiplied by conv_alpha / conv_rank.",
        None,
        default_doc="same as conv_rank",
        gt=0,
    )
    network_dropout: Float = field(
        "network",
        "Dropout on the LoRA layers' input during training (peft's lora_dropout), against overfitting; 0.1 "
        "is typical.",
        0.0,
        ge=0,
        lt=1,
    )
    network_weights: PathValue | None = field(
        "network",
        "Continue training from an existing LoRA file (ours, sd-scripts', or a diffusers/peft file). Its "
        "rank must match lora_rank (conv_rank for conv layers).",
        None,
        default_doc="none (start from scratch)",
    )
    unet_lr: Float | None = field(
        "network",
        "Learning rate of the UNet LoRA (kohya's unet_lr).",
        None,
        default_doc="same as learning_rate",
        gt=0,
    )


class LossKeys(BaseModel):
    """Loss, noise and text-encoder tricks (section "loss")."""

    min_snr_gamma: Float | None = field(
        "loss",
        "Min-SNR weighting (Hang et al. 2023): caps the weight of easy, low-noise timesteps; 5 is the usual "
        "value and speeds up convergence.",
        None,
        default_doc="none (off)",
        gt=0,
    )
    noise_offset: Float = field(
        "loss",
        "Add this much per-channel offset to the noise so the LoRA can learn very dark or bright images; "
        "0.05-0.1 is usual.",
        0.0,
        ge=0,
    )
    multires_noise_iterations: Int = field(
        "loss",
        "Multi-resolution (pyramid) noise: this many extra octaves of low-frequency noise; 6-10 is usual.",
        0,
        ge=0,
    )
    multires_noise_discount: Float = field(
        "loss",
        "How fast the pyramid noise octaves fade (each octave is scaled by discount^i).",
        0.3,
        gt=0,
        le=1,
    )
    zero_terminal_snr: bool | None = field(
        "loss",
        "Rescale the noise schedule so the last timestep is pure noise (Lin et al. 2023); use it with "
        "v-prediction models. Leave it out to take it from the checkpoint, as ComfyUI does: on when the file "
        "has a `ztsnr` key (NoobAI-XL v-pred has one) or a diffusers folder's scheduler config says "
        "`rescale_betas_zero_snr: true`, else off; true or false overrides that.",
        None,
        default_doc="none (from the checkpoint; off unless it is marked)",
    )
    clip_skip: Int | None = field(
        "loss",
        "Use the text encoder's n-th layer from the end (2 = the penultimate, common for anime models); "
        "sample images use the same. SD 1.x/2.x only: SDXL always uses its encoders' penultimate layer.",
        None,
        default_doc="1 (the last layer)",
        ge=1,
    )
    max_token_length: Literal[75, 150, 225] = field(
        "loss",
        "Caption tokens the text encoders read: 75 (CLIP's window; longer captions are cut), or 150 / 225 "
        "to read longer captions in 75-token chunks, as sd-scripts' max_token_length does (the chunks' "
        "encodings are joined, so the prompt embedding is 152 or 227 long).",
        75,
        allowed_doc="75, 150 or 225",
    )
    loss_type: LossType = field(
        "loss",
        "The loss: l2 (mean squared error), l1, huber or smooth_l1 (robust to outliers, sd-scripts' "
        "scheduled Huber loss).",
        "l2",
    )
    huber_c: Float = field("loss", "Huber loss threshold (the 'c' of sd-scripts).", 0.1, gt=0, le=1)
    huber_schedule: HuberSchedule = field("loss", "How the Huber threshold changes with the timestep.", "snr")


class OptimizerKeys(BaseModel):
    """Optimizer and schedule details (section "training")."""

    optimizer_type: Annotated[str, BeforeValidator(_optimizer_name)] = field(
        "training",
        "Optimizer, as sd-scripts spells it: AdamW, AdamW8bit (needs bitsandbytes and a CUDA GPU), Lion, "
        "Prodigy (set learning_rate to 1.0), Adafactor or SGD.",
        "AdamW",
        allowed_doc="AdamW, AdamW8bit, Lion, Prodigy, Adafactor, SGD (any case)",
    )
    optimizer_args: dict[str, Any] = field(
        "training",
        "Extra keyword arguments of the optimizer, e.g. {betas: [0.9, 0.99]} or {d_coef: 2}.",
        {},
        default_doc="{}",
    )
    lr_scheduler_num_cycles: Int = field(
        "training", "Restarts of lr_scheduler 'cosine_with_restarts'.", 1, ge=1
    )
    lr_scheduler_power: Float = field("training", "Power of lr_scheduler 'polynomial'.", 1.0, gt=0)


WarmupSteps = Annotated[Int | Float, BeforeValidator(_warmup)]


MemoryProfile = Literal["default", "low"]
QuantizeBase = Literal["no", "int8", "float8"]


class SpeedKeys(BaseModel):
    """Speed and memory switches (section "training") and the loss log's cadence (section "logging")."""

    memory_profile: MemoryProfile = field(
        "training",
        "'low' sets, for a small GPU: gradient_checkpointing: true, optimizer_type: AdamW8bit (when "
        "bitsandbytes and a CUDA GPU are there; else AdamW), mixed_precision: bf16 (fp16 on GPUs without "
        "bf16) so the frozen weights take half the memory, and batch_size 1 with gradient_accumulation_steps "
        "keeping the effective batch; latents and captions are cached (where valid) with the VAE and text "
        "encoder off the GPU. Keys you write yourself win over the preset (writing both batch_size and "
        "gradient_accumulation_steps keeps them as written); the resolved values are in the dumped "
        "config.yaml and in `lora-scripts check`.",
        "default",
    )
    torch_compile: bool = field(
        "training",
        "Compile the UNet with torch.compile: faster steps on a GPU after a first step that takes a minute "
        "or more to compile; needs a working compiler toolchain.",
        False,
    )
    quantize_base: Annotated[QuantizeBase, BeforeValidator(yaml_no)] = field(
        "training",
        "Store the UNet's frozen weights in 8 bits, one scale per output channel, dequantized where they "
        "are used (needs optimum-quanto: pip install optimum-quanto): 'int8' (the more accurate) or "
        "'float8' (e4m3). Half the weight memory of fp16/bf16 (SD 1.5's UNet: 0.8 instead of 1.6 GiB), for "
        "slower steps and some quantization noise in the model the LoRA trains against; the LoRA stays in "
        "fp32 and the saved file is the same as without it. FLUX.1: the transformer's, and T5-XXL's (4.5 "
        "instead of 8.9 GiB while it encodes the captions). memory_profile: low leaves it off.",
        "no",
    )
    logging_steps: Int = field(
        "logging",
        "Read the loss from the GPU every this many steps (and before every save, sample and validation): "
        "reading it waits for the GPU, so fewer reads keep it busy. TensorBoard still gets every step's "
        "loss, and a NaN loss is still reported at the exact step it appeared.",
        10,
        ge=1,
    )


def low_memory_settings(
    written: set[str], batch_size: int, gradient_accumulation_steps: int
) -> dict[str, Any]:
    """What `memory_profile: low` sets, leaving out every key in `written` (the keys the user wrote).

    The batch is split into `batch_size` steps of 1 image with as many accumulated, so the effective batch
    (and the step count) stays what the user asked for; a user who wrote both keys keeps both.
    """
    # Imported here: torch is not needed to read a config otherwise.
    import importlib.util

    import torch

    cuda = torch.cuda.is_available()
    eight_bit = cuda and importlib.util.find_spec("bitsandbytes") is not None
    if not eight_bit and "optimizer_type" not in written:
        log.info(
            "memory_profile: low uses AdamW: 8-bit AdamW needs bitsandbytes (pip install bitsandbytes) and a "
            "CUDA GPU%s.",
            "" if cuda else ", and this machine has none",
        )
    # bf16 where the GPU has it (no loss scaler needed), else fp16; on a CPU bf16 (accelerate's CPU autocast).
    precision = "bf16" if not cuda or torch.cuda.is_bf16_supported() else "fp16"
    preset: dict[str, Any] = {
        "gradient_checkpointing": True,
        "optimizer_type": "AdamW8bit" if eight_bit else "AdamW",
        "mixed_precision": precision,
    }
    settings = {key: value for key, value in preset.items() if key not in written}
    # A written batch_size alone is the effective batch the user wants: it is split, not kept.
    if "gradient_accumulation_steps" not in written:
        settings["batch_size"] = 1
        settings["gradient_accumulation_steps"] = batch_size * gradient_accumulation_steps
    return settings
