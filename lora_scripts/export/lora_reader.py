"""Reading a LoRA file into its modules (down, up, alpha), whatever its layout: kohya/sd-scripts keys
(`lora_unet_<path>.lora_down.weight`, `.lora_up.weight`, `.alpha`, LoCon's 4-D convs) and diffusers/peft keys
(`unet.<path>.lora_A.weight`, `text_encoder.<path>.lora_B.weight`, the older `….lora.down.weight`, alphas in
`.alpha` keys or in diffusers' `lora_adapter_metadata`), and finding the layer each module belongs to by
every name a file may give it (`module_index`). `network_weights` and `generate` read through it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import safetensors
import safetensors.torch
import torch
from torch import nn

from lora_scripts.errors import UserError
from lora_scripts.export.kohya import LoraNetwork
from lora_scripts.export.lycoris import (
    DORA_KEY,
    FACTOR_KEYS,
    UNSUPPORTED_SUFFIXES,
    factor_kind,
    factors_complete,
)

# kohya prefix of a network → the diffusers/peft component name its file keys start with.
DIFFUSERS_COMPONENT = {
    "lora_unet": "unet",
    "lora_te": "text_encoder",
    "lora_te1": "text_encoder",
    "lora_te2": "text_encoder_2",
}
_KOHYA_SUFFIXES = {
    ".lora_down.weight": "down",
    ".lora_up.weight": "up",
    ".alpha": "alpha",
    f".{DORA_KEY}": DORA_KEY,
    # LyCORIS' LoHa / LoKr tensors (export/lycoris.py), kept under their own names
    **{f".{name}": name for keys in FACTOR_KEYS.values() for name in keys},
}
_DIFFUSERS_SUFFIXES = {
    ".lora_A.weight": "down",
    ".lora_B.weight": "up",
    ".lora.down.weight": "down",  # diffusers' LoRACompatibleLinear files (before peft)
    ".lora.up.weight": "up",
    ".alpha": "alpha",
}


@dataclass
class FileModule:
    """One adapted layer of a file: down [r, in(, kh, kw)], up [out, r(, 1, 1)] as stored (any dtype), and
    its alpha (None: the file has none, so alpha = rank as in kohya's and diffusers' loaders). A LyCORIS
    LoHa / LoKr module holds its tensors in `factors` instead (by suffix: `hada_w1_a`, `lokr_w1`, ...); a
    DoRA module has a `dora_scale` besides (export/lycoris.py)."""

    stem: str  # the module's key in the file, without suffix (what messages name)
    down: torch.Tensor | None = None
    up: torch.Tensor | None = None
    alpha: float | None = None
    factors: dict[str, torch.Tensor] = field(default_factory=dict)
    dora_scale: torch.Tensor | None = None

    @property
    def kind(self) -> str:
        """ "lora", "loha" or "lokr" (DoRA is a LoRA with a dora_scale)."""
        return factor_kind(set(self.factors)) or "lora"

    @property
    def is_text_encoder(self) -> bool:
        return self.stem.startswith(("lora_te", "text_encoder"))


# --- reading ---------------------------------------------------------------------------------------


def read_lora_tensors(path: Path, key: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and metadata of the safetensors file at `path`; UserError naming `key` when unreadable."""
    try:
        tensors = safetensors.torch.load_file(str(path))
        with safetensors.safe_open(str(path), framework="pt") as fh:
            metadata = dict(fh.metadata() or {})
    except Exception as err:  # noqa: BLE001 - missing and damaged files raise several types
        raise UserError(f"{key}: '{path}' cannot be read as a safetensors LoRA file ({err}).") from err
    return tensors, metadata


def read_lora_header(path: Path, key: str) -> tuple[list[str], dict[str, str]]:
    """The tensor names and metadata of the safetensors file at `path`, from its header alone; UserError
    naming `key` when unreadable."""
    try:
        with safetensors.safe_open(str(path), framework="pt") as fh:
            return list(fh.keys()), dict(fh.metadata() or {})
    except Exception as err:  # noqa: BLE001 - missing and damaged files raise several types
        raise UserError(f"{key}: '{path}' cannot be read as a safetensors LoRA file ({err}).") from err


def split_key(name: str) -> tuple[str, str] | None:
    """`lora_unet_x.lora_down.weight` → (`lora_unet_x`, "down"); None for keys that are not LoRA weights."""
    suffixes = _KOHYA_SUFFIXES if name.startswith("lora_") else _DIFFUSERS_SUFFIXES
    for suffix, part in suffixes.items():
        if name.endswith(suffix):
            return name.removesuffix(suffix), part
    return None


def file_modules(
    tensors: dict[str, torch.Tensor], metadata: dict[str, str], path: Path, key: str
) -> list[FileModule]:
    """The file's modules (down, up, alpha), whatever its format."""
    for suffix, kind in UNSUPPORTED_SUFFIXES.items():
        if any(name.endswith(suffix) for name in tensors):
            raise UserError(
                f"{key}: '{path}' is a {kind} file, which lora-scripts cannot apply; give a LoRA, LoCon, "
                "LoHa, LoKr or DoRA file."
            )
    modules: dict[str, FileModule] = {}
    unknown = []
    for name in sorted(tensors):
        split = split_key(name)
        if split is None:
            unknown.append(name)
            continue
        stem, part = split
        module = modules.setdefault(stem, FileModule(stem))
        if part == "alpha":
            module.alpha = float(tensors[name].float().item())
        elif part in ("down", "up", DORA_KEY):
            setattr(module, part, tensors[name])
        else:
            module.factors[part] = tensors[name]
    if unknown:
        raise UserError(
            f"{key}: '{path}' holds keys that are not LoRA weights (e.g. '{unknown[0]}'); "
            "give a kohya or diffusers LoRA file."
        )
    broken = [m.stem for m in modules.values() if not _complete(m)]
    if broken or not modules:
        detail = f"'{broken[0]}' lacks some of its weights" if broken else "it holds no LoRA weights"
        raise UserError(f"{key}: '{path}' is not a complete LoRA file ({detail}); give another file.")
    diffusers_alphas = _diffusers_alphas(metadata)
    for module in modules.values():
        if module.alpha is None and not module.stem.startswith("lora_"):
            module.alpha = diffusers_alphas(module.stem)
    return list(modules.values())


def _complete(module: FileModule) -> bool:
    if module.factors:
        return module.down is None and module.up is None and factors_complete(module.kind, module.factors)
    return module.down is not None and module.up is not None


def _diffusers_alphas(metadata: dict[str, str]):
    """stem (`unet.<path>`) → the alpha diffusers recorded in `lora_adapter_metadata` (its peft LoraConfig per
    component: `unet.lora_alpha`, `unet.alpha_pattern`), or None (then alpha = rank)."""
    try:
        config = json.loads(metadata.get("lora_adapter_metadata") or "{}")
    except json.JSONDecodeError:
        config = {}

    def alpha_of(stem: str) -> float | None:
        component, _, module_path = stem.partition(".")
        patterns = config.get(f"{component}.alpha_pattern") or {}
        for pattern, alpha in patterns.items():
            try:
                if re.match(rf"(.*\.)?({pattern})$", module_path):  # peft's get_pattern_key rule
                    return float(alpha)
            except re.error:  # not a pattern peft could have written: ignore it
                continue
        alpha = config.get(f"{component}.lora_alpha")
        return None if alpha is None else float(alpha)

    return alpha_of


# --- finding the layers -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModuleRef:
    """A Linear/Conv2d of a network's module that a file's module names."""

    network: LoraNetwork
    path: str  # module path in network.module
    layer: nn.Module  # a peft LoraLayer, or the plain Linear/Conv2d when it carries no adapter

    @property
    def component(self) -> str:
        """The diffusers component name (`unet`, `text_encoder`, `text_encoder_2`, `transformer`)."""
        return network_component(self.network)


@dataclass(frozen=True)
class FusedRef:
    """A fused layer a file may name (FLUX's BFL `qkv` / `linear1`): its parts' layers in output order."""

    parts: tuple[ModuleRef, ...]
    sizes: tuple[int, ...]


def network_component(network: LoraNetwork) -> str:
    """The diffusers component a network's files name its module by."""
    return network.component or DIFFUSERS_COMPONENT.get(network.kohya_prefix, network.kohya_prefix)


def module_index(networks: list[LoraNetwork]) -> dict[str, ModuleRef | FusedRef]:
    """Every stem a file may give each Linear/Conv2d of the networks (`FileModule.stem`): kohya
    (`lora_te_text_model_…` and without `text_model_`; SDXL's UNet by sgm path, as sd-scripts writes it, and
    by diffusers path) and diffusers (`text_encoder.text_model.…` and without `text_model.`).

    Built from the live modules, so kohya's ambiguous underscores (`to_out_0` vs `to.out.0`) resolve to the
    names the model really has. A layer already wrapped by peft is listed under its own path, not
    `<path>.base_layer`, so a file's module reaches the wrapper.
    """
    index: dict[str, ModuleRef | FusedRef] = {}
    fused: dict[str, tuple[tuple[int, ...], dict[int, ModuleRef]]] = {}
    for net in networks:
        for name, layer in net.module.named_modules():
            if not isinstance(layer, (nn.Linear, nn.Conv2d)) or ".lora_" in name:
                continue
            path = name.removesuffix(".base_layer")  # peft keeps the original layer as `<path>.base_layer`
            ref = ModuleRef(net, path, net.module.get_submodule(path))
            full = net.name_prefix + path  # the diffusers layout's path
            for dotted in {full, full.removeprefix("text_model.")}:
                index[f"{net.kohya_prefix}_{dotted.replace('.', '_')}"] = ref
                index[f"{ref.component}.{dotted}"] = ref
            part = net.fusion(path) if net.fusion is not None else None
            if part is not None:  # named in kohya files only as part of its fused layer
                fused.setdefault(f"{net.kohya_prefix}_{part.path.replace('.', '_')}", (part.sizes, {}))[1][
                    part.index
                ] = ref
                continue
            try:
                kohya = net.kohya_path(path)  # == full unless the network has a key_map
            except ValueError:  # a layer the layout has no name for (FLUX's final norm)
                continue
            for dotted in {kohya, kohya.removeprefix("text_model.")}:
                index[f"{net.kohya_prefix}_{dotted.replace('.', '_')}"] = ref
    for stem, (sizes, parts) in fused.items():
        if len(parts) == len(sizes):
            index[stem] = FusedRef(tuple(parts[i] for i in range(len(sizes))), sizes)
    return index


# --- which model family a file was made for -----------------------------------------------------------------

SD_FAMILY, SDXL_FAMILY, FLUX_FAMILY = "SD 1.x/2.x", "SDXL", "FLUX.1"  # as messages name them
# sd-scripts' FLUX.1 names (export/flux_keys.py) and diffusers' FLUX transformer prefix.
_FLUX_ONLY = ("lora_unet_double_blocks_", "lora_unet_single_blocks_", "lora_te3_", "transformer.")
_SDXL_ONLY = (  # a second text encoder, or sgm UNet names (sd-scripts' SDXL layout, export/sdxl_keys.py)
    "lora_te2_",
    "text_encoder_2.",
    "lora_unet_input_blocks_",
    "lora_unet_middle_block_",
    "lora_unet_output_blocks_",
)
_SD_ONLY = ("lora_te_",)  # SDXL files name their encoders lora_te1_ / lora_te2_
_SD_VERSIONS = ("sdv1", "sdv2", "sd1", "sd2", "v1", "v2")  # ss_base_model_version without punctuation
_SD_ARCHITECTURES = ("stable-diffusion-v1", "stable-diffusion-v2")


def lora_family(keys: Iterable[str], metadata: dict[str, str], *, guess: bool = False) -> str | None:
    """The family a LoRA file was made for (SD_FAMILY or SDXL_FAMILY), or None when the file does not tell.

    First its metadata: sd-scripts' `ss_base_model_version` ("sd_v1", "sd_v2", "sdxl_base_v1-0") or
    `modelspec.architecture` ("stable-diffusion-v1/lora", "stable-diffusion-xl-v1-base/lora"). Else names only
    one family's files use: `lora_te2_`, `text_encoder_2.` or sgm UNet names (`lora_unet_input_blocks_…`) are
    SDXL's, `lora_te_` is SD 1.x/2.x's.

    guess: also read names both families' files may use, for explaining why a file does not fit (never to
    refuse one): `lora_te1_` means SDXL (a few SD 1.x files use it too), else diffusers-path UNet names
    (`lora_unet_down_blocks_…`) mean SD 1.x/2.x (diffusers' kohya conversion writes them for SDXL too).
    """
    declared = version_family(metadata.get("ss_base_model_version", ""))
    if declared is not None:
        return declared
    architecture = metadata.get("modelspec.architecture", "").lower()
    if architecture.startswith("flux-1"):
        return FLUX_FAMILY
    if architecture.startswith("stable-diffusion-xl"):
        return SDXL_FAMILY
    if architecture.startswith(_SD_ARCHITECTURES):
        return SD_FAMILY
    keys = list(keys)
    if any(key.startswith(_FLUX_ONLY) for key in keys):
        return FLUX_FAMILY
    if any(key.startswith(_SDXL_ONLY) for key in keys):
        return SDXL_FAMILY
    if any(key.startswith(_SD_ONLY) for key in keys):
        return SD_FAMILY
    if guess and any(key.startswith("lora_te1_") for key in keys):
        return SDXL_FAMILY
    if guess and any(key.startswith(("lora_unet_down_blocks_", "lora_unet_up_blocks_")) for key in keys):
        return SD_FAMILY
    return None


def version_family(version: str) -> str | None:
    """SDXL_FAMILY, SD_FAMILY or FLUX_FAMILY for a base model version: sd-scripts' `ss_base_model_version`
    ("sd_v1", "sd_v2_768_v", "sdxl_base_v1-0", "flux1") or models/detect.py's ("sd_v1", "sd_v2", "sdxl",
    "flux1"); None for another."""
    version = re.sub(r"[^a-z0-9]", "", version.lower())
    if version.startswith("flux"):
        return FLUX_FAMILY
    if version.startswith("sdxl"):
        return SDXL_FAMILY
    return SD_FAMILY if version.startswith(_SD_VERSIONS) else None
