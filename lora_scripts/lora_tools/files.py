"""Opening LoRA inputs and writing the tools' outputs.

An input is read once, its family taken from its metadata or names (`lora_reader.lora_family`), and its
modules resolved against that family's full-size modules built on the meta device (models/meta_modules.py):
SD 1.x first, then 2.x, when the file does not say which; FLUX.1 on FLUX.1-dev's (schnell's are the same
less the guidance embedder). Outputs never replace an existing file unless
`overwrite`, are written atomically, and carry the history of what they were made from (`HISTORY_KEY`) with
their sd-scripts hashes recomputed.
"""

from __future__ import annotations

import json
import shutil
import time
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from lora_scripts import __version__
from lora_scripts.errors import UserError
from lora_scripts.export.atomic import write_atomic, write_text_atomic
from lora_scripts.export.hashes import precalculate_hashes
from lora_scripts.export.lora_layouts import (
    PEFT_CONFIG,
    PEFT_WEIGHTS,
    diffusers_tensors,
    file_layout,
    kohya_tensors,
    lora_model,
    module_tensors,
    peft_folders,
    read_lora_file,
    save_safetensors,
)
from lora_scripts.export.lora_model import LoraModel, LoraModule
from lora_scripts.export.lora_reader import FLUX_FAMILY, SD_FAMILY, SDXL_FAMILY, lora_family, version_family
from lora_scripts.export.lycoris import TYPE_NAMES
from lora_scripts.models.detect import ModelVersion, read_checkpoint
from lora_scripts.models.meta_modules import MetaModel, meta_model
from lora_scripts.models.registry import base_model_version

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
HISTORY_KEY = "lora_scripts.history"  # JSON list: one entry per tool run that made the file
# sd-scripts' ss_base_model_version per version (A1111/Forge sort LoRAs by it), and the network module its
# scripts name for that version's LoRAs (networks.lora unless listed).
BASE_MODEL_VERSIONS: dict[ModelVersion, str] = {
    "sd_v1": "sd_v1",
    "sd_v2": "sd_v2",
    "sdxl": "sdxl_base_v1-0",
    "flux1": "flux1",
}
NETWORK_MODULES: dict[ModelVersion, str] = {"flux1": "networks.lora_flux"}
# The versions of each family, most likely first (SD: 1.x before 2.x unless the metadata says v2).
FAMILY_VERSIONS: dict[str, list[ModelVersion]] = {
    SD_FAMILY: ["sd_v1", "sd_v2"],
    SDXL_FAMILY: ["sdxl"],
    FLUX_FAMILY: ["flux1"],
}
_STALE_KEYS = ("sshs_model_hash", "sshs_legacy_hash", "lora_adapter_metadata", "format")


@dataclass(frozen=True)
class OpenedLora:
    """A LoRA input: its model, the version whose modules it was resolved on, and where it came from."""

    path: Path
    model: LoraModel
    base: MetaModel

    @property
    def version(self) -> ModelVersion:
        return self.base.version


def open_lora(
    path: Path, *, key: str = "LoRA", config_dir: Path | None = None, allow_pickle: bool = False
) -> OpenedLora:
    """Read the LoRA at `path` (kohya or diffusers .safetensors, or a peft folder) onto its family's layers
    at full size, or those of the diffusers folder `config_dir` (its configs only: a model of other sizes).
    A pickle file (.pt, .ckpt, .pth, .bin) only with `allow_pickle`, through torch.load(weights_only=True)."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{key}: '{path}' does not exist; give the path of a LoRA .safetensors file.")
    tensors, metadata, layout = read_lora_input(path, key, allow_pickle=allow_pickle)
    versions = candidate_versions(list(tensors), metadata)
    if config_dir is not None:
        versions = [base_model_version(str(config_dir))]
    problems: list[UserError] = []
    for version in versions:
        base = meta_model(version, config_dir)
        family = version_family(version) or SD_FAMILY
        try:
            model = lora_model(tensors, metadata, layout, list(base.networks), family, path=path, key=key)
        except UserError as err:
            problems.append(err)
            continue
        return OpenedLora(path, model, base)
    raise problems[0]


def read_lora_input(
    path: Path, key: str, *, allow_pickle: bool = False
) -> tuple[dict[str, torch.Tensor], dict[str, str], str]:
    """(tensors, metadata, layout) of a LoRA input: `lora_layouts.read_lora_file`, or a pickle file's tensors
    (no metadata) when `allow_pickle`; a pickle file is refused otherwise."""
    if path.suffix.lower() not in PICKLE_SUFFIXES:
        return read_lora_file(path, key)
    if not allow_pickle:
        raise UserError(
            f"{key}: '{path}' is a pickle file, refused because unpickling can run code in it; use a "
            ".safetensors release, or add --allow-pickle to read its tensors with "
            "torch.load(weights_only=True)."
        )
    tensors = read_checkpoint(path, key)
    return tensors, {}, file_layout(list(tensors))


def candidate_versions(keys: list[str], metadata: dict[str, str]) -> list[ModelVersion]:
    """The versions a file may be for, most likely first: the family its metadata or names tell, SD 2.x
    before 1.x when the metadata says v2; every version when nothing tells."""
    family = lora_family(keys, metadata) or lora_family(keys, metadata, guess=True)
    v2 = metadata.get("ss_v2") == "True" or metadata.get("ss_base_model_version", "").startswith("sd_v2")
    families = {name: list(versions) for name, versions in FAMILY_VERSIONS.items()}
    if v2:
        families[SD_FAMILY].reverse()
    if family in families:
        return families[family]
    return [version for versions in families.values() for version in versions]


def a_or_an(name: str) -> str:
    """`name` with its article as it is read aloud: "an SD 1.x", "an SDXL", "a FLUX.1"."""
    return f"{'an' if name.startswith('S') else 'a'} {name}"


def parse_weighted(spec: str, *, option: str) -> tuple[Path, float]:
    """`path[:weight]` (weight 1 when left out) → (path, weight); UserError naming `option` otherwise."""
    path, sep, weight = spec.rpartition(":")
    if not sep or not path or "/" in weight or "\\" in weight:  # no weight (a Windows drive is not one)
        return Path(spec), 1.0
    try:
        return Path(path), float(weight)
    except ValueError:
        raise UserError(f"{option} {spec}: '{weight}' is not a number; write PATH or PATH:WEIGHT.") from None


# --- outputs ----------------------------------------------------------------------------------------------


def check_output(path: Path, *, overwrite: bool, inputs: list[Path] = ()) -> None:
    """UserError when `path` exists (without `overwrite`) or is one of the inputs."""
    path = Path(path)
    if any(path.resolve() == Path(p).resolve() for p in inputs):
        raise UserError(f"-o {path}: that is an input of this command; write the result to another file.")
    if path.exists() and not overwrite:
        raise UserError(f"-o {path}: the file exists; give another name, or add --overwrite to replace it.")


def history_entry(
    tool: str, inputs: list[tuple[Path, dict[str, str], float | None]], **params: object
) -> dict:
    """One `HISTORY_KEY` entry: the tool, its parameters, and each input's name, hash and weight."""
    return {
        "tool": tool,
        "version": __version__,
        "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "inputs": [
            {"file": path.name, "sshs_model_hash": meta.get("sshs_model_hash", ""), "weight": weight}
            for path, meta, weight in inputs
        ],
        "params": params,
    }


def output_metadata(source: dict[str, str], entry: dict, **updates: str) -> dict[str, str]:
    """`source`'s metadata without what no longer holds (hashes, diffusers' config), with `updates`, and
    `entry` appended to the history."""
    meta = {k: v for k, v in source.items() if k not in _STALE_KEYS}
    try:
        history = json.loads(source.get(HISTORY_KEY) or "[]")
    except json.JSONDecodeError:
        history = []
    meta[HISTORY_KEY] = json.dumps([*history, entry])
    meta.update(updates)
    return meta


def lora_facts(model: LoraModel, version: ModelVersion) -> dict[str, str]:
    """sd-scripts' keys that say what a LoRA file is, from its modules (for files that lack them). A LoHa,
    LoKr or DoRA file is LyCORIS': `ss_network_module` lycoris.kohya, its `algo` (and DoRA's `dora_wd`, LoKr's
    `factor`) in `ss_network_args`, as LyCORIS' kohya wrapper reads them."""
    rank, alpha = model.common_rank_and_alpha()
    facts = {
        "ss_base_model_version": BASE_MODEL_VERSIONS[version],
        "ss_v2": str(version == "sd_v2"),
        "ss_network_module": NETWORK_MODULES.get(version, "networks.lora"),
        "ss_network_dim": str(rank),
        "ss_network_alpha": str(alpha),
    }
    args: dict[str, str] = {} if model.plain else lycoris_args(model)
    if args:
        facts["ss_network_module"] = "lycoris.kohya"
    conv = [m for m in model.modules if is_spatial(m)]
    if conv:
        (conv_rank, conv_alpha), _ = Counter((m.rank, m.alpha) for m in conv).most_common(1)[0]
        args |= {"conv_dim": str(conv_rank), "conv_alpha": str(conv_alpha)}
    if args:
        facts["ss_network_args"] = json.dumps(args)
    return facts


def lycoris_args(model: LoraModel) -> dict[str, str]:
    """LyCORIS' network_args for a LoHa / LoKr / DoRA model: `algo`; DoRA's `dora_wd` with its magnitude
    per input channel (`wd_on_output` False: the key LyCORIS' kohya wrapper reads); LoKr's `factor` (the
    first factor's output size when every module has the same one, else -1: the split nearest the square
    root) and `full_matrix` when no module's second factor is decomposed."""
    kind = model.network_type
    if kind == "dora":
        return {"algo": "lora", "dora_wd": "True", "wd_on_output": "False"}
    args = {"algo": kind}
    if kind == "lokr":
        lokr = [m for m in model.modules if m.kind == "lokr"]
        sizes = {(m.factors.get("lokr_w1", m.factors.get("lokr_w1_a"))).shape[0] for m in lokr}
        args["factor"] = str(sizes.pop()) if len(sizes) == 1 else "-1"
        if not any("lokr_w2_a" in m.factors for m in lokr):
            args["full_matrix"] = "True"
    return args


def is_spatial(module: LoraModule) -> bool:
    """A 3x3 (or larger) conv: what sd-scripts' conv_dim adapts; 1x1 convs count as linear."""
    return module.is_conv and tuple(module.weight_shape[2:]) != (1, 1)


def module_dtype(module: LoraModule) -> torch.dtype:
    """The dtype a module's weights are stored in (LoHa / LoKr: their first factor's)."""
    return next(iter(module_tensors(module).values())).dtype


def refuse_unless_plain(opened: OpenedLora, command: str, why: str) -> None:
    """UserError, naming the file and its type, when `opened` is a LoHa, LoKr or DoRA file: `why` says what
    the command cannot do with it and what to use instead."""
    if not opened.model.plain:
        raise UserError(f"{command}: '{opened.path}' is {type_article(opened.model)} file; {why}")


def type_article(model: LoraModel) -> str:
    """ "a LoHa", "a LoKr", "a DoRA": the file's network type with its article."""
    return f"a {TYPE_NAMES[model.network_type]}"


def save_lora(
    path: Path,
    model: LoraModel,
    base: MetaModel,
    metadata: dict[str, str],
    *,
    layout: str = "kohya",
    dtype: torch.dtype | None = None,
) -> None:
    """Write `model` at `path` in `layout` ("kohya", "diffusers": one .safetensors file; "peft": a
    folder), atomically, with `metadata` and the recomputed sshs hashes. dtype: cast the weights (None: as
    they are)."""
    if dtype is not None:
        model = cast(model, dtype)
    if layout == "peft":
        _save_peft(Path(path), model, base, metadata)
        return
    if layout == "kohya":
        tensors, extra = kohya_tensors(model, list(base.networks)), {}
    else:
        tensors, extra = diffusers_tensors(model)
    meta = {**metadata, **extra}
    meta["sshs_model_hash"], meta["sshs_legacy_hash"] = precalculate_hashes(tensors, meta)
    write_atomic(Path(path), lambda tmp: save_safetensors(tmp, tensors, meta))


def _save_peft(folder: Path, model: LoraModel, base: MetaModel, metadata: dict[str, str]) -> None:
    """One subfolder per component; written beside the target and renamed into place, so an interrupted
    save leaves no half folder."""
    staging = folder.with_name(f".{folder.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    for component, (tensors, config) in peft_folders(model, list(base.networks)).items():
        (staging / component).mkdir(parents=True)
        write_atomic(
            staging / component / PEFT_WEIGHTS,
            lambda tmp, tensors=tensors: save_safetensors(tmp, tensors, metadata),
        )
        write_text_atomic(staging / component / PEFT_CONFIG, json.dumps(config, indent=2, sort_keys=True))
    if folder.exists():
        shutil.rmtree(folder)
    staging.rename(folder)


def cast(model: LoraModel, dtype: torch.dtype) -> LoraModel:
    """A copy of `model` with its weights in `dtype`."""

    def to(tensor: torch.Tensor | None) -> torch.Tensor | None:
        return None if tensor is None else tensor.to(dtype)

    modules = [
        replace(
            m,
            down=to(m.down),
            up=to(m.up),
            factors={suffix: to(t) for suffix, t in m.factors.items()},
            dora_scale=to(m.dora_scale),
        )
        for m in model.modules
    ]
    return replace(model, modules=modules)
