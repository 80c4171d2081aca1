"""Apply LoRA files to a diffusers StableDiffusionPipeline, each at its own text-encoder and UNet weight.

diffusers does the work (`load_lora_weights` injects peft layers, `set_adapters` sets each adapter's scale),
but kohya/sd-scripts files (ours, sd-scripts', LoCon) are first converted here, by the pipeline's own module
names, the way WebUI and ComfyUI match them. diffusers' own kohya conversion (0.42, transformers 5) fails on
text-encoder LoRAs in two ways this avoids:
- a text-encoder LoRA without `out_proj` keys (e.g. one trained on q_proj/v_proj only) raises "Could not
  automatically infer state dict type";
- per-module alphas in the text encoder (an sd-scripts MLP alpha that differs from the attention alpha)
  are dropped with a warning, so those layers get the wrong scale.
Diffusers/PEFT-format files (`unet.<path>.lora_A.weight`, alphas in their metadata) are read the same way
(export/lora_reader.py); a layout only diffusers knows (attention processors, DoRA) goes to it unchanged.
The conversion folds each module's `alpha / rank` into `lora_up`, so peft's own scale is exactly 1 and the
applied update is `w * (alpha / rank) * up @ down`. The UNet part goes to diffusers; the text-encoder part is
attached through peft itself (`models.lora.attach_lora_weights`), not transformers' `load_adapter`, which
prints a load report per LoRA and, like its `add_adapter`, may refuse a peft release.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline

from lora_scripts.errors import UserError
from lora_scripts.export.kohya import LoraNetwork, clip_name_prefix
from lora_scripts.export.lora_reader import (
    UNSUPPORTED_SUFFIXES,
    FileModule,
    ModuleRef,
    file_modules,
    module_index,
    read_lora_tensors,
    split_key,
)
from lora_scripts.models.lora import attach_lora_weights, detach_lora

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoadedLora:
    """A LoRA loaded into a pipeline under `adapter` (a peft adapter name), touching `components`."""

    adapter: str
    path: Path
    components: frozenset[str]  # "unet" and/or "text_encoder"


def load_lora(
    pipe: StableDiffusionPipeline, path: Path, adapter: str, label: str | None = None
) -> LoadedLora:
    """Load the LoRA file at `path` into `pipe` as adapter `adapter` (scale 1 until `set_lora_weights`).

    label: how messages name the LoRA (the tag's name); default the file name.
    Raises UserError when the file is a format or model family that cannot be applied to this pipeline.
    """
    label = label or path.name
    tensors, metadata = read_lora_tensors(path, f"LoRA '{label}'")
    peft_dict = _folded_peft_dict(tensors, metadata, path, pipe, label)
    text_encoder_weights: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    if peft_dict is None:  # a layout only diffusers knows: it reads it (and its metadata) itself
        source: dict[str, torch.Tensor] | str = str(path)
        expected: set[str] = set()
    else:
        expected = {key.rsplit(".lora_", 1)[0] for key in peft_dict}
        source = {k: v for k, v in peft_dict.items() if k.startswith("unet.")}
        for stem in sorted(
            k.removesuffix(".lora_A.weight") for k in peft_dict if k.endswith(".lora_A.weight")
        ):
            if stem.startswith("text_encoder."):
                pair = (peft_dict[f"{stem}.lora_A.weight"], peft_dict[f"{stem}.lora_B.weight"])
                text_encoder_weights[stem.removeprefix("text_encoder.")] = pair
    try:
        with warnings.catch_warnings():
            # peft warns whenever a model gets a second adapter; several LoRAs at once are the point here.
            warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
            if text_encoder_weights:  # through peft itself, not transformers' load_adapter
                attach_lora_weights(pipe.text_encoder, text_encoder_weights, adapter)
            if isinstance(source, str):
                pipe.load_lora_weights(source, adapter_name=adapter)
            elif source:
                pipe.load_lora_into_unet(source, network_alphas=None, unet=pipe.unet, adapter_name=adapter)
    except (ValueError, KeyError, RuntimeError) as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(
            f"LoRA '{label}': diffusers cannot apply '{path}' to this base model ({first_line})."
        ) from err
    components = frozenset(part for part, names in pipe.get_list_adapters().items() if adapter in names)
    if not components:
        raise UserError(f"LoRA '{label}': '{path}' holds no layer of this base model's UNet or text encoder.")
    if expected:
        _check_every_module_applied(pipe, adapter, expected, label)
    return LoadedLora(adapter=adapter, path=path, components=components)


def set_lora_weights(
    pipe: StableDiffusionPipeline, loras: list[LoadedLora], weights: list[tuple[float, float]]
) -> None:
    """Activate `loras` at `(te_weight, unet_weight)` each; other adapters of the pipeline are deactivated.

    A weight of 0 multiplies the LoRA's output by exactly 0, so the image is the base model's, bit for bit.
    """
    if not loras:
        if pipe.get_list_adapters():
            pipe.disable_lora()
        return
    pipe.enable_lora()
    per_adapter = []
    for lora, (te_weight, unet_weight) in zip(loras, weights, strict=True):
        # Name only the components the adapter has: diffusers warns about the others.
        values = {"text_encoder": te_weight, "unet": unet_weight}
        per_adapter.append({part: values[part] for part in lora.components})
    pipe.set_adapters([lora.adapter for lora in loras], adapter_weights=per_adapter)


def unload_loras(pipe: StableDiffusionPipeline, loras: list[LoadedLora]) -> None:
    """Remove these adapters (and only these) from the pipeline's models."""
    if loras:
        pipe.delete_adapters([lora.adapter for lora in loras])
        for lora in loras:  # attached through peft, so detached through it (see `load_lora`)
            if "text_encoder" in lora.components:
                detach_lora(pipe.text_encoder, lora.adapter)


# --- kohya -> PEFT ------------------------------------------------------------------------------------------


def pipeline_networks(pipe: StableDiffusionPipeline) -> list[LoraNetwork]:
    """The pipeline's models as the networks LoRA files name (`lora_unet`, `lora_te`), for `module_index`.
    `lora_te1` is the same text encoder: a few SD 1.x files use SDXL's first-encoder prefix."""
    prefix = clip_name_prefix(pipe.text_encoder)
    return [
        LoraNetwork("lora_unet", pipe.unet),
        LoraNetwork("lora_te", pipe.text_encoder, prefix),
        LoraNetwork("lora_te1", pipe.text_encoder, prefix),
    ]


def _folded_peft_dict(
    tensors: dict[str, torch.Tensor],
    metadata: dict[str, str],
    path: Path,
    pipe: StableDiffusionPipeline,
    label: str,
) -> dict[str, torch.Tensor] | None:
    """The file as diffusers' PEFT keys (`unet.<path>.lora_A.weight`, `.lora_B.weight`, `text_encoder.…`)
    for this pipeline's modules, fp32, each module's `alpha / rank` folded into lora_B; None for a layout
    only diffusers reads (attention-processor files, DoRA, any key `lora_reader` does not know).

    Kohya names are `<path>` with '.' replaced by '_', which is ambiguous (`to_out_0` vs `to.out.0`), so
    they are matched against the names the models actually have (`module_index`). LoCon conv layers keep
    their shapes: down [rank, in, kh, kw] is lora_A, up [out, rank, 1, 1] is lora_B.
    """
    if any(key.startswith("lora_") for key in tensors):  # kohya / sd-scripts / LyCORIS layout
        for suffix, kind in UNSUPPORTED_SUFFIXES.items():
            if any(key.endswith(suffix) for key in tensors):
                raise UserError(
                    f"LoRA '{label}': {kind} files are not supported (diffusers cannot apply them)."
                )
    elif not all(key.startswith(("unet.", "text_encoder.")) and split_key(key) for key in tensors):
        return None
    index = module_index(pipeline_networks(pipe))
    folded = _Folded()
    for module in file_modules(tensors, metadata, path, f"LoRA '{label}'"):
        folded.add(module, index.get(module.stem))
    return folded.result(label)


class _Folded:
    """PEFT keys collected module by module, with the modules that do not fit this base model."""

    def __init__(self) -> None:
        self.peft: dict[str, torch.Tensor] = {}
        self.missing: list[str] = []
        self.wrong_shape: list[str] = []

    def add(self, module: FileModule, ref: ModuleRef | None) -> None:
        """The file's `module` onto the layer `ref` names, or noted as missing / of another size."""
        if ref is None:
            self.missing.append(module.stem)
            return
        layer = getattr(ref.layer, "base_layer", ref.layer)  # a layer that carries an adapter already
        down, up = module.down.to(torch.float32), module.up.to(torch.float32)
        rank = down.shape[0]
        alpha = rank if module.alpha is None else module.alpha
        if isinstance(layer, torch.nn.Conv2d) and down.dim() == 2:  # a 1x1 conv stored as a matrix
            down, up = down[:, :, None, None], up[:, :, None, None]
        if not _fits(layer, down, up):
            self.wrong_shape.append(module.stem)
            return
        self.peft[f"{ref.component}.{ref.path}.lora_A.weight"] = down
        self.peft[f"{ref.component}.{ref.path}.lora_B.weight"] = up * (alpha / rank)

    def result(self, label: str) -> dict[str, torch.Tensor]:
        if self.missing or self.wrong_shape:
            raise UserError(_mismatch_message(label, self.missing, self.wrong_shape, len(self.peft) // 2))
        return self.peft


def _fits(module: torch.nn.Module, down: torch.Tensor, up: torch.Tensor) -> bool:
    """Whether up @ down has the module weight's shape."""
    weight = module.weight
    if isinstance(module, torch.nn.Conv2d):
        return (
            down.dim() == 4
            and up.dim() == 4
            and down.shape[1] == weight.shape[1]
            and tuple(down.shape[2:]) == tuple(weight.shape[2:])
            and up.shape[0] == weight.shape[0]
            and up.shape[1] == down.shape[0]
        )
    return (
        down.dim() == 2
        and up.dim() == 2
        and down.shape[1] == weight.shape[1]
        and up.shape[0] == weight.shape[0]
    )


def _mismatch_message(label: str, missing: list[str], wrong_shape: list[str], matched: int) -> str:
    total = len(missing) + len(wrong_shape) + matched
    parts = []
    if missing:
        parts.append(
            f"{len(missing)} of its {total} layers do not exist in this base model (e.g. '{missing[0]}')"
        )
    if wrong_shape:
        parts.append(f"{len(wrong_shape)} have another size (e.g. '{wrong_shape[0]}')")
    sdxl = any(name.startswith(("lora_te2_", "lora_te1_", "lora_unet_input_blocks")) for name in missing)
    family = "SDXL" if sdxl else "another model family (SD 1.x vs 2.x?)"
    return f"LoRA '{label}' does not fit this base model: {'; '.join(parts)}; it was made for {family}."


def _check_every_module_applied(
    pipe: StableDiffusionPipeline, adapter: str, expected: set[str], label: str
) -> None:
    """diffusers skips keys it cannot place with a mere warning; a partly applied LoRA must not pass."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    applied = set()
    for component in ("unet", "text_encoder"):
        for name, module in getattr(pipe, component).named_modules():
            if isinstance(module, BaseTunerLayer) and adapter in getattr(module, "lora_A", {}):
                applied.add(f"{component}.{name}")
    if applied != expected:
        missing = sorted(expected - applied)
        raise UserError(
            f"LoRA '{label}': diffusers applied {len(applied & expected)} of its {len(expected)} layers "
            f"(not e.g. '{missing[0] if missing else sorted(applied - expected)[0]}')."
        )
