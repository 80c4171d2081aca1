"""Read a single-file (CompVis/LDM layout) checkpoint and tell what it is: SD 1.x or 2.x, epsilon or v-pred.

A single file carries no config, so everything here is inferred from key names and tensor shapes, the same
way AUTOMATIC1111's WebUI and kohya's sd-scripts do it, so a file that works there works here.
"""

from __future__ import annotations

import logging
import pickle
from pathlib import Path
from typing import Literal

import torch

from lora_scripts.errors import UserError

SDVersion = Literal["sd_v1", "sd_v2"]
PredictionType = Literal["epsilon", "v_prediction"]

LDM_UNET_PREFIX = "model.diffusion_model."
CLIP_PREFIX = "cond_stage_model.transformer."  # SD 1.x: OpenAI CLIP ViT-L/14 stored in transformers' layout
OPEN_CLIP_PREFIX = "cond_stage_model.model."  # SD 2.x: OpenCLIP ViT-H/14 stored in open_clip's layout
# Community v-prediction checkpoints (kohya sd-scripts, NoobAI, ...) mark themselves with an empty tensor.
V_PRED_KEY = "v_pred"

logger = logging.getLogger(__name__)


def read_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a single-file checkpoint, on CPU in their stored dtype (often fp16).

    `.safetensors` is read directly; `.ckpt`/`.pt`/`.pth`/`.bin` only through `torch.load(weights_only=True)`,
    because unpickling anything else can run arbitrary code. A top-level "state_dict" (PyTorch Lightning's
    wrapper, used by the original CompVis checkpoints) is unwrapped; non-tensor entries (global_step, ...)
    are dropped.
    """
    _refuse_text_file(path)
    if path.suffix.lower() == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(path, device="cpu")
        except Exception as err:  # noqa: BLE001 - safetensors raises its own error type for every problem
            raise UserError(
                f"base_model: '{path}' is not a readable .safetensors file ({err}); it may be truncated or "
                "corrupt, so download it again."
            ) from err
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "Weights only load failed" in str(err):
            raise UserError(
                f"base_model: '{path}' contains pickled Python objects besides tensors, which are refused "
                "because loading them can run arbitrary code; use the .safetensors release of this model or "
                "convert the file to .safetensors with a tool you trust."
            ) from err
        raise UserError(f"base_model: '{path}' is not a readable PyTorch checkpoint ({err}).") from err
    except Exception as err:  # noqa: BLE001 - zip/EOF/IO errors all mean "this file is damaged"
        raise UserError(
            f"base_model: '{path}' is not a readable PyTorch checkpoint ({type(err).__name__}: {err}); it "
            "may be truncated or corrupt, so download it again."
        ) from err
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise UserError(f"base_model: '{path}' does not hold a state dict (found {type(obj).__name__}).")
    return {key: value for key, value in obj.items() if isinstance(value, torch.Tensor)}


def _refuse_text_file(path: Path) -> None:
    """A failed download often leaves a text file under the model's name (an HTML error page, a Git LFS
    pointer); say so, rather than quoting the binary reader's error about a header or a zip archive."""
    with open(path, "rb") as fh:
        head = fh.read(256)
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return  # binary: a checkpoint, or damaged in a way the readers below describe
    if head and all(ch.isprintable() or ch in "\r\n\t" for ch in text):
        first = text.strip().splitlines()[0][:60] if text.strip() else ""
        raise UserError(
            f"base_model: '{path}' is a text file (it starts with '{first}'), not a checkpoint; a failed "
            "download or a Git LFS pointer leaves such a file, so download the model again."
        )


def detect_sd_version(state_dict: dict[str, torch.Tensor], path: Path) -> SDVersion:
    """SD 1.x or 2.x from the text encoder's layout; anything else is refused with one sentence.

    The text encoder is the reliable signal: SD 2.x replaced CLIP with OpenCLIP, whose weights keep
    open_clip's names (`cond_stage_model.model.*`). The UNet's cross-attention width (768 vs 1024) is checked
    separately against the config in use, so a non-standard (e.g. tiny test) architecture can still load.
    """
    keys = state_dict.keys()
    if any(k.startswith("conditioner.embedders.") for k in keys):
        raise UserError(
            f"base_model: '{path}' is an SDXL checkpoint, which is not supported yet; use an SD 1.x or 2.x "
            "model."
        )
    if any(k.startswith("lora_") or ".lora_down." in k for k in keys):
        raise UserError(
            f"base_model: '{path}' is a LoRA, not a base model; point base_model at the Stable Diffusion "
            "checkpoint the LoRA was trained on."
        )
    if not any(k.startswith(LDM_UNET_PREFIX + "input_blocks.") for k in keys):
        raise UserError(
            f"base_model: '{path}' is not a Stable Diffusion 1.x/2.x checkpoint (it has no "
            f"'{LDM_UNET_PREFIX}input_blocks.*' UNet weights); other model families are not supported yet."
        )
    conv_in = state_dict.get(LDM_UNET_PREFIX + "input_blocks.0.0.weight")
    if conv_in is not None and conv_in.shape[1] != 4:
        raise UserError(
            f"base_model: '{path}' has a {conv_in.shape[1]}-channel UNet input (an inpainting or "
            "instruct-pix2pix model), which is not supported yet; use the plain text-to-image checkpoint."
        )
    if any(k.startswith(OPEN_CLIP_PREFIX) for k in keys):
        return "sd_v2"
    if any(k.startswith(CLIP_PREFIX) for k in keys):
        return "sd_v1"
    raise UserError(
        f"base_model: '{path}' has no text encoder weights ('cond_stage_model.*'); use a full SD 1.x/2.x "
        "checkpoint, not a UNet-only file."
    )


def unet_context_dim(state_dict: dict[str, torch.Tensor]) -> int | None:
    """Width of the text embeddings the UNet cross-attends to (768 for SD 1.x, 1024 for SD 2.x) if known."""
    for key, value in state_dict.items():
        if key.startswith(LDM_UNET_PREFIX) and key.endswith("attn2.to_k.weight"):
            return int(value.shape[1])
    return None


def has_v_pred_key(state_dict: dict[str, torch.Tensor]) -> bool:
    """True when the file marks itself as v-prediction (a `v_pred` key, as kohya sd-scripts writes)."""
    return V_PRED_KEY in state_dict


@torch.no_grad()
def is_v_prediction_unet(unet: torch.nn.Module, *, context_dim: int = 1024) -> bool:
    """AUTOMATIC1111's test for SD 2.x v-models: one UNet call on a constant input at t=999.

    At the last timestep an epsilon model predicts noise close to its input (mean(out - x) ~ 0), while a
    v-model predicts v = alpha*eps - sigma*x0, which is far below x there; WebUI uses the threshold -1 and so
    do we, so both agree on every checkpoint. `unet` must be a diffusers UNet2DConditionModel (or anything
    with the same call signature returning a tuple when `return_dict=False`).
    """
    parameter = next(unet.parameters(), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    dtype = parameter.dtype if parameter is not None else torch.float32
    x = torch.full((1, 4, 8, 8), 0.5, device=device, dtype=dtype)
    context = torch.full((1, 2, context_dim), 0.5, device=device, dtype=dtype)
    timestep = torch.tensor([999], device=device)
    out = unet(x, timestep, encoder_hidden_states=context, return_dict=False)[0]
    score = (out.float() - x.float()).mean().item()
    logger.debug("v-prediction heuristic: mean(out - x) = %.3f (v-model below -1)", score)
    return score < -1
