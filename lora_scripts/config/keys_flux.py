"""Config keys of FLUX.1 models: the separate files ComfyUI users keep (`vae`, `clip_l`, `t5xxl`, named as
sd-scripts names them) and the rectified-flow objective's options (models/flow_matching.py), with sd-scripts'
names and the defaults its FLUX.1 LoRA guide recommends. Mixed into `TrainConfig` (schema.py)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel

from lora_scripts.config.fields import Float, Int, PathValue, field


class FluxKeys(BaseModel):
    vae: PathValue | None = field(
        "model",
        "FLUX.1: the autoencoder file (BFL's ae.safetensors, ComfyUI's models/vae), when base_model is a "
        "single file without one. A diffusers folder has its own; this replaces it.",
        None,
        default_doc="none (the base model's own)",
    )
    clip_l: PathValue | None = field(
        "model",
        "FLUX.1: the CLIP-L text encoder file (ComfyUI's models/clip/clip_l.safetensors), when base_model is "
        "a single file without one.",
        None,
        default_doc="none (the base model's own)",
    )
    t5xxl: PathValue | None = field(
        "model",
        "FLUX.1: the T5-XXL text encoder file (t5xxl_fp16.safetensors or t5xxl_fp8_e4m3fn.safetensors in "
        "ComfyUI's models/clip), when base_model is a single file without one.",
        None,
        default_doc="none (the base model's own)",
    )
    timestep_sampling: Literal["uniform", "sigmoid", "shift", "flux_shift"] = field(
        "loss",
        "FLUX.1: how each step's noise level is drawn (sd-scripts' --timestep_sampling): uniform; sigmoid "
        "(logit-normal, sigmoid_scale wide); shift (the sigmoid draw moved toward noise by "
        "discrete_flow_shift); flux_shift (that shift scaled to the image size, as FLUX.1-dev samples).",
        "shift",
    )
    discrete_flow_shift: Float = field(
        "loss",
        "FLUX.1: the shift of timestep_sampling: shift (sd-scripts' --discrete_flow_shift); larger trains "
        "more at high noise (composition), smaller at low noise (detail).",
        3.1582,
        gt=0,
    )
    sigmoid_scale: Float = field(
        "loss",
        "FLUX.1: the width of the sigmoid-based samplings (sd-scripts' --sigmoid_scale); larger spreads the "
        "noise levels toward both ends.",
        1.0,
        gt=0,
    )
    model_prediction_type: Literal["raw", "additive", "sigma_scaled"] = field(
        "loss",
        "FLUX.1: how the transformer's output is read (sd-scripts' --model_prediction_type): raw (the "
        "velocity noise - image, what FLUX.1 predicts), additive (added to the noisy latents), sigma_scaled "
        "(turned into the clean image it implies and compared with it, diffusers' preconditioning).",
        "raw",
    )
    guidance_scale: Float = field(
        "loss",
        "FLUX.1-dev: the guidance value the guidance-distilled transformer is given while training "
        "(sd-scripts' --guidance_scale); 1.0 as the reference trainers. Ignored for schnell, which has none.",
        1.0,
        ge=0,
    )
    t5xxl_max_token_length: Int | None = field(
        "loss",
        "FLUX.1: T5 tokens each caption is padded or cut to (sd-scripts' --t5xxl_max_token_length).",
        None,
        default_doc="512 for dev, 256 for schnell",
        ge=1,
        le=512,
    )
    blocks_to_swap: Int = field(
        "training",
        "FLUX.1: keep this many transformer blocks' frozen weights on the CPU and bring each to the GPU only "
        "for its forward and its recomputed forward in the backward, the next one copied while the current "
        "one computes (sd-scripts' --blocks_to_swap, same count: N // 2 of the last double blocks and "
        "2 x (N - N // 2) of the last single blocks; FLUX.1 has 19 and 38). Each unit saves ~0.6 GiB of "
        "bf16 weights on the GPU for slower steps; needs gradient_checkpointing. 0: all on the GPU.",
        0,
        ge=0,
    )
