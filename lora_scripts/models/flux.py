"""FLUX.1 (dev and schnell): a rectified-flow transformer over packed 16-channel latents, conditioned on
T5-XXL's token states and CLIP-L's pooled embedding, with a guidance input in the guidance-distilled dev.

The objective and its options follow the reference trainers (models/flow_matching.py): timesteps are noise
levels sigma drawn by `timestep_sampling`, the noisy latents (1 - sigma) x + sigma noise, the target the
velocity noise - x. The conditioning is what diffusers' FluxPipeline computes (`_get_clip_prompt_embeds`,
`_get_t5_prompt_embeds`): CLIP-L's pooled output for 77 tokens, T5's last hidden state for 512 tokens (dev) or
256 (schnell), padded to that length. The latents are the VAE posterior shifted and scaled,
(z - shift_factor) * scaling_factor, packed into 2×2 patches.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from diffusers import FluxTransformer2DModel
from torch import nn
from transformers import CLIPTextModel, T5EncoderModel

from lora_scripts.errors import UserError
from lora_scripts.export.kohya import LoraNetwork
from lora_scripts.export.metadata import FamilyInfo
from lora_scripts.models.detect import checkpoint_shapes, flux_variant
from lora_scripts.models.family import CaptionReader, KLVaeLatents, LoraTargets, ModelFamily
from lora_scripts.models.flow_matching import (
    FlowSettings,
    image_ids,
    noisy_latents,
    pack_latents,
    sample_sigmas,
    sigmas_at,
    unpack_latents,
)
from lora_scripts.models.flux_loading import FluxComponents, missing_part_problems, t5_tokenizer
from lora_scripts.models.locate import locate_base_model
from lora_scripts.models.lora import LoraSpec, add_lora_adapter
from lora_scripts.models.lora_presets import FLUX_PRESETS, resolve_lora_layers
from lora_scripts.models.sd_loading import folder_config

if TYPE_CHECKING:
    from diffusers import SchedulerMixin

    from lora_scripts.models.inference import SamplingPipeline, Unwrap

log = logging.getLogger(__name__)

# sd-scripts' ss_base_model_version and the model spec architectures of FLUX.1 LoRAs.
FLUX_BASE_MODEL_VERSION = "flux1"
FLUX_MODELSPEC_ARCHITECTURE = {"dev": "flux-1-dev", "schnell": "flux-1-schnell"}
# T5 tokens FLUX.1 was trained with (diffusers' FluxPipeline and sd-scripts use the same defaults).
T5_MAX_LENGTH = {"dev": 512, "schnell": 256}
CLIP_MAX_LENGTH = 77


@dataclass(frozen=True)
class FluxOptions:
    """The config's FLUX keys: the objective, the guidance the dev model is given while training (1.0, as
    the reference trainers; it is a distilled model's input, not classifier-free guidance), the T5 length
    (None: the variant's), and whether T5 trains too (LoRA on both encoders)."""

    flow: FlowSettings = FlowSettings()
    guidance_scale: float = 1.0
    t5_max_token_length: int | None = None


@dataclass(frozen=True)
class FluxLoad:
    """How to load a FLUX.1 model for training: the separate part files (config keys vae, clip_l, t5xxl)
    and the training options."""

    vae: str | None = None
    clip_l: str | None = None
    t5xxl: str | None = None
    options: FluxOptions = FluxOptions()


# Keys of the DDPM objective or of CLIP-only models that FLUX.1 has no use for: each set one is refused
# with its reason, rather than silently ignored.
_NOT_FOR_FLUX = {
    "v_parameterization": "FLUX.1 predicts a flow velocity, not noise or v; leave it out",
    "zero_terminal_snr": "FLUX.1's noise levels already reach pure noise; leave it out",
    "min_snr_gamma": "FLUX.1's rectified-flow loss has no SNR weighting; leave it out",
    "clip_skip": "FLUX.1 reads CLIP-L's pooled output and T5, not a CLIP layer; leave it out",
    "max_token_length": "FLUX.1 reads T5 tokens; use t5xxl_max_token_length",
    "conv_rank": "FLUX.1's transformer has no convolutions for LoCon; leave it out",
    "conv_alpha": "FLUX.1's transformer has no convolutions for LoCon; leave it out",
}


class FluxFamily(KLVaeLatents, ModelFamily):
    """FLUX.1 dev / schnell. `text_encoders` is [CLIP-L, T5-XXL] (sd-scripts' lora_te1, lora_te3)."""

    native_resolution = 1024
    text_encoder_classes = (CLIPTextModel, T5EncoderModel)
    text_encoder_parts = ("text_encoder", "text_encoder_2")
    denoiser_class = FluxTransformer2DModel
    denoiser_part = "transformer"
    denoiser_name = "transformer"
    quantized_text_encoders = (1,)  # T5-XXL: 8.9 GiB in bf16, more than an 8 GB card holds while caching
    samples_from_embeddings = True  # T5-XXL (4.8 B parameters) need not stay on the GPU for samples
    denoiser_presets = FLUX_PRESETS
    has_convs = False
    default_cfg_scale = 3.5  # FLUX.1-dev's guidance in diffusers' FluxPipeline and ComfyUI
    default_sampler = "euler"
    objective = "flow"
    # The T5 trains only when text_encoder_lr lists a rate for it (sd-scripts' train_t5xxl is off by default).
    default_text_encoder_mask = (True, False)

    @classmethod
    def key_problems(cls, values: dict[str, object]) -> list[str]:
        problems = [f"{key}: {why}." for key, why in _NOT_FOR_FLUX.items() if values.get(key) is not None]
        sampler = values.get("sample_sampler")
        if isinstance(sampler, str) and sampler.strip().lower() not in ("euler", "k_euler"):
            problems.append(
                f"sample_sampler: FLUX.1 samples with flow-matching Euler only, not '{sampler}'; "
                "use euler or leave it out."
            )
        if values.get("loss_type") in ("huber", "smooth_l1"):
            problems.append(
                f"loss_type: {values['loss_type']} needs a DDPM noise schedule, which FLUX.1 does not have; "
                "use l2 or l1."
            )
        network_type = values.get("network_type")
        if network_type not in (None, "lora"):
            # BFL files fuse q/k/v (and linear1's parts) into one layer: a LoRA of the parts is an exact LoRA
            # of the fused layer (export/fused.py), a LoHa, LoKr or DoRA of them is not.
            problems.append(
                f"network_type: {network_type} is not written for FLUX.1 yet (its files fuse q/k/v into one "
                "layer, which only a plain LoRA of the parts matches exactly); use lora."
            )
        return problems

    @classmethod
    def caption_reader(cls, base_model: str, values: Mapping[str, object]) -> CaptionReader:
        """T5-XXL reads the caption (CLIP-L gives only its pooled embedding): t5xxl_max_token_length or the
        variant's 512 / 256 positions, less the end token. UserError for a base model that cannot be read."""
        location = locate_base_model(base_model)
        if location.kind == "single_file":
            variant = flux_variant(checkpoint_shapes(location.path))
        else:
            config = folder_config(FluxTransformer2DModel, location.path, "transformer")
            variant = "dev" if config.get("guidance_embeds") else "schnell"
        length = values.get("t5xxl_max_token_length") or T5_MAX_LENGTH[variant]
        return CaptionReader("T5-XXL", int(length) - 1, t5_tokenizer)  # type: ignore[arg-type]

    def __init__(self, components: FluxComponents, options: FluxOptions | None = None):
        self.components = components
        self.options = options or FluxOptions()
        self.variant = components.variant
        self.transformer = components.transformer
        self.vae = components.vae
        self.text_encoder = components.text_encoder
        self.text_encoder_2 = components.text_encoder_2
        self.tokenizer = components.tokenizer
        self.tokenizer_2 = components.tokenizer_2
        self.noise_scheduler = None  # flow matching: the objective below, not a DDPM schedule
        self.info = FamilyInfo(
            base_model_version=FLUX_BASE_MODEL_VERSION,
            v2=False,
            prediction_type="flow",
            modelspec_architecture=FLUX_MODELSPEC_ARCHITECTURE[components.variant],
        )
        self.t5_max_length = self.options.t5_max_token_length or T5_MAX_LENGTH[components.variant]
        # FluxPipeline reads T5 to max_sequence_length, which sampling takes from the tokenizer's length.
        self.tokenizer_2.model_max_length = self.t5_max_length
        self.trains_text_encoder = False

    # --- modules ---

    @classmethod
    def file_networks(cls, unet: nn.Module, text_encoders: list[nn.Module]) -> list[LoraNetwork]:
        from lora_scripts.export.flux_keys import flux_networks

        return flux_networks(unet, text_encoders)

    @property
    def denoiser(self) -> nn.Module:
        return self.transformer

    @property
    def text_encoders(self) -> list[nn.Module]:
        return [self.text_encoder, self.text_encoder_2]

    def add_lora(self, targets: LoraTargets, spec: LoraSpec) -> list[LoraNetwork]:
        from lora_scripts.export.flux_keys import flux_networks

        layers, _, te_targets = resolve_lora_layers(
            self.transformer,
            self.text_encoders,
            targets,
            conv=False,
            presets=FLUX_PRESETS,
            component="transformer",
        )
        add_lora_adapter(self.transformer, layers, spec.rank, spec.alpha, dropout=spec.dropout)
        trained: list[nn.Module | None] = []
        for encoder, encoder_layers in zip(
            self.text_encoders, targets.text_encoder_layers(te_targets), strict=False
        ):
            if encoder_layers is not None:
                add_lora_adapter(encoder, encoder_layers, spec.rank, spec.alpha, dropout=spec.dropout)
            trained.append(encoder if encoder_layers is not None else None)
        self.trains_text_encoder = any(trained)
        return flux_networks(self.transformer, trained)

    @classmethod
    def single_file_problems(cls, path: Path, values: Mapping[str, object]) -> list[str]:
        """The parts (vae, clip_l, t5xxl) a bare transformer file lacks and the config does not name."""
        return missing_part_problems(path, {key: values.get(key) for key in ("vae", "clip_l", "t5xxl")})

    @classmethod
    def swap_blocks(cls, denoiser: nn.Module, count: int) -> list[nn.Module]:
        """The blocks of the transformer `denoiser` that `blocks_to_swap: count` keeps on the CPU, in the
        order they run: as sd-scripts counts them, the last count // 2 double blocks and the last
        2 x (count - count // 2) single blocks (a single block has about half a double block's weights)."""
        doubles = list(denoiser.transformer_blocks)
        singles = list(denoiser.single_transformer_blocks)
        double_count, single_count = count // 2, 2 * (count - count // 2)
        if double_count > len(doubles) or single_count > len(singles):
            most = max(
                n for n in range(count + 1) if n // 2 <= len(doubles) and 2 * (n - n // 2) <= len(singles)
            )
            raise UserError(
                f"blocks_to_swap: {count} means {double_count} double and {single_count} single blocks, and "
                f"this model has {len(doubles)} and {len(singles)}; use at most {most}."
            )
        return doubles[len(doubles) - double_count :] + singles[len(singles) - single_count :]

    # --- text ---

    def encode_prompts(self, captions: list[str], device: torch.device) -> dict[str, torch.Tensor]:
        """{"pooled_projections": [B, 768] CLIP-L pooled, "encoder_hidden_states": [B, L, 4096] T5's last
        hidden state} (full-size widths; L = t5_max_length)."""
        clip_ids = self._token_ids(self.tokenizer, captions, CLIP_MAX_LENGTH).to(device)
        t5_ids = self._token_ids(self.tokenizer_2, captions, self.t5_max_length).to(device)
        with torch.set_grad_enabled(self.trains_text_encoder and torch.is_grad_enabled()):
            pooled = self.text_encoder(clip_ids, output_hidden_states=False).pooler_output
            hidden = self.text_encoder_2(t5_ids, output_hidden_states=False)[0]
        return {"pooled_projections": pooled, "encoder_hidden_states": hidden}

    @staticmethod
    def _token_ids(tokenizer: object, captions: list[str], length: int) -> torch.Tensor:
        return tokenizer(  # type: ignore[operator]
            captions, padding="max_length", max_length=length, truncation=True, return_tensors="pt"
        ).input_ids

    # --- the objective ---

    def sample_timesteps(self, latents: torch.Tensor) -> torch.Tensor:
        """fp32 [B] noise levels sigma in (0, 1), drawn by the `timestep_sampling` option."""
        size = (latents.shape[-2], latents.shape[-1])
        return sample_sigmas(latents.shape[0], self.options.flow, size, latents.device)

    def timesteps_at(self, quantiles: torch.Tensor, latent_size: tuple[int, int]) -> torch.Tensor:
        return sigmas_at(quantiles, self.options.flow, latent_size)

    def add_noise(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        return noisy_latents(latents, noise, timesteps)

    def training_target(
        self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
    ) -> torch.Tensor:
        """The velocity noise - latents (`raw` and `additive`), or the clean latents (`sigma_scaled`, whose
        `predict` returns the clean latents the output implies)."""
        if self.options.flow.model_prediction_type == "sigma_scaled":
            return latents.float()
        return noise.float() - latents.float()

    def predict(
        self, noisy_latents: torch.Tensor, timesteps: torch.Tensor, cond: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        """The transformer's output unpacked to [B, 16, h, w], read as `model_prediction_type` says."""
        batch, size = noisy_latents.shape[0], (noisy_latents.shape[-2], noisy_latents.shape[-1])
        dtype = noisy_latents.dtype
        hidden = cond["encoder_hidden_states"]
        guidance = None
        if self.variant == "dev":
            guidance = torch.full(
                (batch,), self.options.guidance_scale, device=noisy_latents.device, dtype=dtype
            )
        output = self.transformer(
            hidden_states=pack_latents(noisy_latents),
            encoder_hidden_states=hidden.to(dtype),
            pooled_projections=cond["pooled_projections"].to(dtype),
            timestep=timesteps.to(noisy_latents.device, dtype),
            img_ids=image_ids(size, noisy_latents.device, dtype),
            txt_ids=torch.zeros(hidden.shape[1], 3, device=noisy_latents.device, dtype=dtype),
            guidance=guidance,
            return_dict=False,
        )[0]
        output = unpack_latents(output, size)
        kind = self.options.flow.model_prediction_type
        if kind == "additive":
            return output + noisy_latents
        if kind == "sigma_scaled":
            sigmas = timesteps.to(output.device, output.dtype).view(-1, 1, 1, 1)
            return noisy_latents - sigmas * output
        return output

    @property
    def schedule_config(self) -> dict:
        """FLUX.1's FlowMatchEulerDiscreteScheduler config (dev: shift 3.0, dynamic; schnell: shift 1.0)."""
        return dict(self.components.scheduler_config)

    def sampling_pipeline(self, scheduler: SchedulerMixin, unwrap: Unwrap | None = None) -> SamplingPipeline:
        """A FluxPipeline over the transformer, VAE and both encoders (unwrapped)."""
        from lora_scripts.models.inference import SamplingPipeline, flux_pipeline, unwrapped

        unwrap = unwrap or unwrapped
        transformer = unwrap(self.transformer)
        encoders = (unwrap(self.text_encoder), unwrap(self.text_encoder_2))
        pipe = flux_pipeline(transformer, self.vae, encoders, (self.tokenizer, self.tokenizer_2), scheduler)
        return SamplingPipeline(pipe, (transformer, self.vae, *encoders))
