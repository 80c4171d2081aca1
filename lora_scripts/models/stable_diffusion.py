"""SD 1.x / 2.x: one UNet, one CLIP text encoder (`lora_te`), an 8× VAE."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch
from diffusers import UNet2DConditionModel
from torch import nn
from transformers import CLIPTextModel

from lora_scripts.errors import UserError
from lora_scripts.export.kohya import LoraNetwork, clip_name_prefix
from lora_scripts.export.metadata import FamilyInfo
from lora_scripts.models.family import KLVaeLatents, LoraTargets, ModelFamily
from lora_scripts.models.long_prompts import chunked_input_ids, join_chunks
from lora_scripts.models.lora import LoraSpec, add_lora_adapter
from lora_scripts.models.lora_presets import resolve_lora_layers
from lora_scripts.models.sd_loading import SDComponents

if TYPE_CHECKING:
    from diffusers import SchedulerMixin

    from lora_scripts.models.inference import SamplingPipeline, Unwrap

log = logging.getLogger(__name__)


_OPEN_CLIP_ATTENTION = {"q_proj", "k_proj", "v_proj", "out_proj"}


def partial_fused_attention_warning(targets: list[str]) -> str | None:
    """SD 2.x's OpenCLIP fuses q/k/v into one attention layer; A1111 applies a text-encoder LoRA there only
    when a layer has all four of q/k/v/out_proj, and silently ignores the rest. The warning, or None."""
    chosen = {t.rsplit(".", 1)[-1] for t in targets} & _OPEN_CLIP_ATTENTION
    if not chosen or chosen == _OPEN_CLIP_ATTENTION:
        return None
    missing = ", ".join(sorted(_OPEN_CLIP_ATTENTION - chosen))
    return (
        "text_encoder_target_modules: on SD 2.x, AUTOMATIC1111 ignores text-encoder attention LoRA unless "
        f"all of q_proj, k_proj, v_proj and out_proj are trained; add {missing}."
    )


def _modelspec_architecture(version: str, prediction_type: str) -> str:
    # sd-scripts' sai_model_spec names; SD 2.x is told apart by prediction type as they do.
    if version == "sd_v1":
        return "stable-diffusion-v1"
    return "stable-diffusion-v2-768-v" if prediction_type == "v_prediction" else "stable-diffusion-v2-512"


class StableDiffusionFamily(KLVaeLatents, ModelFamily):
    """SD 1.x and 2.x. Text-encoder module paths get a `text_model.` prefix in kohya names if they lack it
    (transformers ≥ 5 dropped that submodule; A1111/ComfyUI require it)."""

    text_encoder_classes = (CLIPTextModel,)
    denoiser_class = UNet2DConditionModel
    text_encoder_parts = ("text_encoder",)

    def __init__(self, components: SDComponents, *, clip_skip: int | None = None, max_token_length: int = 75):
        self.components = components
        self.max_token_length = max_token_length
        self.clip_skip = clip_skip or 1
        layers = components.text_encoder.config.num_hidden_layers
        if self.clip_skip >= layers:
            raise UserError(
                f"clip_skip: {self.clip_skip} is too large for this text encoder ({layers} layers); use a "
                f"value below {layers} (2 is the usual choice)."
            )
        self.noise_scheduler = components.noise_scheduler
        self.info = FamilyInfo(
            base_model_version=components.version,
            v2=components.version == "sd_v2",
            prediction_type=components.prediction_type,
            modelspec_architecture=_modelspec_architecture(components.version, components.prediction_type),
            zero_terminal_snr=components.zero_terminal_snr,
        )
        self.unet = components.unet
        self.vae = components.vae
        self.text_encoder = components.text_encoder
        self.tokenizer = components.tokenizer
        self.trains_text_encoder = False

    @classmethod
    def file_networks(cls, unet: nn.Module, text_encoders: list[nn.Module]) -> list[LoraNetwork]:
        """`lora_unet`, `lora_te` and `lora_te1`, the same text encoder (a few SD 1.x files use SDXL's
        first-encoder prefix)."""
        networks = [LoraNetwork("lora_unet", unet)]
        for text_encoder in text_encoders:
            prefix = clip_name_prefix(text_encoder)
            networks += [
                LoraNetwork("lora_te", text_encoder, prefix),
                LoraNetwork("lora_te1", text_encoder, prefix),
            ]
        return networks

    @property
    def denoiser(self) -> nn.Module:
        return self.unet

    @property
    def text_encoders(self) -> list[nn.Module]:
        return [self.text_encoder]

    def add_lora(self, targets: LoraTargets, spec: LoraSpec) -> list[LoraNetwork]:
        unet_targets, conv_targets, te_targets = resolve_lora_layers(
            self.unet, [self.text_encoder], targets, conv=spec.conv_rank is not None
        )
        (te_targets,) = targets.text_encoder_layers(te_targets) or (None,)
        warning = partial_fused_attention_warning(te_targets) if te_targets and self.info.v2 else None
        if warning:
            log.warning(warning)
        add_lora_adapter(
            self.unet,
            unet_targets,
            spec.rank,
            spec.alpha,
            conv_targets=conv_targets,
            conv_rank=spec.conv_rank,
            conv_alpha=spec.conv_alpha,
            dropout=spec.dropout,
            kind=spec.kind,
        )
        networks = [LoraNetwork("lora_unet", self.unet)]
        if te_targets is not None:
            add_lora_adapter(
                self.text_encoder, te_targets, spec.rank, spec.alpha, dropout=spec.dropout, kind=spec.kind
            )
            networks.append(LoraNetwork("lora_te", self.text_encoder, clip_name_prefix(self.text_encoder)))
            self.trains_text_encoder = True
        return networks

    def tokenize(self, captions: list[str]) -> torch.Tensor:
        """Captions → input ids [B, 77] (CLIP reads 75 tokens; longer captions are cut)."""
        return self.tokenizer(
            captions,
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids

    def encode_prompts(self, captions: list[str], device: torch.device) -> dict[str, torch.Tensor]:
        """{"encoder_hidden_states": [B, 77, C]} ([B, 152 or 227, C] for max_token_length 150 / 225)."""
        chunked = chunked_input_ids(self.tokenizer, captions, self.max_token_length).to(device)
        input_ids = chunked.flatten(0, 1)
        with torch.set_grad_enabled(self.trains_text_encoder and torch.is_grad_enabled()):
            if self.clip_skip <= 1:
                hidden = self.text_encoder(input_ids)[0]
            else:
                # sd-scripts' and A1111's clip skip: the n-th hidden state from the end, then the final layer
                # norm (which the last layer's output gets inside CLIPTextModel).
                out = self.text_encoder(input_ids, output_hidden_states=True, return_dict=True)
                encoder = getattr(self.text_encoder, "module", self.text_encoder)  # DDP-wrapped or not
                norm = encoder.text_model.final_layer_norm if hasattr(encoder, "text_model") else None
                norm = norm or encoder.final_layer_norm
                hidden = norm(out.hidden_states[-self.clip_skip])
        return {"encoder_hidden_states": join_chunks(hidden, chunked.shape[1])}

    def predict(
        self, noisy_latents: torch.Tensor, timesteps: torch.Tensor, cond: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        return self.unet(noisy_latents, timesteps, cond["encoder_hidden_states"]).sample

    def sampling_pipeline(self, scheduler: SchedulerMixin, unwrap: Unwrap | None = None) -> SamplingPipeline:
        """A StableDiffusionPipeline over the UNet, VAE and text encoder (unwrapped), at this clip skip."""
        # Imported here: diffusers' pipeline modules load only when something samples.
        from lora_scripts.models.inference import SamplingPipeline, sd_pipeline, unwrapped

        unwrap = unwrap or unwrapped
        unet, text_encoder = unwrap(self.unet), unwrap(self.text_encoder)
        pipe = sd_pipeline(unet, self.vae, text_encoder, self.tokenizer, scheduler)
        return SamplingPipeline(pipe, (unet, self.vae, text_encoder), clip_skip=self.clip_skip)
