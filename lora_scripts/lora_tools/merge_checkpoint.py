"""`lora-scripts merge --base`: LoRAs fused into a base model, written as a new single-file checkpoint in the
base's own layout (CompVis for SD 1.x/2.x, sgm for SDXL, Black Forest Labs' for FLUX.1), as A1111 applies
them:

    W' = W + Σᵢ mᵢ · (alphaᵢ / rankᵢ) · upᵢ @ downᵢ

for every layer a LoRA adapts, mᵢ being that LoRA's text-encoder or UNet (FLUX: transformer) weight
(A1111's `<lora:name:te:unet>`). A LoHa or LoKr module adds its `LoraModule.update()` (LyCORIS' formulas,
export/lycoris.py) in place of `(alpha / rank) · up @ down`; a DoRA module adds mᵢ · (its DoRA weight of the
layer's weight, as the LoRAs before it left it, minus that weight), as A1111 applies it. FLUX.1's q/k/v (and
a single block's MLP input) are rows of one fused tensor (`qkv`, `linear1`): each part's update goes to its
own rows, exactly. A FLUX transformer file holds no text encoders: a LoRA's CLIP-L / T5 modules need a
text-encoder weight of 0 there. The sum is formed in float32 (on `device`) and cast once to the output
dtype. Every other tensor and key of the base (VAE, EMA weights,
`v_pred` / `ztsnr` markers, anything unknown) is written through unchanged, bit for bit unless another
precision is asked for; its metadata is kept, with a `lora_scripts.history` entry naming the base and each
LoRA with its weights and hash.

The base is read one tensor at a time and the output written the same way (models/checkpoint_file.py), so
memory holds a tensor or two, not the model. Where each layer lives in the file comes from the family's
modules (models/checkpoint_layout.py), checked against the base's header before anything is written.
"""

from __future__ import annotations

import logging
import math
import re
from collections import defaultdict
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from lora_scripts.devices import pick_device
from lora_scripts.errors import UserError
from lora_scripts.export.hashes import file_model_hash
from lora_scripts.export.lora_layouts import lora_model
from lora_scripts.export.lora_model import DENOISERS, LoraModule
from lora_scripts.export.lora_reader import lora_family, version_family
from lora_scripts.export.safetensors_stream import TensorSpec
from lora_scripts.lora_tools.files import (
    OpenedLora,
    a_or_an,
    check_output,
    history_entry,
    output_metadata,
    read_lora_input,
)
from lora_scripts.models.checkpoint_file import CheckpointFile, write_checkpoint
from lora_scripts.models.checkpoint_layout import CheckpointLayout, WeightLocation
from lora_scripts.models.detect import VERSION_NAMES, ModelVersion, detect_model_version
from lora_scripts.models.meta_modules import MetaModel, meta_model

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MergeInput:
    """One LoRA to fuse and its multipliers: te_weight for the text encoders, unet_weight for the UNet (or
    FLUX's transformer)."""

    path: Path
    te_weight: float = 1.0
    unet_weight: float = 1.0

    def weight(self, component: str) -> float:
        return self.unet_weight if component in DENOISERS else self.te_weight


def parse_merge_input(spec: str, *, option: str = "--lora") -> MergeInput:
    """`PATH` (weight 1), `PATH:W` (W for both parts) or `PATH:TE:UNET`, as A1111's `<lora:name:te:unet>`;
    UserError naming `option` when the last part is not a number (a Windows drive is not taken for one)."""
    head, sep, last = spec.rpartition(":")
    if not sep or not head or "/" in last or "\\" in last:
        return MergeInput(Path(spec))
    unet = _number(last)
    if unet is None:
        raise UserError(
            f"{option} {spec}: '{last}' is not a number; write PATH, PATH:WEIGHT or "
            "PATH:TE_WEIGHT:UNET_WEIGHT."
        )
    path, sep, first = head.rpartition(":")
    te = _number(first) if sep and path else None
    return MergeInput(Path(head), unet, unet) if te is None else MergeInput(Path(path), te, unet)


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


@dataclass(frozen=True)
class CheckpointMergeReport:
    """What was written: the checkpoint, its version, how many tensors it holds, how many of them the LoRAs
    changed, and how many LoRA modules went in."""

    output: Path
    version: ModelVersion
    tensors: int
    changed: int
    modules: int


# One layer's share of a stored tensor: where it sits, the LoRA module and its multiplier.
_Part = tuple[WeightLocation, LoraModule, float]


def merge_into_checkpoint(
    base: Path,
    loras: list[MergeInput],
    output: Path,
    *,
    dtype: torch.dtype | None = None,
    device: str = "cpu",
    overwrite: bool = False,
    allow_pickle: bool = False,
    config_dir: Path | None = None,
) -> CheckpointMergeReport:
    """Write to `output` (.safetensors) the checkpoint `base` with `loras` fused in (see the module doc).

    dtype: the output's floating-point tensors (None: each as stored in the base). device: where the sums
    are formed ("cpu", "cuda"). allow_pickle: read a .ckpt/.pt base (whole, with torch.load(weights_only=
    True)); otherwise only .safetensors. config_dir: a diffusers folder whose configs name and size the
    layers (default: the full-size model of the base's version)."""
    base, output = Path(base), Path(output)
    if not loras:
        raise UserError("--lora: give the LoRAs to merge into --base, each as PATH or PATH:WEIGHT.")
    for lora in loras:
        if not (math.isfinite(lora.te_weight) and math.isfinite(lora.unet_weight)):
            raise UserError(f"--lora {lora.path}: the weights must be finite numbers, e.g. 0.7 or -1.")
    if output.suffix.lower() != ".safetensors":
        raise UserError(
            f"-o {output}: merge writes a .safetensors checkpoint; name the output *.safetensors."
        )
    check_output(output, overwrite=overwrite, inputs=[base, *(lora.path for lora in loras)])
    where = pick_device(device)
    with open_base(base, allow_pickle=allow_pickle) as ckpt:
        version = detect_model_version(ckpt.specs, base, "--base")
        model = meta_model(version, config_dir)
        stored = CheckpointLayout.of(model, ckpt.specs)
        opened = [open_on_base(lora.path, model, base, allow_pickle=allow_pickle) for lora in loras]
        parts = _parts(opened, loras, stored, ckpt, base)
        specs = [_output_spec(spec, dtype) for spec in ckpt.specs.values()]

        def produce(spec: TensorSpec) -> torch.Tensor:
            return _merged(ckpt.get(spec.name), parts.get(spec.name, []), where).to(spec.dtype)

        metadata = _metadata(ckpt, base, opened, loras, dtype)
        write_checkpoint(output, specs, produce, metadata, desc="merging")
    count = sum(len(lora.model.modules) for lora in opened)
    log.info("Fused %d LoRA modules into %d tensors of %s; wrote %s", count, len(parts), base, output)
    return CheckpointMergeReport(output, version, len(specs), len(parts), count)


def open_base(base: Path, *, allow_pickle: bool) -> CheckpointFile:
    """The base checkpoint, opened to be read tensor by tensor; UserError for a folder or a missing file."""
    if base.is_dir():
        raise UserError(
            f"--base {base}: a folder; give the model's single-file checkpoint (.safetensors), the layout "
            "the merged file is written in."
        )
    if not base.is_file():
        raise UserError(f"--base {base}: no such file; give the path of a .safetensors checkpoint.")
    return CheckpointFile(base, allow_pickle=allow_pickle, what="--base")


def open_on_base(path: Path, model: MetaModel, base: Path, *, allow_pickle: bool = False) -> OpenedLora:
    """The LoRA at `path` on the base's layers; UserError naming both when it was made for another version
    (its metadata or names tell), or naming its modules when they do not fit."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"--lora {path}: no such file; give the path of a LoRA .safetensors file.")
    tensors, metadata, layout = read_lora_input(path, "--lora", allow_pickle=allow_pickle)
    family = version_family(model.version)
    declared = declared_version(metadata)
    stated = lora_family(tensors, metadata)
    if declared not in (None, model.version) or stated not in (None, family):
        _refuse_version(path, declared or stated, model.version, base)
    try:
        lora = lora_model(tensors, metadata, layout, list(model.networks), family, path=path, key="--lora")
    except UserError:
        guessed = lora_family(tensors, metadata, guess=True)
        if guessed not in (None, family):
            _refuse_version(path, guessed, model.version, base)
        raise
    return OpenedLora(path, lora, model)


def declared_version(metadata: dict[str, str]) -> ModelVersion | None:
    """The version sd-scripts' metadata names (`ss_base_model_version`; else `ss_v2` "True": SD 2.x; its
    "False" says nothing, SDXL files have it too), if any."""
    declared = re.sub(r"[^a-z0-9]", "", metadata.get("ss_base_model_version", "").lower())
    if declared.startswith("flux"):
        return "flux1"
    if declared.startswith("sdxl"):
        return "sdxl"
    if declared.startswith(("sdv2", "sd2", "v2")) or (not declared and metadata.get("ss_v2") == "True"):
        return "sd_v2"
    if declared.startswith(("sdv1", "sd1", "v1")):
        return "sd_v1"
    return None


def _refuse_version(path: Path, lora: str, version: ModelVersion, base: Path) -> None:
    lora_name = VERSION_NAMES.get(lora, lora)
    raise UserError(
        f"--lora {path} is {a_or_an(lora_name)} LoRA and --base {base} {a_or_an(VERSION_NAMES[version])} "
        "checkpoint; merge a LoRA into the kind of model it was made for."
    )


def _parts(
    opened: list[OpenedLora],
    loras: list[MergeInput],
    stored: CheckpointLayout,
    ckpt: CheckpointFile,
    base: Path,
) -> dict[str, list[_Part]]:
    """Stored key → the LoRA modules that change it, after checking every module's place in the header.
    Modules of weight 0 change nothing and are left out (a FLUX transformer file has no place for a LoRA's
    text-encoder modules: they need te weight 0 there)."""
    weighted = [
        (module, merge_input.weight(module.component), lora.path)
        for lora, merge_input in zip(opened, loras, strict=True)
        for module in lora.model.modules
        if merge_input.weight(module.component) != 0
    ]
    _refuse_absent_components(weighted, stored, ckpt, base)
    stored.check(ckpt.shapes, [module.name for module, _, _ in weighted], what=f"--base {base}")
    parts: dict[str, list[_Part]] = defaultdict(list)
    for module, weight, _ in weighted:
        location = stored[module.name]
        parts[location.key].append((location, module, weight))
    return dict(parts)


def _refuse_absent_components(
    weighted: list[tuple[LoraModule, float, Path]], stored: CheckpointLayout, ckpt: CheckpointFile, base: Path
) -> None:
    """One sentence per LoRA whose modules adapt a component the base file does not hold at all (a FLUX
    transformer file has no text encoders)."""
    held = {name.partition(".")[0] for name, where in stored.locations.items() if where.key in ckpt.specs}
    problems = []
    for path in dict.fromkeys(p for _, _, p in weighted):
        absent = sorted({m.component for m, _, p in weighted if p == path and m.component not in held})
        if absent:
            problems.append(
                f"--base {base} holds no {' or '.join(absent)} weights, which --lora {path} adapts; give it "
                f"a text-encoder weight of 0 (--lora {path}:0:WEIGHT) to fuse its other modules, or a "
                "checkpoint that holds them too."
            )
    if problems:
        raise UserError(problems)


def _output_spec(spec: TensorSpec, dtype: torch.dtype | None) -> TensorSpec:
    if dtype is None or not spec.dtype.is_floating_point:
        return spec
    return TensorSpec(spec.name, dtype, spec.shape)


def _merged(stored: torch.Tensor, parts: list[_Part], device: torch.device) -> torch.Tensor:
    """`stored` plus every part's update, summed in float32 on `device`; `stored` itself when no part. The
    parts apply in order, each to the weight as the ones before left it (what a DoRA module's update
    depends on)."""
    if not parts:
        return stored
    work = stored.to(device=device, dtype=torch.float32, copy=True)
    for location, module, multiplier in parts:
        weight = location.weight(work) if module.dora_scale is not None else None
        location.add(work, lora_update(module, multiplier, device, weight=weight))
    return work.cpu()


def lora_update(
    module: LoraModule, multiplier: float, device: torch.device, *, weight: torch.Tensor | None = None
) -> torch.Tensor:
    """`multiplier · module.update()` in float32 on `device`, in the layer weight's shape: `(alpha / rank) ·
    up @ down` for a LoRA, LyCORIS' formulas for LoHa / LoKr, and for DoRA the DoRA weight of `weight` (the
    layer's current weight, required then) minus `weight`, as A1111 applies a multiplier to it."""
    on_device = replace(
        module,
        down=None if module.down is None else module.down.to(device),
        up=None if module.up is None else module.up.to(device),
        factors={suffix: t.to(device) for suffix, t in module.factors.items()},
        dora_scale=None if module.dora_scale is None else module.dora_scale.to(device),
    )
    return on_device.update(torch.float32, weight=weight) * multiplier


def _metadata(
    ckpt: CheckpointFile,
    base: Path,
    opened: list[OpenedLora],
    loras: list[MergeInput],
    dtype: torch.dtype | None,
) -> dict[str, str]:
    """The base's metadata with a history entry: the base and each LoRA with its hash and weights."""
    base_meta = dict(ckpt.metadata)
    if base.suffix.lower() == ".safetensors":
        base_meta["sshs_model_hash"] = file_model_hash(base)
    inputs: list[tuple[Path, dict[str, str], float | None]] = [(base, base_meta, None)]
    for lora, merge_input in zip(opened, loras, strict=True):
        meta = dict(lora.model.metadata)
        if lora.path.is_file():
            meta["sshs_model_hash"] = file_model_hash(lora.path)
        inputs.append((lora.path, meta, merge_input.unet_weight))
    params = {
        "te_weights": [lora.te_weight for lora in loras],
        "unet_weights": [lora.unet_weight for lora in loras],
        "precision": str(dtype).removeprefix("torch.") if dtype is not None else "as stored",
    }
    entry = history_entry("merge", inputs, **params)
    # output_metadata drops what goes stale in a LoRA; a checkpoint's `format` ("pt") stays true.
    kept = {"format": ckpt.metadata["format"]} if "format" in ckpt.metadata else {}
    return output_metadata(ckpt.metadata, entry, **kept)
