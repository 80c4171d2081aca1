"""`network_weights`: start training from an existing LoRA file's weights (sd-scripts' option of that name).

Reads kohya files (ours, sd-scripts', LoCon with 4-D conv weights; text-encoder keys `lora_te_text_model_…` or
without `text_model_`) and diffusers/peft files (`unet.<path>.lora_A.weight`, `text_encoder.<path>…`, the
older `….lora.down.weight` too). Each module's down goes to lora_A and its up to lora_B, rescaled so that the
update is the file's: sd-scripts' `(alpha_file / rank_file) * up @ down`, where peft multiplies lora_B by its
own `alpha / rank`. A missing alpha means alpha = rank, as in kohya's loader (and diffusers without metadata).

LyCORIS files continue a run of their own network_type: a LoHa's or LoKr's tensors go to peft's parameters of
the same names (the first factor rescaled so that the update is the file's, export/lycoris.py), a DoRA file's
dora_scale to the layer's magnitude (models/dora.py).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from peft.tuners.lora import LoraLayer
from peft.tuners.lycoris_utils import LycorisLayer

from lora_scripts.errors import UserError
from lora_scripts.export.kohya import DORA_PARAMETER, LoraNetwork, lora_layers
from lora_scripts.export.lora_reader import (
    FileModule,
    ModuleRef,
    file_modules,
    module_index,
    read_lora_tensors,
)
from lora_scripts.export.lycoris import TYPE_NAMES, factor_kind, factors_rank, factors_scale, factors_shape

log = logging.getLogger(__name__)

_MAX_LISTED = 5


@dataclass(frozen=True)
class ImportReport:
    """loaded: modules copied from the file; rescaled: of those, how many had another alpha/rank than ours
    (lora_B rescaled); not_in_file: our adapted modules the file lacks (they keep their fresh init)."""

    loaded: int
    rescaled: int
    not_in_file: int


def load_network_weights(
    networks: list[LoraNetwork], path: Path, *, key: str = "network_weights"
) -> ImportReport:
    """Copy the LoRA file at `path` into the adapters of `networks` (in place, no grad), so training continues
    from it. Raises UserError (one sentence per problem, naming `key`) for an unreadable or unsupported file,
    a file for another base model, and ranks or targets that differ from this run's."""
    tensors, metadata = read_lora_tensors(path, key)
    modules = file_modules(tensors, metadata, path, key)
    weighted = next((m for m in modules if m.factors and m.dora_scale is not None), None)
    if weighted is not None:  # LyCORIS' dora_wd on a LoHa / LoKr: applied by generate, not trained here
        raise UserError(
            f"{key}: '{path}' is a {TYPE_NAMES[weighted.kind]} file with DoRA magnitudes (e.g. "
            f"{weighted.stem}), which lora-scripts does not train; continue from a LoRA, LoCon, LoHa, LoKr "
            "or DoRA file."
        )
    found = _match(modules, networks)
    problems = _structure_messages(path, key, found.foreign, found.shapes, found.duplicates)
    problems += _coverage_messages(path, key, found.uncovered)
    problems += _rank_messages(path, key, found.ranks)
    if problems:
        raise UserError(problems)
    rescaled = sum(_copy(module, target) for module, target in found.matched)
    total = sum(len(lora_layers(net)) for net in networks)
    report = ImportReport(
        loaded=len(found.matched), rescaled=rescaled, not_in_file=total - len(found.matched)
    )
    log.debug("network_weights %s: %s", path, report)
    return report


# --- matching it to our adapters ----------------------------------------------------------------------------


@dataclass
class _Matches:
    """The file's modules sorted by what happens to them."""

    matched: list[tuple[FileModule, ModuleRef]] = field(default_factory=list)
    foreign: list[FileModule] = field(default_factory=list)  # no such layer in the base model
    shapes: list[FileModule] = field(default_factory=list)  # the base layer has another size
    duplicates: list[FileModule] = field(default_factory=list)  # a second entry for one layer
    uncovered: list[tuple[FileModule, str]] = field(default_factory=list)  # (module, setting to add it)
    ranks: dict[str, list[tuple[FileModule, ModuleRef]]] = field(default_factory=dict)  # by rank key


def _match(modules: list[FileModule], networks: list[LoraNetwork]) -> _Matches:
    index = module_index(networks)
    trained = {"unet": False, "text_encoder": False}
    for net in networks:
        trained["text_encoder" if net.kohya_prefix.startswith("lora_te") else "unet"] = True
    found, seen = _Matches(), set()
    for module in modules:
        target = index.get(module.stem)
        if target is None and trained["text_encoder" if module.is_text_encoder else "unet"]:
            found.foreign.append(module)
        elif target is None or not isinstance(target.layer, (LoraLayer, LycorisLayer)):
            found.uncovered.append((module, _coverage_hint(module, trained["text_encoder"])))
        elif (id(target.network), target.path) in seen:
            found.duplicates.append(module)
        else:
            seen.add((id(target.network), target.path))
            problem = _fit(module, target)
            if problem == "shape":
                found.shapes.append(module)
            elif problem:
                found.ranks.setdefault(problem, []).append((module, target))
            else:
                found.matched.append((module, target))
    return found


def layer_network_type(layer: LoraLayer | LycorisLayer, adapter: str) -> str:
    """ "lora", "dora", "loha" or "lokr": what a training layer is."""
    if isinstance(layer, LycorisLayer):
        return factor_kind({n for n in layer.adapter_layer_names if adapter in getattr(layer, n)}) or "lora"
    magnitudes = getattr(layer, DORA_PARAMETER, None)
    return "dora" if magnitudes is not None and adapter in magnitudes else "lora"


def _file_network_type(module: FileModule) -> str:
    return "dora" if module.dora_scale is not None and not module.factors else module.kind


def _layer_factors(layer: LycorisLayer, adapter: str) -> dict[str, torch.nn.Parameter]:
    return {n: getattr(layer, n)[adapter] for n in layer.adapter_layer_names if adapter in getattr(layer, n)}


def _fit(module: FileModule, target: ModuleRef) -> str | None:
    """None when the file's tensors fit the adapter; "shape" when the base layer differs (another model);
    "network_type" when the file's type is not the run's; else the config key whose value differs
    ("lora_rank" or, for a 3x3 conv, "conv_rank"; "lokr" for a LoKr's factor sizes)."""
    layer, adapter = target.layer, target.network.adapter_name
    ours = layer_network_type(layer, adapter)
    if _file_network_type(module) != ours:
        return "network_type"
    if module.factors:
        return _fit_factors(module, layer, adapter)
    if ours == "dora" and module.dora_scale.numel() != getattr(layer, DORA_PARAMETER)[adapter].numel():
        return "shape"
    ours_down, ours_up = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
    down, up = module.down, module.up
    if ours_down.dim() == 4 and down.dim() == 2:  # a 1x1 conv stored as a matrix (older kohya files)
        down, up = down[:, :, None, None], up[:, :, None, None]
        module.down, module.up = down, up
    if (
        down.dim() != ours_down.dim()
        or up.dim() != ours_up.dim()
        or down.shape[1:] != ours_down.shape[1:]
        or up.shape[0] != ours_up.shape[0]
        or up.shape[2:] != ours_up.shape[2:]
        or up.shape[1] != down.shape[0]
    ):
        return "shape"
    if down.shape[0] != ours_down.shape[0]:
        return "conv_rank" if ours_down.dim() == 4 and ours_down.shape[2:] != (1, 1) else "lora_rank"
    return None


def _fit_factors(module: FileModule, layer: LycorisLayer, adapter: str) -> str | None:
    ours = _layer_factors(layer, adapter)
    if set(ours) == set(module.factors) and all(ours[n].shape == module.factors[n].shape for n in ours):
        return None
    base = layer.get_base_layer().weight
    if factors_shape(module.kind, module.factors) != (base.shape[0], base[0].numel()):
        return "shape"
    if module.kind == "lokr":
        return "lokr"
    return "conv_rank" if base.dim() == 4 and base.shape[2:] != (1, 1) else "lora_rank"


def _copy(module: FileModule, target: ModuleRef) -> bool:
    """Copy down → lora_A and up → lora_B (times the scale ratio), a DoRA magnitude, or a LoHa's / LoKr's
    factors (the first times the scale ratio); True when a weight was rescaled."""
    layer, adapter = target.layer, target.network.adapter_name
    if module.factors:
        return _copy_factors(module, layer, adapter)
    if module.dora_scale is not None:
        with torch.no_grad():
            getattr(layer, DORA_PARAMETER)[adapter].copy_(module.dora_scale.flatten())
    rank = module.down.shape[0]
    alpha = module.alpha if module.alpha is not None else float(rank)
    factor = (alpha / rank) / layer.scaling[adapter]
    with torch.no_grad():
        layer.lora_A[adapter].weight.copy_(module.down)
        layer.lora_B[adapter].weight.copy_(module.up.float() * factor)
    return not math.isclose(factor, 1.0, rel_tol=1e-6)


def _copy_factors(module: FileModule, layer: LycorisLayer, adapter: str) -> bool:
    factor = factors_scale(module.kind, module.factors, module.alpha) / layer.scaling[adapter]
    first = (
        "hada_w1_a" if module.kind == "loha" else ("lokr_w1" if "lokr_w1" in module.factors else "lokr_w1_a")
    )
    ours = _layer_factors(layer, adapter)
    with torch.no_grad():
        for name, tensor in module.factors.items():
            ours[name].copy_(tensor.float() * (factor if name == first else 1.0))
    return not math.isclose(factor, 1.0, rel_tol=1e-6)


# --- messages -----------------------------------------------------------------------------------------------


def _layers(n: int) -> str:
    return f"{n} layer" if n == 1 else f"{n} layers"


def _listed(modules: list[FileModule]) -> str:
    names = ", ".join(m.stem for m in modules[:_MAX_LISTED])
    return names + (f" and {len(modules) - _MAX_LISTED} more" if len(modules) > _MAX_LISTED else "")


def _structure_messages(
    path: Path, key: str, foreign: list[FileModule], shapes: list[FileModule], duplicates: list[FileModule]
) -> list[str]:
    problems = []
    if duplicates:
        problems.append(
            f"{key}: '{path}' names {_layers(len(duplicates))} twice ({_listed(duplicates)}, e.g. with and "
            "without text_model_); keep one copy of each."
        )
    if foreign:
        problems.append(
            f"{key}: '{path}' has {_layers(len(foreign))} this base model lacks ({_listed(foreign)}); "
            "use a LoRA made for this base model (SD 1.x vs 2.x vs SDXL)."
        )
    if shapes:
        problems.append(
            f"{key}: '{path}' has {_layers(len(shapes))} of another size than this base model's "
            f"({_listed(shapes)}); use a LoRA made for this base model (SD 1.x vs 2.x vs SDXL)."
        )
    return problems


def _coverage_messages(path: Path, key: str, uncovered: list[tuple[FileModule, str]]) -> list[str]:
    """Layers the file trains and this run does not, with the settings that would add them."""
    if not uncovered:
        return []
    hints = " and ".join(dict.fromkeys(hint for _, hint in uncovered))
    modules = [module for module, _ in uncovered]
    return [
        f"{key}: '{path}' trains {_layers(len(modules))} this run has no LoRA on ({_listed(modules)}); "
        f"set {hints}."
    ]


def _coverage_hint(module: FileModule, text_encoder_trained: bool) -> str:
    """The setting that gives this run a LoRA on the file's `module`."""
    if module.is_text_encoder:
        return "text_encoder_target_modules: kohya" if text_encoder_trained else "train_text_encoder: true"
    if module.down is not None and module.down.dim() == 4 and module.down.shape[2:] != (1, 1):
        return "conv_rank (LoCon)"
    return "target_modules: kohya (or list these layers in target_modules)"


def _rank_messages(path: Path, key: str, ranks: dict[str, list[tuple[FileModule, ModuleRef]]]) -> list[str]:
    problems = []
    for rank_key, pairs in ranks.items():
        module, target = pairs[0]
        adapter = target.network.adapter_name
        if rank_key == "network_type":
            theirs = TYPE_NAMES[_file_network_type(module)]
            ours = layer_network_type(target.layer, adapter)
            problems.append(
                f"{key}: '{path}' is a {theirs} file (e.g. {module.stem}) where this run trains "
                f"{TYPE_NAMES[ours]}; set network_type: {_file_network_type(module)}."
            )
            continue
        if rank_key == "lokr":
            problems.append(
                f"{key}: '{path}' has LoKr factors of other sizes at {module.stem} than this run's; set "
                "lora_rank, lokr_factor and lokr_full_matrix as the file was trained (its ss_network_args "
                "say so when sd-scripts or lora-scripts wrote it)."
            )
            continue
        rank = module.down.shape[0] if module.down is not None else factors_rank(module.kind, module.factors)
        ours = target.layer.r[adapter]
        problems.append(
            f"{key}: '{path}' has rank {rank} at {module.stem} where this run has {rank_key} {ours}; "
            f"set {rank_key}: {rank}."
        )
    return problems
