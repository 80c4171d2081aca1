"""The training config: one typed, strict schema that the loader, the docs and the example configs come from.

Every field carries a `description` (help text and docs) and, in `json_schema_extra`, the doc `section` it
belongs to; required fields also say `what` they are (used in "missing required key" messages) and fields
whose `None` means "derive it" say so in `default_doc`. Path checks (does the folder exist?) live in the
loader, not here, so the schema can validate a config written on another machine.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, get_args

from pydantic import AfterValidator, BeforeValidator, ConfigDict, StringConstraints

from lora_scripts.config.fields import (
    FileStem,
    Float,
    Int,
    NonEmptyStr,
    PathValue,
    field,
    prompts_input,
    sampler_name,
    text_encoder_lrs,
    text_encoder_targets,
    unet_targets,
    yaml_no,
)
from lora_scripts.config.keys_data import BucketKeys, CacheKeys, DatasetKeys
from lora_scripts.config.keys_flux import FluxKeys
from lora_scripts.config.keys_safety import SafetyKeys, StateKeys
from lora_scripts.config.keys_training import (
    LossKeys,
    NetworkDepthKeys,
    OptimizerKeys,
    SpeedKeys,
    WarmupSteps,
    low_memory_settings,
)
from lora_scripts.errors import UserError

SECTIONS: tuple[str, ...] = (
    "data",
    "buckets",
    "caching",
    "model",
    "network",
    "training",
    "loss",
    "saving",
    "validation",
    "logging",
)

LrScheduler = Literal[
    "constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial"
]
MixedPrecision = Literal["no", "fp16", "bf16"]
SavePrecision = Literal["fp16", "bf16", "fp32"]


class TrainConfig(
    FluxKeys,
    SpeedKeys,
    SafetyKeys,
    StateKeys,
    OptimizerKeys,
    LossKeys,
    NetworkDepthKeys,
    CacheKeys,
    BucketKeys,
    DatasetKeys,
):
    """Everything one LoRA training run needs; loaded from YAML by `lora_scripts.config.load_config`.

    Paths are kept as written (relative ones start from the current directory). Fields whose default is
    derived from others (`lora_alpha`, `text_encoder_lr`, `output_name`, `logging_dir`) are None until
    `resolved()` fills them; `load_config` always returns a resolved config.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False, validate_default=False)

    # --- data ---
    train_data_dir: PathValue | None = field(
        "data",
        "Folder that holds the training images (subfolders too; sd-scripts' '10_name' folders repeat "
        "their images). Required unless `datasets` lists several folders.",
        None,
        what="the folder of training images",
        default_doc="required, unless datasets is given",
    )
    metadata_path: PathValue | None = field(
        "data",
        "Metadata file (e.g. metadata.csv) that lists each image with its caption. Leave it out to read "
        "each caption from a .txt file beside its image (cat_01.png + cat_01.txt).",
        None,
        default_doc="none (captions from .txt files beside the images)",
    )
    resolution: Int = field(
        "data",
        "Side length in pixels that images are trained at: 512 for SD 1.x, 768 for SD 2.x 768-v models, "
        "1024 for SDXL. A multiple of 8, because the VAE shrinks images 8 times.",
        512,
        ge=64,
        multiple_of=8,
        default_doc="the base model's native size: 1024 for SDXL, 512 for SD 1.x/2.x",
    )
    trigger_word: Annotated[str, StringConstraints(strip_whitespace=True, min_length=1)] | None = field(
        "data",
        "The word your captions use for the subject (e.g. 'sks dog' or 'ohwx'); `lora-scripts check` counts "
        "the captions without it.",
        None,
        default_doc="none (not checked)",
        allowed_doc="a word or phrase",
    )

    # --- model ---
    base_model: NonEmptyStr = field(
        "model",
        "The SD 1.x, SD 2.x or SDXL model to train on (Pony, Illustrious and NoobAI are SDXL): a single "
        "checkpoint file (.safetensors or .ckpt), "
        "a diffusers folder (with model_index.json), or a Hugging Face hub id already in the local cache "
        "(nothing is downloaded).",
        what="the Stable Diffusion checkpoint to train on: a .safetensors file or a diffusers folder",
        allowed_doc="an existing checkpoint file or diffusers folder, or a cached hub id",
    )
    base_model_config: PathValue | None = field(
        "model",
        "Only for a single-file checkpoint with a non-standard architecture: a folder of diffusers-layout "
        "configs (model_index.json, unet/config.json, ...) that describes it. Leave it out otherwise.",
        None,
        default_doc="none (architecture detected from the checkpoint)",
    )
    v_parameterization: bool | None = field(
        "model",
        "Whether the model predicts velocity (v) instead of noise, as SD 2.x 768-v models and SDXL v-pred "
        "models (NoobAI-XL v-pred) do. Leave it out to detect it from the checkpoint (a `v_pred` key, a "
        "diffusers folder's scheduler config, or for SD 2.x a test inference); set it only when detection "
        "gets it wrong, e.g. for an SDXL v-pred file without that key.",
        None,
        default_doc="none (detected from the checkpoint)",
    )

    # --- network ---
    lora_rank: Int = field(
        "network",
        "Rank of each LoRA update (kohya: network_dim). Higher learns finer detail but gives a bigger file "
        "and overfits sooner; 4-16 suits a style, 16-32 a character.",
        8,
        ge=1,
    )
    lora_alpha: Float | None = field(
        "network",
        "Scale of the LoRA update (kohya: network_alpha); the update is multiplied by "
        "lora_alpha / lora_rank. Half the rank trains more gently.",
        None,
        default_doc="same as lora_rank",
        gt=0,
    )
    target_modules: Annotated[str | tuple[NonEmptyStr, ...], BeforeValidator(unet_targets)] = field(
        "network",
        "UNet layers that get a LoRA: a preset ('attn': the attention projections; 'attn-ff': also the "
        "feed-forward layers; 'kohya': every linear and 1x1 conv layer of the transformer blocks, "
        "sd-scripts' default set), or a list of layer names matched against the end of each layer's name "
        "(['to_q', 'to_v'] is a light choice).",
        ("to_q", "to_k", "to_v", "to_out.0"),
        min_length=1,
        allowed_doc="'attn', 'attn-ff', 'kohya', or a list of layer names",
    )
    train_text_encoder: bool = field(
        "network",
        "Also train a LoRA on the text encoder (CLIP). Helps a trigger word or character name take hold, "
        "at the cost of memory and a higher risk of overfitting.",
        False,
    )
    text_encoder_target_modules: Annotated[
        str | tuple[NonEmptyStr, ...], BeforeValidator(text_encoder_targets)
    ] = field(
        "network",
        "Text-encoder layers that get a LoRA when train_text_encoder is true: a preset ('attn': attention; "
        "'attn-mlp' or 'kohya': attention and MLP, sd-scripts' default) or a list of layer names. The "
        "presets and the default (CLIP's attention, the same as 'attn') fit each encoder: on FLUX.1's "
        "T5-XXL they mean its own layers (attention: SelfAttention q, k, v, o); a list of other names must "
        "match every trained encoder.",
        ("q_proj", "k_proj", "v_proj", "out_proj"),
        min_length=1,
        allowed_doc="'attn', 'attn-mlp', 'kohya', or a list of layer names",
    )
    text_encoder_lr: Annotated[float | tuple[float, float], BeforeValidator(text_encoder_lrs)] | None = field(
        "network",
        "Learning rate of the text-encoder LoRA; about half of learning_rate is usual. SDXL has two text "
        "encoders: a list [te1, te2] gives each its own rate (sd-scripts' --text_encoder_lr te1 te2), and 0 "
        "leaves that one frozen (e.g. [0.00005, 0] trains only CLIP ViT-L). FLUX.1's are [clip_l, t5] "
        "(CLIP-L, T5-XXL): one number trains CLIP-L only (sd-scripts' train_t5xxl is off by default), a "
        "list with a rate for T5 trains it too.",
        None,
        default_doc="same as learning_rate",
        allowed_doc="a number > 0, or [te1, te2] for SDXL, [clip_l, t5] for FLUX.1 (numbers >= 0)",
    )

    # --- training ---
    batch_size: Int = field(
        "training",
        "Images per training step (kohya: train_batch_size). Larger batches need more GPU memory.",
        1,
        ge=1,
    )
    epochs: Int = field(
        "training",
        "How many times training goes through all images (kohya: max_train_epochs). Ignored when "
        "max_train_steps is set.",
        10,
        ge=1,
    )
    max_train_steps: Int | None = field(
        "training",
        "Stop after this many optimizer steps, whatever epochs says.",
        None,
        default_doc="none (train for epochs)",
        ge=1,
    )
    learning_rate: Float = field(
        "training",
        "Learning rate of the UNet LoRA. 1e-4 is a safe start; 2e-4 learns faster. Write it as 2e-4 or "
        "0.0002.",
        1e-4,
        gt=0,
    )
    lr_scheduler: LrScheduler = field(
        "training",
        "How the learning rate changes during training.",
        "constant",
    )
    lr_warmup_steps: WarmupSteps = field(
        "training",
        "Steps over which the learning rate rises from 0 at the start, or a fraction of the run (0.05 = the "
        "first 5% of steps); needs a scheduler other than 'constant'.",
        0,
        ge=0,
        allowed_doc="a whole number ≥ 0, or a fraction between 0 and 1",
    )
    gradient_accumulation_steps: Int = field(
        "training",
        "Add up the gradients of this many batches before each optimizer step: the effective batch is "
        "batch_size times this, without the memory of a bigger batch.",
        1,
        ge=1,
    )
    gradient_checkpointing: bool = field(
        "training",
        "Recompute activations in the backward pass instead of storing them: much less GPU memory, "
        "roughly 20-30% slower.",
        False,
    )
    max_grad_norm: Float = field(
        "training",
        "Clip the gradient norm to this value to keep training stable; 0 turns clipping off.",
        1.0,
        ge=0,
    )
    mixed_precision: Annotated[MixedPrecision, BeforeValidator(yaml_no)] = field(
        "training",
        "Compute in half precision to save memory and time: 'fp16' (most GPUs), 'bf16' (RTX 30xx, A100 "
        "and newer) or 'no' (full fp32; use it on CPU).",
        "no",
    )
    seed: Int = field(
        "training",
        "Random seed; the same seed, images and config make a run repeatable.",
        42,
    )
    adam_weight_decay: Float = field(
        "training",
        "Weight decay of the AdamW optimizer: pulls weights gently toward zero.",
        0.01,
        ge=0,
    )
    dataloader_num_workers: Int | None = field(
        "training",
        "Background processes that load images; 0 loads them in the main process. Left out: on a CUDA GPU "
        "when images are decoded during training (latents not cached), half the CPU cores per process, at "
        "most 4, so the GPU does not wait; otherwise 0 (cached latents need no decoding).",
        None,
        ge=0,
        default_doc="auto: up to 4 on a GPU without cached latents, else 0",
    )

    # --- saving ---
    output_dir: PathValue = field(
        "saving",
        "Folder where the LoRA files and the resolved config.yaml are written; created if missing.",
        what="the folder where the LoRA files are written",
    )
    output_name: FileStem | None = field(
        "saving",
        "File name of the saved LoRA without extension: 'ink_painting' gives ink_painting.safetensors.",
        None,
        default_doc="last folder name of output_dir",
        allowed_doc="a file name without extension (no slashes)",
    )
    save_steps: Int | None = field(
        "saving",
        "Also save the LoRA every this many steps (kohya: save_every_n_steps), to compare stages of "
        "training.",
        None,
        default_doc="none (save only at the end)",
        ge=1,
    )
    save_precision: SavePrecision = field(
        "saving",
        "Number format of the saved weights: fp16 (half the size; what WebUI and ComfyUI expect), bf16 or "
        "fp32.",
        "fp16",
    )

    # --- logging ---
    logging_dir: PathValue | None = field(
        "logging",
        "Folder for TensorBoard logs (loss, learning rate).",
        None,
        default_doc="output_dir/logs",
    )
    sample_prompts: Annotated[list[str] | PathValue, BeforeValidator(prompts_input)] | None = field(
        "logging",
        "Prompts to render sample images from during training: a list of strings, or a prompt file in "
        "sd-scripts' syntax (one prompt a line, # comments, options --n negative --w width --h height "
        "--d seed --l cfg --s steps inside the line; list entries take the same options).",
        None,
        default_doc="none (no samples)",
        allowed_doc="prompts, or a prompt file (read when training starts)",
    )
    sample_every_n_steps: Int | None = field(
        "logging",
        "Render the sample prompts every this many steps.",
        None,
        default_doc="none",
        ge=1,
    )
    sample_every_n_epochs: Int | None = field(
        "logging",
        "Render the sample prompts at the end of every this many epochs.",
        None,
        default_doc="none",
        ge=1,
    )
    sample_at_first: bool = field(
        "logging",
        "Also render the sample prompts before the first step (step 0), to compare against the base model.",
        False,
    )
    sample_sampler: Annotated[str, AfterValidator(sampler_name)] | None = field(
        "logging",
        "Sampler for the sample images, in our or AUTOMATIC1111's spelling ('euler_a' = 'Euler a'). FLUX.1 "
        "samples with its flow-matching Euler only ('euler').",
        None,
        default_doc="euler_a (FLUX.1: euler)",
        allowed_doc="euler, euler_a, heun, dpm++ 2m, dpm++ 2m karras, dpm++ 2m sde, dpm++ 2m sde karras, "
        "ddim, unipc",
    )

    def random_crop_keys(self) -> list[str]:
        """Where a random crop is switched on: key paths ('random_crop', 'datasets[1].random_crop',
        'center_crop: false'); empty when every dataset crops the centre."""
        found = [path for path, value in self.per_dataset("random_crop") if value]
        if self.center_crop is False and not self.random_crop:  # before resolved() fills random_crop in
            found.append("center_crop: false")
        return found

    def changing_caption_keys(self) -> list[str]:
        """Key paths of the options that change a caption from step to step (shuffling, dropout)."""
        keys = ("shuffle_caption", "caption_dropout_rate", "caption_tag_dropout_rate")
        return [path for key in keys for path, value in self.per_dataset(key) if value]

    def per_dataset(self, key: str) -> list[tuple[str, Any]]:
        """(key path, value) of `key` at the top level and in every `datasets` entry that sets it."""
        found = [(key, getattr(self, key))]
        for i, entry in enumerate(self.datasets or []):
            if getattr(entry, key) is not None:
                found.append((f"datasets[{i}].{key}", getattr(entry, key)))
        return found

    def with_memory_profile(self) -> TrainConfig:
        """A copy with `memory_profile`'s settings filled into the keys the user did not write."""
        if self.memory_profile != "low":
            return self
        written = set(self.model_fields_set)
        update = low_memory_settings(written, self.batch_size, self.gradient_accumulation_steps)
        return self.model_copy(update=update)

    def resolved(self) -> TrainConfig:
        """A copy with every derived default filled in (what training uses and dumps as config.yaml)."""
        if self.memory_profile == "low":
            return self.with_memory_profile()._resolved()
        return self._resolved()

    def _resolved(self) -> TrainConfig:
        output_name = self.output_name
        if output_name is None:
            name = self.output_dir.name
            # "." or ".." have no useful name of their own: use the folder they point to.
            output_name = name if name not in ("", ".", "..") else self.output_dir.resolve().name or "lora"
        text_encoder_lr = self.learning_rate if self.text_encoder_lr is None else self.text_encoder_lr
        random_crop = self.random_crop if self.center_crop is None else not self.center_crop
        conv_rank, conv_alpha = self.conv_rank, self.conv_alpha
        if self.network_type == "locon" and conv_rank is None:  # LoCon's convs at the network's rank/alpha
            conv_rank = self.lora_rank
            conv_alpha = self.lora_alpha if conv_alpha is None else conv_alpha
        return self.model_copy(
            update={
                "unet_lr": self.learning_rate if self.unet_lr is None else self.unet_lr,
                "conv_rank": conv_rank,
                "conv_alpha": float(conv_rank) if conv_alpha is None and conv_rank else conv_alpha,
                # Left out (None): on where it is valid; it trains the same numbers, only faster.
                "cache_latents": (
                    not self.random_crop_keys() if self.cache_latents is None else self.cache_latents
                )
                or self.cache_latents_to_disk,
                "cache_text_encoder_outputs": (
                    not self.train_text_encoder and not self.changing_caption_keys()
                    if self.cache_text_encoder_outputs is None
                    else self.cache_text_encoder_outputs
                ),
                "random_crop": random_crop,
                "center_crop": not random_crop,
                "lora_alpha": float(self.lora_rank) if self.lora_alpha is None else self.lora_alpha,
                "text_encoder_lr": text_encoder_lr,
                "output_name": output_name,
                "logging_dir": self.output_dir / "logs" if self.logging_dir is None else self.logging_dir,
            }
        )

    def text_encoder_rates(self, num_encoders: int) -> list[float]:
        """The learning rate of each of a model's `num_encoders` text encoders (0: not trained), from a
        resolved config; all 0 when train_text_encoder is false. UserError when text_encoder_lr lists more
        rates than the model has text encoders."""
        if not self.train_text_encoder:
            return [0.0] * num_encoders
        rates = self.text_encoder_lr if self.text_encoder_lr is not None else self.learning_rate
        if isinstance(rates, float | int):
            return [float(rates)] * num_encoders
        if len(rates) != num_encoders:
            raise UserError(
                f"text_encoder_lr: {list(rates)} gives {len(rates)} rates but this model has {num_encoders} "
                "text encoder(s); give one number."
            )
        return [float(r) for r in rates]

    def changed_values(self) -> dict[str, Any]:
        """The keys the config sets to something other than their default, with their values."""
        return {
            name: getattr(self, name)
            for name in self.model_fields_set
            if getattr(self, name) != type(self).model_fields[name].default
        }

    def to_yaml_dict(self) -> dict[str, Any]:
        """The config as plain YAML-friendly types (paths as str, lists), in schema order."""
        return self.model_dump(mode="json")

    @classmethod
    def fields_by_section(cls) -> dict[str, list[str]]:
        """Field names grouped by doc section: TrainConfig's own fields first, then the mixins' (the mixins'
        fields come first in `model_fields`, but train_data_dir should open the data section)."""
        own = [name for name in cls.__annotations__ if name in cls.model_fields]
        ordered = own + [name for name in cls.model_fields if name not in own]
        groups: dict[str, list[str]] = {section: [] for section in SECTIONS}
        for name in ordered:
            groups[field_section(name)].append(name)
        return groups


def field_section(name: str) -> str:
    """The doc section ("data", "model", ...) of field `name`."""
    return _extra(name)["section"]


def field_what(name: str) -> str | None:
    """For a required field, a short phrase saying what it is (used in "missing required key" messages)."""
    return _extra(name).get("what")


def field_default_doc(name: str) -> str | None:
    """How a derived or optional default is described in the docs, e.g. 'same as lora_rank'."""
    return _extra(name).get("default_doc")


def field_allowed_doc(name: str) -> str | None:
    """For fields whose allowed values are not a type or range, how the docs describe them."""
    return _extra(name).get("allowed_doc")


def allowed_values(name: str) -> tuple[Any, ...] | None:
    """The allowed values of a choice field (e.g. lr_scheduler), or None for free-form fields."""
    annotation = TrainConfig.model_fields[name].annotation
    if getattr(annotation, "__origin__", None) is Literal:
        return get_args(annotation)
    return None


def _extra(name: str) -> dict[str, Any]:
    extra = TrainConfig.model_fields[name].json_schema_extra
    assert isinstance(extra, dict), name
    return extra
