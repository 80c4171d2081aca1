"""A `LoraModel` (export/lora_model.py) read from, and written in, each LoRA file layout:

- kohya (`lora_unet_<path>.lora_down.weight`, `.lora_up.weight`, `.alpha`; SDXL's UNet by sgm path,
  `lora_te1_` / `lora_te2_`): what sd-scripts writes and A1111/Forge/ComfyUI load;
- diffusers (`unet.<path>.lora_A.weight`, `.lora_B.weight`, alphas in the `lora_adapter_metadata` metadata as
  diffusers' `save_lora_weights` writes them): what `load_lora_weights` loads;
- peft (a folder per component, `<component>/adapter_model.safetensors` with `base_model.model.<path>.lora_A
  .weight` keys and `<component>/adapter_config.json`): what `PeftModel.from_pretrained` loads.

The names of a family's modules come from its networks (`LoraNetwork`, built from the live or meta-device
model), so every spelling resolves to the layer the model really has.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import safetensors
import safetensors.torch
import torch

from lora_scripts.errors import UserError
from lora_scripts.export.fused import FusedPart, PartLora, fuse
from lora_scripts.export.kohya import LoraNetwork, write_lycoris_module, write_module
from lora_scripts.export.lora_model import COMPONENTS, LoraModel, LoraModule, resolve_modules
from lora_scripts.export.lora_reader import (
    file_modules,
    module_index,
    network_component,
    read_lora_tensors,
)

LAYOUTS = ("kohya", "diffusers", "peft")
PEFT_WEIGHTS, PEFT_CONFIG = "adapter_model.safetensors", "adapter_config.json"
_PEFT_PREFIX = "base_model.model."


def file_layout(keys: list[str]) -> str:
    """ "kohya" for sd-scripts keys (`lora_unet_…`, `lora_te…`), else "diffusers"."""
    return "kohya" if any(key.startswith("lora_") for key in keys) else "diffusers"


def component_networks(networks: list[LoraNetwork]) -> dict[str, LoraNetwork]:
    """The network that names each component in files this tool writes (the first one listed: SD's
    `lora_te`, not its `lora_te1` alias)."""
    out: dict[str, LoraNetwork] = {}
    for net in networks:
        out.setdefault(network_component(net), net)
    return out


# --- reading ----------------------------------------------------------------------------------------------


def read_lora_file(path: Path, key: str) -> tuple[dict[str, torch.Tensor], dict[str, str], str]:
    """(tensors, metadata, layout) of a kohya or diffusers .safetensors LoRA file or a peft folder; a peft
    folder's tensors come back in the diffusers layout."""
    if path.is_dir():
        tensors, metadata = _peft_folder_tensors(path, key)
        return tensors, metadata, "peft"
    tensors, metadata = read_lora_tensors(path, key)
    return tensors, metadata, file_layout(list(tensors))


def lora_model(
    tensors: dict[str, torch.Tensor],
    metadata: dict[str, str],
    layout: str,
    networks: list[LoraNetwork],
    family: str,
    *,
    path: Path,
    key: str,
) -> LoraModel:
    """The file's tensors (`read_lora_file`) as a LoraModel on the layers of `networks`. UserError, naming
    `key`, when a module has no layer of that name or size there."""
    found = resolve_modules(file_modules(tensors, metadata, path, key), module_index(networks))
    if not found.complete:
        stems = found.missing + found.wrong_shape
        what = "have no layer of that name" if found.missing else "have another size"
        raise UserError(
            f"{key}: {len(stems)} of the modules of '{path}' {what} in {family} models (e.g. '{stems[0]}'); "
            "it was made for another base model."
        )
    return LoraModel(family=family, modules=found.modules, metadata=metadata, layout=layout)


def _peft_folder_tensors(folder: Path, key: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A peft folder (one subfolder per component, as `peft_folders` writes) as diffusers keys, with its
    alphas carried as diffusers' `lora_adapter_metadata` and the training metadata of its weight files."""
    tensors: dict[str, torch.Tensor] = {}
    packed: dict[str, object] = {}
    metadata: dict[str, str] = {}
    parts = [p for p in sorted(folder.iterdir()) if (p / PEFT_WEIGHTS).is_file()]
    if not parts:
        raise UserError(
            f"{key}: '{folder}' holds no <component>/{PEFT_WEIGHTS} (e.g. unet/{PEFT_WEIGHTS}); give a LoRA "
            "file or a folder `convert --to peft` wrote."
        )
    for part in parts:
        if part.name not in COMPONENTS:
            names = f"{', '.join(COMPONENTS[:-1])} or {COMPONENTS[-1]}"
            raise UserError(f"{key}: '{part}' is not a component lora-scripts knows; name it {names}.")
        weights, part_metadata = read_lora_tensors(part / PEFT_WEIGHTS, key)
        metadata = metadata or part_metadata  # every part carries the same training metadata
        for name, value in weights.items():
            tensors[f"{part.name}.{name.removeprefix(_PEFT_PREFIX)}"] = value
        try:
            config = json.loads((part / PEFT_CONFIG).read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise UserError(f"{key}: '{part / PEFT_CONFIG}' cannot be read ({err}).") from err
        for field in ("r", "lora_alpha", "rank_pattern", "alpha_pattern"):
            if field in config:
                packed[f"{part.name}.{field}"] = config[field]
    return tensors, {**metadata, "lora_adapter_metadata": json.dumps(packed)}


# --- writing ----------------------------------------------------------------------------------------------


def kohya_tensors(model: LoraModel, networks: list[LoraNetwork]) -> dict[str, torch.Tensor]:
    """The kohya layout: each module's down, up and alpha (in the down weight's dtype, as sd-scripts stores
    it) under the name the family's network gives its layer."""
    nets = component_networks(networks)
    out: dict[str, torch.Tensor] = {}
    fused: dict[str, tuple[FusedPart, dict[int, PartLora]]] = {}
    for module in model.modules:
        net = nets[module.component]
        path = module.path.removeprefix(net.name_prefix)
        part = net.fusion(path) if net.fusion is not None else None
        if part is not None:  # FLUX's BFL layout: written with the other parts of its fused layer
            name = f"{net.kohya_prefix}_{part.path.replace('.', '_')}"
            fused.setdefault(name, (part, {}))[1][part.index] = PartLora(module.down, module.up, module.alpha)
            continue
        if not module.plain:  # LoHa, LoKr, DoRA: LyCORIS' keys (export/lycoris.py)
            write_lycoris_module(out, net.kohya_name(path), module_tensors(module), module.alpha)
            continue
        write_module(
            out, net.kohya_name(path), PartLora(module.down, module.up, module.alpha), module.down.dtype
        )
    for name, (part, parts) in fused.items():
        lora = fuse(parts, part.sizes)
        write_module(out, name, lora, lora.down.dtype)
    return out


def module_tensors(module: LoraModule) -> dict[str, torch.Tensor]:
    """A LoHa / LoKr / DoRA module's tensors by LyCORIS suffix (alpha aside), as stored."""
    out = dict(module.factors)
    if module.down is not None and module.up is not None:
        out["lora_down.weight"], out["lora_up.weight"] = module.down, module.up
    if module.dora_scale is not None:
        out["dora_scale"] = module.dora_scale
    return out


def require_plain(model: LoraModel, layout: str) -> None:
    """ValueError unless every module is a plain LoRA: the diffusers and peft layouts have no LoHa, LoKr or
    LyCORIS DoRA (callers say so in their own words first)."""
    odd = [m for m in model.modules if not m.plain]
    if odd:
        raise ValueError(f"the {layout} layout holds plain LoRA modules only, not {odd[0].network_type}")


def diffusers_tensors(model: LoraModel) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The diffusers layout and the metadata diffusers' `save_lora_weights` writes with it (`format`, and
    `lora_adapter_metadata`: each component's peft LoraConfig, whose r / lora_alpha / rank_pattern /
    alpha_pattern give every module its own alpha / rank)."""
    require_plain(model, "diffusers")
    out: dict[str, torch.Tensor] = {}
    for module in model.modules:
        out[f"{module.name}.lora_A.weight"] = module.down.contiguous()
        out[f"{module.name}.lora_B.weight"] = module.up.contiguous()
    _unshare(out)
    packed = {}
    for component in model.components():
        modules = [m for m in model.modules if m.component == component]
        # peft matches a target or pattern as a dotted suffix of the module path, so one without CLIP's
        # `text_model.` finds the layer with transformers 4 (which has that submodule) and 5 (which has not).
        for field, value in lora_config(modules, path_prefix="text_model.").items():
            packed[f"{component}.{field}"] = value
    return out, {"format": "pt", "lora_adapter_metadata": json.dumps(packed, indent=2, sort_keys=True)}


def peft_folders(
    model: LoraModel, networks: list[LoraNetwork]
) -> dict[str, tuple[dict[str, torch.Tensor], dict[str, object]]]:
    """component → (adapter_model tensors, adapter_config) as peft saves an adapter of that model alone:
    keys by the live model's module paths (`base_model.model.<path>.lora_A.weight`)."""
    require_plain(model, "peft")
    nets = component_networks(networks)
    out = {}
    for component in model.components():
        prefix = nets[component].name_prefix
        modules = [m for m in model.modules if m.component == component]
        tensors = {}
        for m in modules:
            stem = _PEFT_PREFIX + m.path.removeprefix(prefix)
            tensors[f"{stem}.lora_A.weight"] = m.down.contiguous()
            tensors[f"{stem}.lora_B.weight"] = m.up.contiguous()
        _unshare(tensors)
        config = lora_config(modules, path_prefix=prefix)
        out[component] = (tensors, {"peft_type": "LORA", "task_type": None, **config})
    return out


def _unshare(tensors: dict[str, torch.Tensor]) -> None:
    """Copies, in place, of tensors that share memory with one written before (the parts of a dense FLUX
    qkv / linear1 LoRA share one down): safetensors refuses to save shared tensors."""
    seen: set[int] = set()
    for name, tensor in tensors.items():
        if tensor.data_ptr() in seen:
            tensors[name] = tensor.clone()
        seen.add(tensors[name].data_ptr())


def lora_config(modules: list[LoraModule], *, path_prefix: str = "") -> dict[str, object]:
    """The peft LoraConfig fields that give each module its rank and alpha: the most frequent ones as `r` /
    `lora_alpha`, the others per module path in `rank_pattern` / `alpha_pattern` (the way diffusers'
    `get_peft_kwargs` builds them)."""
    paths = {m.path: m.path.removeprefix(path_prefix) for m in modules}
    rank = Counter(m.rank for m in modules).most_common(1)[0][0]
    alpha = Counter(m.alpha for m in modules).most_common(1)[0][0]
    return {
        "r": rank,
        "lora_alpha": alpha,
        "rank_pattern": {paths[m.path]: m.rank for m in modules if m.rank != rank},
        "alpha_pattern": {paths[m.path]: m.alpha for m in modules if m.alpha != alpha},
        "target_modules": sorted(paths.values()),
        "use_dora": False,
        "lora_bias": False,
    }


def save_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Write one .safetensors file (callers write to a temporary name and rename: export/atomic.py)."""
    safetensors.torch.save_file(tensors, str(path), metadata=metadata)
