"""Training metadata written into every LoRA file: sd-scripts' `ss_*` keys, hashes and `modelspec.*`.

A1111 reads `ss_output_name` as the `<lora:NAME>` alias, `ss_tag_frequency` for its tag list and
`sshs_model_hash` as the hash; Civitai and ComfyUI read `modelspec.*`. All values are strings, as the
safetensors format requires.
"""

from __future__ import annotations

import datetime as _dt
import json
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from lora_scripts.export.hashes import precalculate_hashes


@dataclass(frozen=True)
class FamilyInfo:
    """What a model family contributes to metadata."""

    base_model_version: str  # sd-scripts' ss_base_model_version: "sd_v1", "sd_v2", ...
    v2: bool
    prediction_type: str  # "epsilon" | "v_prediction"
    modelspec_architecture: str  # e.g. "stable-diffusion-v1"
    # The base model marks itself as trained with zero terminal SNR (a `ztsnr` key, a scheduler config's
    # rescale_betas_zero_snr): the default of training's zero_terminal_snr key.
    zero_terminal_snr: bool = False


@dataclass(frozen=True)
class RunMetadata:
    """Everything about a run that is the same in every file it writes."""

    family: FamilyInfo
    rank: int
    alpha: float
    target_modules: list[str] | str  # a list of layer names or a preset name
    text_encoder_target_modules: list[str] | str | None  # None when the text encoder is not trained
    resolution: int
    num_train_images: int
    num_batches_per_epoch: int
    num_epochs: int
    max_train_steps: int
    batch_size: int
    gradient_accumulation_steps: int
    learning_rate: float
    text_encoder_lr: float | tuple[float, ...] | None  # SDXL: one rate per text encoder
    lr_scheduler: str
    lr_warmup_steps: int
    max_grad_norm: float
    mixed_precision: str
    seed: int
    sd_model_name: str
    tag_frequency: dict[str, dict[str, int]]
    unet_lr: float | None = None  # None: learning_rate
    optimizer: str = "torch.optim.AdamW"  # sd-scripts writes the optimizer's qualified class name
    network_args: dict[str, object] = field(default_factory=dict)  # e.g. conv_dim, conv_alpha, dropout
    # sd-scripts' module: networks.lora, or lycoris.kohya for LoHa / LoKr / DoRA (network_args["algo"] says)
    network_module: str = "networks.lora"
    extra: dict[str, str] = field(default_factory=dict)  # further ss_* run facts (datasets, buckets, loss)
    training_started_at: float = field(default_factory=time.time)

    def ss_metadata(self) -> dict[str, str]:
        network_args: dict[str, object] = {"target_modules": self.target_modules, **self.network_args}
        if self.text_encoder_target_modules is not None:
            network_args["text_encoder_target_modules"] = self.text_encoder_target_modules
        return {
            "ss_network_module": self.network_module,
            "ss_network_dim": str(self.rank),
            "ss_network_alpha": _num(self.alpha),
            "ss_network_args": json.dumps(network_args),
            "ss_network_train_unet_only": str(self.text_encoder_target_modules is None),
            "ss_base_model_version": self.family.base_model_version,
            "ss_v2": str(self.family.v2),
            "ss_v_parameterization": str(self.family.prediction_type == "v_prediction"),
            "ss_resolution": str((self.resolution, self.resolution)),
            "ss_num_train_images": str(self.num_train_images),
            "ss_num_batches_per_epoch": str(self.num_batches_per_epoch),
            "ss_num_epochs": str(self.num_epochs),
            "ss_max_train_steps": str(self.max_train_steps),
            "ss_batch_size_per_device": str(self.batch_size),
            "ss_gradient_accumulation_steps": str(self.gradient_accumulation_steps),
            "ss_learning_rate": _num(self.learning_rate),
            "ss_unet_lr": _num(self.learning_rate if self.unet_lr is None else self.unet_lr),
            "ss_text_encoder_lr": _rates(self.text_encoder_lr),
            "ss_lr_scheduler": self.lr_scheduler,
            "ss_lr_warmup_steps": str(self.lr_warmup_steps),
            "ss_max_grad_norm": _num(self.max_grad_norm),
            "ss_mixed_precision": self.mixed_precision,
            "ss_optimizer": self.optimizer,
            "ss_seed": str(self.seed),
            "ss_sd_model_name": self.sd_model_name,
            "ss_tag_frequency": json.dumps(self.tag_frequency, ensure_ascii=False),
            "ss_training_started_at": str(self.training_started_at),
            **self.extra,
        }


def _rates(value: float | tuple[float, ...] | None) -> str:
    """sd-scripts' str() of text_encoder_lr: "None", "5e-05", or "[5e-05, 0.0]" for one rate per encoder."""
    if value is None:
        return "None"
    if isinstance(value, tuple):
        return "[" + ", ".join(repr(float(v)) for v in value) + "]"
    return _num(value)


def _num(value: float) -> str:
    """8 → "8", 0.0002 → "0.0002" (sd-scripts writes str() of the number)."""
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def file_metadata(
    run: RunMetadata,
    tensors: dict[str, torch.Tensor],
    *,
    output_name: str,
    steps: int,
    epoch: int,
    extra: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """The full metadata of one file: run facts, per-file facts (and `extra`), hashes and modelspec."""
    now = time.time()
    meta = run.ss_metadata()
    meta.update(
        {
            "ss_output_name": output_name,
            "ss_steps": str(steps),
            "ss_epoch": str(epoch),
            "ss_training_finished_at": str(now),
            **(extra or {}),
        }
    )
    model_hash, legacy_hash = precalculate_hashes(tensors, meta)
    meta["sshs_model_hash"] = model_hash
    meta["sshs_legacy_hash"] = legacy_hash
    prediction = "v" if run.family.prediction_type == "v_prediction" else "epsilon"
    meta.update(
        {
            "modelspec.sai_model_spec": "1.0.0",
            "modelspec.architecture": f"{run.family.modelspec_architecture}/lora",
            "modelspec.implementation": "diffusers",
            "modelspec.title": output_name,
            "modelspec.resolution": f"{run.resolution}x{run.resolution}",
            "modelspec.prediction_type": prediction,
            "modelspec.date": _dt.datetime.fromtimestamp(now).isoformat(timespec="seconds"),
        }
    )
    return meta
