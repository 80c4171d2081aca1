"""`network_weights`: start training from an existing LoRA file's weights (sd-scripts' option of that name).

Reads kohya files (ours, sd-scripts', LoCon with 4-D conv weights; text-encoder keys `lora_te_text_model_…` or
without `text_model_`) and diffusers/peft files (`unet.<path>.lora_A.weight`, `text_encoder.<path>…`, the
older `….lora.down.weight` too). Each module's down goes to lora_A and its up to lora_B, rescaled so that the
update is the file's: sd-scripts' `(alpha_file / rank_file) * up @ down`, where peft multiplies lora_B by its
own `alpha / rank`. A missing alpha means alpha = rank, as in kohya's loader (and diffusers without metadata).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from peft.tuners.lora import LoraLayer

from lora_scripts.errors import UserError
from lora_scripts.export.kohya import LoraNetwork, lora_layers
from lora_scripts.export.lora_reader import (
    FileModule,
    ModuleRef,
    file_modules,
    module_index,
    read_lora_tensors,
)

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
    found = _match(file_modules(tensors, metadata, path, key), networks)
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
        elif target is None or not isinstance(target.layer, LoraLayer):
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


def _fit(module: FileModule, target: ModuleRef) -> str | None:
    """None when the file's tensors fit the adapter; "shape" when the base layer differs (another model);
    else the config key whose value differs ("lora_rank" or, for a 3x3 conv, "conv_rank")."""
    layer, adapter = target.layer, target.network.adapter_name
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


def _copy(module: FileModule, target: ModuleRef) -> bool:
    """Copy down → lora_A and up → lora_B (times the scale ratio); True when lora_B was rescaled."""
    layer, adapter = target.layer, target.network.adapter_name
    rank = module.down.shape[0]
    alpha = module.alpha if module.alpha is not None else float(rank)
    factor = (alpha / rank) / layer.scaling[adapter]
    with torch.no_grad():
        layer.lora_A[adapter].weight.copy_(module.down)
        layer.lora_B[adapter].weight.copy_(module.up.float() * factor)
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
    if module.down.dim() == 4 and module.down.shape[2:] != (1, 1):
        return "conv_rank (LoCon)"
    return "target_modules: kohya (or list these layers in target_modules)"


def _rank_messages(path: Path, key: str, ranks: dict[str, list[tuple[FileModule, ModuleRef]]]) -> list[str]:
    problems = []
    for rank_key, pairs in ranks.items():
        module, target = pairs[0]
        ours = target.layer.r[target.network.adapter_name]
        problems.append(
            f"{key}: '{path}' has rank {module.down.shape[0]} at {module.stem} where this run has {rank_key} "
            f"{ours}; set {rank_key}: {module.down.shape[0]}."
        )
    return problems
