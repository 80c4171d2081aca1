"""SDXL (SDXL 1.0 and what is trained from it: Pony, Illustrious, NoobAI): one UNet conditioned on two
text encoders and on each image's size and crop, an 8× VAE.

The conditioning follows the reference trainers (sd-scripts' strategy_sdxl.py, diffusers'
train_text_to_image_lora_sdxl.py): the penultimate hidden states of CLIP ViT-L (768) and OpenCLIP bigG
(1280) concatenated to 2048, the pooled embedding of bigG (its final-layer-normed state at the <EOS> token,
projected), and `add_time_ids` from data/size_conditioning.py. LoRA files use sd-scripts' SDXL names:
`lora_unet_` + sgm paths, `lora_te1_`, `lora_te2_` (export/sdxl_keys.py).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from diffusers import UNet2DConditionModel
from torch import nn
from transformers import CLIPTextModel, CLIPTextModelWithProjection

from lora_scripts.errors import UserError
from lora_scripts.export.kohya import LoraNetwork
from lora_scripts.export.metadata import FamilyInfo
from lora_scripts.export.sdxl_keys import sdxl_networks
from lora_scripts.models.detect import checkpoint_shapes
from lora_scripts.models.family import KLVaeLatents, LoraTargets, ModelFamily
from lora_scripts.models.long_prompts import chunked_input_ids, join_chunks
from lora_scripts.models.lora import LoraSpec, add_lora_adapter
from lora_scripts.models.lora_presets import resolve_lora_layers
from lora_scripts.models.sdxl_loading import SDXLComponents, check_sdxl_folder, require_sdxl_parts

if TYPE_CHECKING:
    from diffusers import SchedulerMixin

    from lora_scripts.models.inference import SamplingPipeline, Unwrap

log = logging.getLogger(__name__)

# sd-scripts' ss_base_model_version and sai_model_spec architecture for SDXL LoRAs: A1111/Forge list a LoRA
# under SDXL by these.
SDXL_BASE_MODEL_VERSION = "sdxl_base_v1-0"
SDXL_MODELSPEC_ARCHITECTURE = "stable-diffusion-xl-v1-base"


class SDXLFamily(KLVaeLatents, ModelFamily):
    """SDXL base models. `text_encoders` is [CLIP ViT-L, OpenCLIP bigG] (kohya's lora_te1, lora_te2)."""

    native_resolution = 1024
    text_encoder_classes = (CLIPTextModel, CLIPTextModelWithProjection)
    text_encoder_parts = ("text_encoder", "text_encoder_2")
    denoiser_class = UNet2DConditionModel

    def __init__(
        self, components: SDXLComponents, *, clip_skip: int | None = None, max_token_length: int = 75
    ):
        if clip_skip not in (None, 1, 2):
            # SDXL was trained on the penultimate layer of both encoders; sd-scripts ignores clip_skip for it.
            log.warning(
                "clip_skip: SDXL always uses its text encoders' penultimate layer; %d is ignored.", clip_skip
            )
        self.components = components
        self.max_token_length = max_token_length
        self.noise_scheduler = components.noise_scheduler
        self.info = FamilyInfo(
            base_model_version=SDXL_BASE_MODEL_VERSION,
            v2=False,
            prediction_type=components.prediction_type,
            modelspec_architecture=SDXL_MODELSPEC_ARCHITECTURE,
            zero_terminal_snr=components.zero_terminal_snr,
        )
        self.unet = components.unet
        self.vae = components.vae
        self.text_encoder = components.text_encoder
        self.text_encoder_2 = components.text_encoder_2
        self.tokenizer = components.tokenizer
        self.tokenizer_2 = components.tokenizer_2
        self.trains_text_encoder = False

    @classmethod
    def single_file_problems(cls, path: Path, values: Mapping[str, object]) -> list[str]:
        """A partial SDXL file (UNet-only or text-encoder-only) is refused, as the loader refuses it."""
        try:
            require_sdxl_parts(checkpoint_shapes(path), path)
        except UserError as err:
            return list(err.messages)
        return []

    @classmethod
    def folder_problems(cls, path: Path) -> list[str]:
        """A diffusers folder that is not an SDXL base model (a refiner, an inpainting UNet) is refused."""
        try:
            check_sdxl_folder(path)
        except UserError as err:
            return list(err.messages)
        return []

    @classmethod
    def file_networks(cls, unet: nn.Module, text_encoders: list[nn.Module]) -> list[LoraNetwork]:
        """`lora_unet` (sgm paths; diffusers paths too, through `module_index`), `lora_te1`, `lora_te2`."""
        return sdxl_networks(unet, text_encoders)

    @property
    def denoiser(self) -> nn.Module:
        return self.unet

    @property
    def text_encoders(self) -> list[nn.Module]:
        return [self.text_encoder, self.text_encoder_2]

    def add_lora(self, targets: LoraTargets, spec: LoraSpec) -> list[LoraNetwork]:
        unet_targets, conv_targets, te_targets = resolve_lora_layers(
            self.unet, self.text_encoders, targets, conv=spec.conv_rank is not None
        )
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
        trained: list[nn.Module | None] = []
        for encoder, layers in zip(self.text_encoders, targets.text_encoder_layers(te_targets), strict=False):
            if layers is not None:
                add_lora_adapter(encoder, layers, spec.rank, spec.alpha, dropout=spec.dropout, kind=spec.kind)
            trained.append(encoder if layers is not None else None)
        self.trains_text_encoder = any(trained)
        return sdxl_networks(self.unet, trained)

    def encode_prompts(self, captions: list[str], device: torch.device) -> dict[str, torch.Tensor]:
        """{"encoder_hidden_states": [B, 77, 2048], "text_embeds": [B, 1280]} (widths of the full-size model;
        152 or 227 tokens for max_token_length 150 / 225, pooled from the first chunk as sd-scripts does)."""
        ids_1 = chunked_input_ids(self.tokenizer, captions, self.max_token_length).to(device)
        ids_2 = chunked_input_ids(self.tokenizer_2, captions, self.max_token_length).to(device)
        chunks = ids_1.shape[1]
        with torch.set_grad_enabled(self.trains_text_encoder and torch.is_grad_enabled()):
            out_1 = self.text_encoder(ids_1.flatten(0, 1), output_hidden_states=True, return_dict=True)
            out_2 = self.text_encoder_2(ids_2.flatten(0, 1), output_hidden_states=True, return_dict=True)
            pooled = self._pooled(out_2.last_hidden_state, ids_2.flatten(0, 1))[::chunks]
        hidden = torch.cat(
            [join_chunks(out_1.hidden_states[-2], chunks), join_chunks(out_2.hidden_states[-2], chunks)],
            dim=-1,
        )
        return {"encoder_hidden_states": hidden, "text_embeds": pooled}

    def _pooled(self, last_hidden_state: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        """bigG's pooled embedding [N, P]: the state at each sequence's first <EOS>, projected. sd-scripts'
        `_pool_workaround`; the same as transformers' `text_embeds` for SDXL's tokenizers, but not tied to the
        EOS having the largest id (transformers' legacy argmax), which a resized vocabulary breaks."""
        encoder = getattr(self.text_encoder_2, "module", self.text_encoder_2)  # DDP-wrapped or not
        eos = torch.argmax((input_ids == self.tokenizer_2.eos_token_id).int(), dim=1)
        states = last_hidden_state[torch.arange(last_hidden_state.shape[0], device=eos.device), eos]
        projection = encoder.text_projection
        return projection(states.to(projection.weight.dtype)).to(last_hidden_state.dtype)

    def image_conditioning(self, size_conditioning: torch.Tensor) -> dict[str, torch.Tensor]:
        """{"time_ids": [B, 6]}: SDXL's add_time_ids (original size, crop top-left, target size)."""
        return {"time_ids": size_conditioning.float()}

    def predict(
        self, noisy_latents: torch.Tensor, timesteps: torch.Tensor, cond: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        hidden = cond["encoder_hidden_states"]
        added = {
            "text_embeds": cond["text_embeds"].to(hidden.dtype),
            # float32 whatever the weights' dtype: the UNet turns the sizes into sinusoids in float32 and
            # casts the result (as sd-scripts' get_size_embeddings does); bf16 would round 1365 px to 1368.
            "time_ids": cond["time_ids"].float(),
        }
        return self.unet(noisy_latents, timesteps, hidden, added_cond_kwargs=added).sample

    def sampling_pipeline(self, scheduler: SchedulerMixin, unwrap: Unwrap | None = None) -> SamplingPipeline:
        """A StableDiffusionXLPipeline over the UNet, VAE and both text encoders (unwrapped). It reads both
        encoders' penultimate layer, as training does, so clip skip stays 1 (A1111 ignores it for SDXL)."""
        # Imported here: diffusers' pipeline modules load only when something samples.
        from lora_scripts.models.inference import SamplingPipeline, sdxl_pipeline, unwrapped

        unwrap = unwrap or unwrapped
        unet = unwrap(self.unet)
        encoders = (unwrap(self.text_encoder), unwrap(self.text_encoder_2))
        pipe = sdxl_pipeline(unet, self.vae, encoders, (self.tokenizer, self.tokenizer_2), scheduler)
        return SamplingPipeline(pipe, (unet, self.vae, *encoders))
