"""Read a single-file checkpoint and tell what it is: SD 1.x, 2.x, SDXL base or FLUX.1, epsilon or v-pred.

A single file carries no config, so everything here is inferred from key names and tensor shapes, the same
way AUTOMATIC1111's WebUI and kohya's sd-scripts do it, so a file that works there works here. SD 1.x/2.x
files use the CompVis/LDM layout, SDXL files Stability's sgm layout (the same UNet names, the text encoders
under `conditioner.embedders.N.`), FLUX.1 files Black Forest Labs' layout (`double_blocks.*`, bare in
flux1-dev.safetensors, under `model.diffusion_model.` in ComfyUI's all-in-one checkpoints); every other
family is named in a one-sentence refusal.
"""

from __future__ import annotations

import logging
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors import safe_open

from lora_scripts.errors import UserError

SDVersion = Literal["sd_v1", "sd_v2"]
# What a single file can be loaded as: an SD 1.x/2.x version, an SDXL base model or FLUX.1 (dev or schnell).
ModelVersion = Literal["sd_v1", "sd_v2", "sdxl", "flux1"]
# How messages and reports name each version.
VERSION_NAMES: dict[str, str] = {"sd_v1": "SD 1.x", "sd_v2": "SD 2.x", "sdxl": "SDXL", "flux1": "FLUX.1"}
PredictionType = Literal["epsilon", "v_prediction"]

LDM_UNET_PREFIX = "model.diffusion_model."
CLIP_PREFIX = "cond_stage_model.transformer."  # SD 1.x: OpenAI CLIP ViT-L/14 stored in transformers' layout
OPEN_CLIP_PREFIX = "cond_stage_model.model."  # SD 2.x: OpenCLIP ViT-H/14 stored in open_clip's layout
SGM_PREFIX = "conditioner.embedders."  # SDXL (base and refiner): the text encoders, numbered
SGM_CLIP_PREFIX = "conditioner.embedders.0.transformer."  # SDXL base: CLIP ViT-L/14, transformers' layout
SGM_OPEN_CLIP_PREFIX = "conditioner.embedders.1.model."  # SDXL base: OpenCLIP ViT-bigG/14, open_clip's layout
SGM_REFINER_PREFIX = "conditioner.embedders.0.model."  # SDXL refiner: OpenCLIP ViT-bigG/14 only
VAE_PREFIX = "first_stage_model."
# FLUX.1 (BFL's layout): the transformer alone has no prefix (flux1-dev.safetensors, .sft, fp8 variants);
# ComfyUI's all-in-one checkpoints keep it under LDM_UNET_PREFIX, the VAE under VAE_PREFIX and the text
# encoders (transformers' layouts) under these two.
FLUX_MARKER = "double_blocks.0.img_attn.qkv.weight"
FLUX_GUIDANCE_KEY = "guidance_in.in_layer.weight"  # FLUX.1-dev's guidance embedding; schnell has none
COMFY_CLIP_L_PREFIX = "text_encoders.clip_l.transformer."
COMFY_T5XXL_PREFIX = "text_encoders.t5xxl.transformer."
# Community v-prediction checkpoints (kohya sd-scripts, NoobAI, ...) mark themselves with an empty tensor.
V_PRED_KEY = "v_pred"
# ... and those trained with zero terminal SNR (NoobAI-XL v-pred) with another; ComfyUI samples them so.
ZTSNR_KEY = "ztsnr"

# The end of every "this family is not supported" sentence; the SDXL family changes it when it lands.
TRAINABLE = "lora-scripts trains SD 1.x, SD 2.x, SDXL and FLUX.1 base models"
# conv_in input channels of the image-conditioned variants that share the text-to-image UNet layout.
_CONDITIONED_VARIANTS = {5: "depth-to-image", 7: "4x upscaler", 8: "instruct-pix2pix", 9: "inpainting"}

logger = logging.getLogger(__name__)


def read_checkpoint(path: Path, key: str = "base_model") -> dict[str, torch.Tensor]:
    """All tensors of a single-file checkpoint, on CPU in their stored dtype (often fp16).

    `.safetensors` is read directly; `.ckpt`/`.pt`/`.pth`/`.bin` only through `torch.load(weights_only=True)`,
    because unpickling anything else can run arbitrary code. A top-level "state_dict" (PyTorch Lightning's
    wrapper, used by the original CompVis checkpoints) is unwrapped; non-tensor entries (global_step, ...)
    are dropped. Messages start with `key` (the option or config key that named the file).
    """
    _refuse_text_file(path, key)
    if path.suffix.lower() == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(path, device="cpu")
        except Exception as err:  # noqa: BLE001 - safetensors raises its own error type for every problem
            raise UserError(
                f"{key}: '{path}' is not a readable .safetensors file ({err}); it may be truncated or "
                "corrupt, so download it again."
            ) from err
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "Weights only load failed" in str(err):
            raise UserError(
                f"{key}: '{path}' contains pickled Python objects besides tensors, which are refused "
                "because loading them can run arbitrary code; use the .safetensors release of this model or "
                "convert the file to .safetensors with a tool you trust."
            ) from err
        raise UserError(f"{key}: '{path}' is not a readable PyTorch checkpoint ({err}).") from err
    except Exception as err:  # noqa: BLE001 - zip/EOF/IO errors all mean "this file is damaged"
        raise UserError(
            f"{key}: '{path}' is not a readable PyTorch checkpoint ({type(err).__name__}: {err}); it "
            "may be truncated or corrupt, so download it again."
        ) from err
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise UserError(f"{key}: '{path}' does not hold a state dict (found {type(obj).__name__}).")
    return {key: value for key, value in obj.items() if isinstance(value, torch.Tensor)}


def _refuse_text_file(path: Path, key: str = "base_model") -> None:
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
            f"{key}: '{path}' is a text file (it starts with '{first}'), not a checkpoint; a failed "
            "download or a Git LFS pointer leaves such a file, so download the model again."
        )


def detect_sd_version(state_dict: dict[str, Any], path: Path) -> SDVersion:
    """SD 1.x or 2.x, what the SD 1.x/2.x loader reads; SDXL and anything else is refused with one sentence.

    `state_dict` values need only a `.shape` (the check command passes a safetensors header's shapes).
    """
    version = detect_model_version(state_dict, path)
    if version == "sdxl":
        raise UserError(
            f"base_model: '{path}' is an SDXL checkpoint, not an SD 1.x/2.x one; load it as SDXL "
            "(models/registry.py load_family does)."
        )
    if version == "flux1":
        raise UserError(
            f"base_model: '{path}' is a FLUX.1 checkpoint, not an SD 1.x/2.x one; load it as FLUX.1 "
            "(models/flux_loading.py load_flux_components does)."
        )
    return version


def detect_unet_model_version(state_dict: dict[str, Any], path: Path, key: str) -> ModelVersion:
    """detect_model_version for the tools that work on UNet models only (merge, extract): a FLUX.1 file is
    refused with one sentence naming `key`. Values need only a `.shape`."""
    version = detect_model_version(state_dict, path, key)
    if version == "flux1":
        raise UserError(
            f"{key}: '{path}' is a FLUX.1 checkpoint; this tool works on SD 1.x, SD 2.x and SDXL checkpoints "
            "only so far."
        )
    return version


def detect_model_version(state_dict: dict[str, Any], path: Path, key: str = "base_model") -> ModelVersion:
    """SD 1.x, 2.x or SDXL base from the text encoders' layout, or "flux1" for a FLUX.1 transformer (alone or
    in a ComfyUI all-in-one file); anything else is refused with one sentence.

    The text encoders are the reliable signal: SD 2.x replaced CLIP with OpenCLIP, whose weights keep
    open_clip's names (`cond_stage_model.model.*`), and SDXL's sgm layout keeps them under
    `conditioner.embedders.*`. The UNet's cross-attention width (768 / 1024 / 2048) is checked separately
    against the config in use, so a non-standard (e.g. tiny test) architecture can still load. Values need
    only a `.shape`. Messages start with `key`, the option or config key that named the file.
    """
    keys = state_dict.keys()
    if any(k.startswith("lora_") or ".lora_down." in k for k in keys):
        raise UserError(
            f"{key}: '{path}' is a LoRA, not a base model; point {key} at the Stable Diffusion "
            "checkpoint the LoRA was trained on."
        )
    if flux_prefix(keys) is not None:
        _refuse_conditioned_flux(state_dict, path, key)
        return "flux1"
    other = _other_family(keys)
    if other is not None:
        raise UserError(
            f"{key}: '{path}' is {other}; {TRAINABLE}, and other model families are not supported yet."
        )
    is_sgm = _has(keys, SGM_PREFIX)
    if is_sgm and not _has(keys, SGM_PREFIX + "1.") and _has(keys, SGM_REFINER_PREFIX):
        raise UserError(
            f"{key}: '{path}' is an SDXL refiner checkpoint, which is not supported yet; {TRAINABLE}."
        )
    if not is_sgm and not _has(keys, LDM_UNET_PREFIX + "input_blocks."):
        raise UserError(
            f"{key}: '{path}' is not a Stable Diffusion 1.x/2.x or SDXL checkpoint (it has no "
            f"'{LDM_UNET_PREFIX}input_blocks.*' UNet weights); other model families are not supported yet."
        )
    if is_sgm:
        version: ModelVersion | None = "sdxl"
    elif _has(keys, OPEN_CLIP_PREFIX):
        version = "sd_v2"
    elif _has(keys, CLIP_PREFIX):
        version = "sd_v1"
    else:
        version = None
    _refuse_conditioned_variant(state_dict, path, version, key)
    if version is None:
        raise UserError(
            f"{key}: '{path}' has no text encoder weights ('cond_stage_model.*'); use a full SD 1.x/2.x "
            "checkpoint, not a UNet-only file."
        )
    return version


def _has(keys: Any, prefix: str) -> bool:
    return any(k.startswith(prefix) for k in keys)


def flux_prefix(keys: Any) -> str | None:
    """ "" for a bare FLUX.1 transformer (BFL's layout), LDM_UNET_PREFIX for a ComfyUI all-in-one file, None
    for anything else (FLUX.2 and Chroma share FLUX.1's block names but not its per-block modulation)."""
    for prefix in ("", LDM_UNET_PREFIX):
        if (
            prefix + FLUX_MARKER in keys
            and prefix + "double_blocks.0.img_mod.lin.weight" in keys
            and prefix + "vector_in.in_layer.weight" in keys
        ):
            return prefix
    return None


def flux_variant(state_dict: dict[str, Any]) -> Literal["dev", "schnell"]:
    """ "dev" when the FLUX.1 transformer has the guidance embedding (`guidance_in.*`, guidance-distilled
    FLUX.1-dev and its fine-tunes), else "schnell". Reads key names only (a header's will do)."""
    return "dev" if any(p + FLUX_GUIDANCE_KEY in state_dict for p in ("", LDM_UNET_PREFIX)) else "schnell"


def _refuse_conditioned_flux(state_dict: dict[str, Any], path: Path, key: str) -> None:
    """FLUX.1 Fill (384 input channels) and Depth/Canny (128): image-conditioned, not text-to-image."""
    img_in = state_dict.get(flux_prefix(state_dict.keys()) + "img_in.weight")
    if img_in is None or len(img_in.shape) != 2 or img_in.shape[1] == 64:
        return
    channels = int(img_in.shape[1])
    what = {384: "FLUX.1 Fill", 128: "FLUX.1 Depth or Canny"}.get(channels, "image-conditioned FLUX.1")
    raise UserError(
        f"{key}: '{path}' is a {what} model ({channels}-channel transformer input), which is not supported "
        "yet; lora-scripts trains text-to-image models, so use FLUX.1-dev or FLUX.1-schnell."
    )


def _other_family(keys: Any) -> str | None:
    """'a FLUX.2 checkpoint' etc. for the diffusion transformers users most often mistake for SD or FLUX.1
    (detect_model_version accepts FLUX.1 before asking), else None."""
    for prefix in ("", LDM_UNET_PREFIX):
        if _has(keys, prefix + "single_stream_modulation.") or _has(
            keys, prefix + "early_stream_modulations."
        ):
            return "a FLUX.2 checkpoint"
        if _has(keys, prefix + "distilled_guidance_layer."):
            return "a Chroma checkpoint"
        if _has(keys, prefix + "joint_blocks."):
            return "a Stable Diffusion 3 checkpoint"
        if _has(keys, prefix + "double_blocks.") or _has(keys, prefix + "single_blocks."):
            return "a FLUX checkpoint"
    return None


def _refuse_conditioned_variant(
    state_dict: dict[str, Any], path: Path, version: ModelVersion | None, key: str
) -> None:
    """Inpainting, instruct-pix2pix, ...: a UNet whose conv_in takes image channels besides the 4 latents."""
    conv_in = state_dict.get(LDM_UNET_PREFIX + "input_blocks.0.0.weight")
    if conv_in is None or len(conv_in.shape) != 4 or conv_in.shape[1] == 4:
        return  # (only a real [out, in, 3, 3] conv tells the channel count)
    channels = int(conv_in.shape[1])
    family = VERSION_NAMES.get(version or "", "")
    what = " ".join(part for part in (family, _CONDITIONED_VARIANTS.get(channels, ""), "model") if part)
    article = "a" if what[0] in "d4m" else "an"  # a depth-/4x/model; an SD/SDXL/inpainting/instruct-pix2pix
    raise UserError(
        f"{key}: '{path}' is {article} {what} ({channels}-channel UNet input), which is not supported "
        f"yet; lora-scripts trains text-to-image models, so use the plain {family or 'text-to-image'} "
        "checkpoint."
    )


def unet_context_dim(state_dict: dict[str, torch.Tensor]) -> int | None:
    """Width of the text embeddings the UNet cross-attends to (SD 1.x 768, 2.x 1024, SDXL 2048) if known."""
    for key, value in state_dict.items():
        if key.startswith(LDM_UNET_PREFIX) and key.endswith("attn2.to_k.weight"):
            return int(value.shape[1])
    return None


def has_v_pred_key(state_dict: dict[str, torch.Tensor]) -> bool:
    """True when the file marks itself as v-prediction (a `v_pred` key, as kohya sd-scripts writes)."""
    return V_PRED_KEY in state_dict


def has_ztsnr_key(state_dict: dict[str, Any]) -> bool:
    """True when the file marks itself as trained with zero terminal SNR (a `ztsnr` key, as NoobAI-XL v-pred
    files have; ComfyUI's model detection reads it). Values need no more than a header's."""
    return ZTSNR_KEY in state_dict


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


@dataclass(frozen=True)
class _Shape:
    """Stands in for a tensor where only its shape is read (detect_model_version looks at conv_in's)."""

    shape: tuple[int, ...]


def checkpoint_shapes(path: Path) -> dict[str, Any]:
    """Key -> object with `.shape` of a single-file checkpoint.

    For .safetensors only the header is read (names and shapes), so a 4 GB file costs milliseconds. A
    .ckpt has no such header: one in PyTorch's zip format is memory-mapped (its tensors are not read), an
    older one is read whole. Anything unreadable goes to read_checkpoint, which words every error.
    """
    if path.suffix.lower() == ".safetensors":
        try:
            with safe_open(path, framework="pt") as handle:
                return {key: _Shape(tuple(handle.get_slice(key).get_shape())) for key in handle.keys()}
        except Exception:  # noqa: BLE001 - unreadable: read_checkpoint raises the loader's UserError for it
            pass
    else:
        mapped = _mapped_checkpoint(path)
        if mapped is not None:
            return mapped
    return dict(read_checkpoint(path))


def _mapped_checkpoint(path: Path) -> dict[str, Any] | None:
    """The tensors of a zip-format checkpoint, memory-mapped (weights_only, as read_checkpoint loads it);
    None when it is not one, or not a dict of tensors."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - an old format, a text file, pickled objects: read_checkpoint says which
        return None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        return None
    return {key: value for key, value in obj.items() if isinstance(value, torch.Tensor)}
