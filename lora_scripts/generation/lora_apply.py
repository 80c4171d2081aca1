"""Apply LoRA files to a diffusers StableDiffusionPipeline or StableDiffusionXLPipeline, each at its own
text-encoder and UNet weight.

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
applied update is `w * (alpha / rank) * up @ down`. The UNet part goes to diffusers; the text-encoder part
(SDXL: both encoders) is attached through peft itself (`models.lora.attach_lora_weights`), not transformers'
`load_adapter`, which prints a load report per LoRA and, like its `add_adapter`, may refuse a peft release.
LyCORIS LoHa / LoKr and DoRA files (kohya layout) are resolved the same way but patched into the layers'
weights instead, as A1111 and ComfyUI apply them (generation/weight_patch.py); `set_lora_weights` and
`unload_loras` handle both kinds alike.
SDXL files name the UNet by sgm paths (sd-scripts', ours) or diffusers paths, the encoders `lora_te1_` /
`lora_te2_`; a file made for the other family (SD 1.x/2.x vs SDXL) is refused with one sentence.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from diffusers import DiffusionPipeline

from lora_scripts.errors import UserError
from lora_scripts.export.kohya import LoraNetwork
from lora_scripts.export.lora_model import LoraModule, Resolution, resolve_modules
from lora_scripts.export.lora_reader import (
    FLUX_FAMILY,
    SD_FAMILY,
    SDXL_FAMILY,
    file_modules,
    lora_family,
    module_index,
    read_lora_tensors,
    split_key,
)
from lora_scripts.export.lycoris import TYPE_NAMES, UNSUPPORTED_SUFFIXES
from lora_scripts.generation.weight_patch import (
    LayerPatch,
    module_on,
    patch_weights,
    patchable,
    restore_layers,
)
from lora_scripts.models.lora import attach_lora_weights, detach_lora
from lora_scripts.models.registry import FAMILIES

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoadedLora:
    """A LoRA loaded into a pipeline under `adapter` (a peft adapter name), touching `components`; a LoHa,
    LoKr or DoRA file has no peft adapter but `patches`, the layers whose weights it changes."""

    adapter: str
    path: Path
    components: frozenset[str]  # "unet", "text_encoder" and (SDXL) "text_encoder_2", those it touches
    patches: tuple[LayerPatch, ...] = field(default=(), compare=False)


def load_lora(pipe: DiffusionPipeline, path: Path, adapter: str, label: str | None = None) -> LoadedLora:
    """Load the LoRA file at `path` into `pipe` as adapter `adapter` (scale 1 until `set_lora_weights`).

    label: how messages name the LoRA (the tag's name); default the file name.
    A LyCORIS LoHa / LoKr or DoRA file is not loaded into peft: its layers are patched by `set_lora_weights`.
    Raises UserError when the file is a format or model family that cannot be applied to this pipeline.
    """
    label = label or path.name
    tensors, metadata = read_lora_tensors(path, f"LoRA '{label}'")
    check_family(label, path, tensors, metadata, pipeline_family(pipe))
    modules = _resolved_modules(tensors, metadata, path, pipe, label)
    if modules is not None and not all(module.plain for module in modules):
        return _patched_lora(pipe, modules, path, adapter, label)
    peft_dict = None if modules is None else _folded_peft_dict(modules, pipe)
    # text encoder component → module path → (lora_A, lora_B)
    text_encoder_weights: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}
    if peft_dict is None:  # a layout only diffusers knows: it reads it (and its metadata) itself
        source: dict[str, torch.Tensor] | str = str(path)
        expected: set[str] = set()
    else:
        expected = {key.rsplit(".lora_", 1)[0] for key in peft_dict}
        source = {k: v for k, v in peft_dict.items() if k.startswith(tuple(f"{d}." for d in DENOISERS))}
        for stem in sorted(
            k.removesuffix(".lora_A.weight") for k in peft_dict if k.endswith(".lora_A.weight")
        ):
            component, _, module_path = stem.partition(".")
            if component not in DENOISERS:
                pair = (peft_dict[f"{stem}.lora_A.weight"], peft_dict[f"{stem}.lora_B.weight"])
                text_encoder_weights.setdefault(component, {})[module_path] = pair
    try:
        with warnings.catch_warnings():
            # peft warns whenever a model gets a second adapter; several LoRAs at once are the point here.
            warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
            for component, weights in text_encoder_weights.items():  # through peft, not load_adapter
                attach_lora_weights(getattr(pipe, component), weights, adapter)
            if isinstance(source, str):
                pipe.load_lora_weights(source, adapter_name=adapter)
            elif source and getattr(pipe, "transformer", None) is not None:  # FLUX.1
                pipe.load_lora_into_transformer(
                    source, network_alphas=None, transformer=pipe.transformer, adapter_name=adapter
                )
            elif source:
                pipe.load_lora_into_unet(source, network_alphas=None, unet=pipe.unet, adapter_name=adapter)
    except (ValueError, KeyError, RuntimeError) as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(
            f"LoRA '{label}': diffusers cannot apply '{path}' to this base model ({first_line})."
        ) from err
    components = frozenset(part for part, names in pipe.get_list_adapters().items() if adapter in names)
    if not components:
        raise UserError(
            f"LoRA '{label}': '{path}' holds no layer of this base model's UNet or text encoders."
        )
    if expected:
        _check_every_module_applied(pipe, adapter, expected, label)
    return LoadedLora(adapter=adapter, path=path, components=components)


def check_family(label: str, path: Path, keys: Iterable[str], metadata: dict[str, str], base: str) -> None:
    """UserError, one sentence naming the file and both families, when its metadata or names say it was made
    for another family than `base` (SD_FAMILY or SDXL_FAMILY); a file that does not tell passes."""
    made_for = lora_family(keys, metadata)
    if made_for is not None and made_for != base:
        raise UserError(_family_message(label, path, made_for, base))


def set_lora_weights(
    pipe: DiffusionPipeline, loras: list[LoadedLora], weights: list[tuple[float, float]]
) -> None:
    """Activate `loras` at `(te_weight, unet_weight)` each; other adapters of the pipeline are deactivated.

    A weight of 0 multiplies the LoRA's output by exactly 0, so the image is the base model's, bit for bit.
    LoHa / LoKr / DoRA files patch their layers again from the original weights (weight 0: the original).
    """
    pairs = list(zip(loras, weights, strict=True))
    patch_weights(pipe, [(lora.patches, te, unet) for lora, (te, unet) in pairs if lora.patches])
    pairs = [(lora, weight) for lora, weight in pairs if not lora.patches]
    if not pairs:
        if pipe.get_list_adapters():
            pipe.disable_lora()
        return
    pipe.enable_lora()
    per_adapter = []
    for lora, (te_weight, unet_weight) in pairs:
        # Name only the components the adapter has: diffusers warns about the others.
        values = {
            "text_encoder": te_weight,
            "text_encoder_2": te_weight,
            "unet": unet_weight,
            "transformer": unet_weight,
        }
        per_adapter.append({part: values[part] for part in lora.components})
    pipe.set_adapters([lora.adapter for lora, _ in pairs], adapter_weights=per_adapter)


def unload_loras(pipe: DiffusionPipeline, loras: list[LoadedLora]) -> None:
    """Remove these adapters (and only these) from the pipeline's models; the layers a LoHa / LoKr / DoRA
    file patched get their original weights back, bit for bit (another such file still loaded on one of
    them applies again at the next `set_lora_weights`)."""
    restore_layers(pipe, [patch.layer for lora in loras for patch in lora.patches])
    adapters = [lora for lora in loras if not lora.patches]
    if adapters:
        pipe.delete_adapters([lora.adapter for lora in adapters])
        for lora in adapters:  # attached through peft, so detached through it (see `load_lora`)
            for component in lora.components - set(DENOISERS):
                detach_lora(getattr(pipe, component), lora.adapter)


# --- kohya -> PEFT ------------------------------------------------------------------------------------------


# The pipeline's denoiser component: the UNet, or FLUX.1's transformer.
DENOISERS = ("unet", "transformer")


def pipeline_family(pipe: DiffusionPipeline) -> str:
    """FLUX_FAMILY for a pipeline with a transformer (FluxPipeline), SDXL_FAMILY for one with a second text
    encoder (StableDiffusionXLPipeline), else SD_FAMILY."""
    if getattr(pipe, "transformer", None) is not None:
        return FLUX_FAMILY
    return SDXL_FAMILY if getattr(pipe, "text_encoder_2", None) is not None else SD_FAMILY


_VERSION_OF = {SD_FAMILY: "sd_v1", SDXL_FAMILY: "sdxl", FLUX_FAMILY: "flux1"}  # SD 1.x and 2.x name alike


def pipeline_networks(pipe: DiffusionPipeline) -> list[LoraNetwork]:
    """The pipeline's models as the networks LoRA files name (its family's `file_networks`)."""
    family = FAMILIES[_VERSION_OF[pipeline_family(pipe)]]
    encoders = [getattr(pipe, part) for part in family.text_encoder_parts]
    return family.file_networks(getattr(pipe, family.denoiser_part), encoders)


def _resolved_modules(
    tensors: dict[str, torch.Tensor],
    metadata: dict[str, str],
    path: Path,
    pipe: DiffusionPipeline,
    label: str,
) -> list[LoraModule] | None:
    """The file's modules on this pipeline's live modules; None for a layout only diffusers reads
    (attention-processor files, peft DoRA, any key `lora_reader` does not know). Layers that do not fit raise
    UserError: the family sentence when the names tell another family.

    The file's modules are resolved on the pipeline's live modules (export/lora_model.py), so kohya's
    ambiguous underscores (`to_out_0` vs `to.out.0`) match the names the models really have.
    """
    if any(key.startswith("lora_") for key in tensors):  # kohya / sd-scripts / LyCORIS layout
        for suffix, kind in UNSUPPORTED_SUFFIXES.items():
            if any(key.endswith(suffix) for key in tensors):
                raise UserError(
                    f"LoRA '{label}': {kind} files are not supported (generate applies LoRA, LoCon, "
                    "LoHa, LoKr and DoRA files)."
                )
    elif not all(
        key.startswith(("unet.", "transformer.", "text_encoder.", "text_encoder_2.")) and split_key(key)
        for key in tensors
    ):
        return None
    base = pipeline_family(pipe)
    in_file = file_modules(tensors, metadata, path, f"LoRA '{label}'")
    lycoris = next((m for m in in_file if m.factors or m.dora_scale is not None), None)
    if lycoris is not None and base == FLUX_FAMILY:  # its fused layers take only a plain LoRA's split
        kind = "dora" if lycoris.dora_scale is not None else lycoris.kind
        raise UserError(
            f"LoRA '{label}': {_type_name(kind)} files are not supported on a FLUX.1 base model "
            "(only LoRA files are)."
        )
    found = resolve_modules(in_file, module_index(pipeline_networks(pipe)))
    if not found.complete:
        made_for = lora_family(tensors, metadata, guess=True)
        if made_for is not None and made_for != base:
            raise UserError(_family_message(label, path, made_for, base))
        raise UserError(_mismatch_message(label, found, base))
    return found.modules


def _folded_peft_dict(modules: list[LoraModule], pipe: DiffusionPipeline) -> dict[str, torch.Tensor]:
    """Plain LoRA modules as diffusers' PEFT keys (`unet.<path>.lora_A.weight`, `.lora_B.weight`,
    `text_encoder.…`, `text_encoder_2.…`) for this pipeline's modules, fp32, each module's `alpha / rank`
    folded into lora_B. LoCon conv layers keep their shapes: down [rank, in, kh, kw] is lora_A, up
    [out, rank, 1, 1] is lora_B.
    """
    peft: dict[str, torch.Tensor] = {}
    live_path = _live_paths(pipe)
    for module in modules:
        live = live_path(module)
        down, up = module.down.to(torch.float32), module.up.to(torch.float32)
        peft[f"{module.component}.{live}.lora_A.weight"] = down
        peft[f"{module.component}.{live}.lora_B.weight"] = up * module.scale
    return peft


def _patched_lora(
    pipe: DiffusionPipeline, modules: list[LoraModule], path: Path, adapter: str, label: str
) -> LoadedLora:
    """A LoHa / LoKr / DoRA file's modules on the live layers they patch (weight_patch.py); nothing changes
    until `set_lora_weights`."""
    patches = []
    live_path = _live_paths(pipe)
    network_type = next(module.network_type for module in modules if not module.plain)
    for module in modules:
        layer = getattr(pipe, module.component).get_submodule(live_path(module))
        layer = getattr(layer, "base_layer", layer)  # under a plain LoRA's peft wrapper
        if not patchable(layer):
            raise UserError(
                f"LoRA '{label}': {_type_name(network_type)} files are applied to the base "
                f"model's weights, and '{module.name}' is quantized or offloaded in this pipeline; load the "
                "base model in fp32, fp16 or bf16 without offloading."
            )
        patches.append(LayerPatch(layer, module_on(module, layer.weight.device)))
    if not patches:
        raise UserError(
            f"LoRA '{label}': '{path}' holds no layer of this base model's UNet or text encoders."
        )
    components = frozenset(module.component for module in modules)
    return LoadedLora(adapter=adapter, path=path, components=components, patches=tuple(patches))


def _live_paths(pipe: DiffusionPipeline) -> Callable[[LoraModule], str]:
    """A module's path inside its pipeline component (a CLIP path without the `text_model.` that
    transformers 5's models lack, see `clip_name_prefix`)."""
    prefixes = {net.module: net.name_prefix for net in pipeline_networks(pipe)}

    def live_path(module: LoraModule) -> str:
        return module.path.removeprefix(prefixes[getattr(pipe, module.component)])

    return live_path


def _type_name(network_type: str) -> str:
    name = TYPE_NAMES.get(network_type, network_type)
    return f"LyCORIS {name}" if network_type in ("loha", "lokr") else name


def _family_message(label: str, path: Path, made_for: str, base: str) -> str:
    return (
        f"LoRA '{label}' ('{path}') was made for {made_for} but the base model is {base}; use it with an "
        f"{made_for} base model, or use a LoRA made for {base}."
    )


def _mismatch_message(label: str, found: Resolution, base: str) -> str:
    missing, wrong_shape = found.missing, found.wrong_shape
    total = len(missing) + len(wrong_shape) + len(found.modules)
    parts = []
    if missing:
        parts.append(
            f"{len(missing)} of its {total} layers do not exist in this base model (e.g. '{missing[0]}')"
        )
    if wrong_shape:
        parts.append(f"{len(wrong_shape)} have another size (e.g. '{wrong_shape[0]}')")
    other = "another model family (SD 1.x vs 2.x?)" if base == SD_FAMILY else "another base model"
    return f"LoRA '{label}' does not fit this base model: {'; '.join(parts)}; it was made for {other}."


def _check_every_module_applied(
    pipe: DiffusionPipeline, adapter: str, expected: set[str], label: str
) -> None:
    """diffusers skips keys it cannot place with a mere warning; a partly applied LoRA must not pass."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    applied = set()
    for component in (*DENOISERS, "text_encoder", "text_encoder_2"):
        model = getattr(pipe, component, None)
        for name, module in model.named_modules() if model is not None else ():
            if isinstance(module, BaseTunerLayer) and adapter in getattr(module, "lora_A", {}):
                applied.add(f"{component}.{name}")
    if applied != expected:
        missing = sorted(expected - applied)
        raise UserError(
            f"LoRA '{label}': diffusers applied {len(applied & expected)} of its {len(expected)} layers "
            f"(not e.g. '{missing[0] if missing else sorted(applied - expected)[0]}')."
        )
