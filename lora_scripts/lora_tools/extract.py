"""`lora-scripts extract`: a LoRA from the difference of a fine-tuned checkpoint and its base, each layer's
difference ΔW = W_tuned − W_base replaced by its best rank-r approximation (truncated SVD, Eckart–Young;
lora_tools/svd.py) with alpha = r, so the loaders' scale alpha / rank is 1 and `up @ down ≈ ΔW`.

The layers are those sd-scripts' networks/extract_lora_from_models.py targets, its LoRA network's
(models/lora_presets.py `kohya`): the Linear and 1x1-conv layers of the UNet's transformer blocks, the text
encoders' attention and MLP, and with a conv rank (LoCon) the 3x3 convs of the ResNet blocks and the down-
and upsamplers, with those blocks' Linear / 1x1 layers at the linear rank, as sd-scripts' conv_dim adds them.

What is left out, as sd-scripts does: a text encoder whose largest |ΔW| over its layers is at most `min_diff`
(fine-tunes often leave the text encoder frozen, and fp16 round trips leave noise of that order); here each
encoder is judged on its own (sd-scripts judges SDXL's two together). And any layer whose difference is
exactly zero: it has nothing to extract. Unlike sd-scripts, the factors are not clamped to a quantile, which
would make them no longer the best approximation.

FLUX.1 (a BFL transformer file, or an all-in-one file with its text encoders): the layers of sd-scripts'
FLUX LoRA network (every Linear of the double and single blocks), q/k/v and a single block's MLP input each
extracted on its own from its rows of the fused `qkv` / `linear1` tensor and written block-diagonal
(export/fused.py). A component neither file holds (the text encoders of a transformer file) is left out.

Each extracted layer reports the fraction of ‖ΔW‖_F its rank keeps, sqrt(Σ_{i<r} sᵢ² / Σ sᵢ²). Both
checkpoints are read one tensor at a time (models/checkpoint_file.py); memory holds one layer's pair.
"""

from __future__ import annotations

import logging
import statistics
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from lora_scripts.devices import pick_device
from lora_scripts.errors import UserError
from lora_scripts.export.hashes import file_model_hash
from lora_scripts.export.lora_layouts import LAYOUTS, component_networks
from lora_scripts.export.lora_model import DENOISERS, LoraModel, LoraModule
from lora_scripts.export.lora_reader import SD_FAMILY, version_family
from lora_scripts.lora_tools.files import (
    a_or_an,
    check_output,
    history_entry,
    lora_facts,
    output_metadata,
    save_lora,
)
from lora_scripts.lora_tools.svd import low_rank, retained_fro
from lora_scripts.models.checkpoint_file import CheckpointFile
from lora_scripts.models.checkpoint_layout import CheckpointLayout, WeightLocation
from lora_scripts.models.detect import VERSION_NAMES, ModelVersion, detect_model_version
from lora_scripts.models.lora_presets import TEXT_ENCODER_PRESETS, resolve_targets, unet_lora_layers
from lora_scripts.models.meta_modules import MetaModel, meta_model
from lora_scripts.models.registry import FAMILIES

log = logging.getLogger(__name__)

MIN_DIFF = 0.01  # sd-scripts' default min_diff


@dataclass(frozen=True)
class Target:
    """A layer to extract: its `LoraModule` name parts, where it is stored, and the rank it gets."""

    component: str
    path: str
    location: WeightLocation
    rank: int

    @property
    def name(self) -> str:
        return f"{self.component}.{self.path}"


@dataclass(frozen=True)
class ExtractedModule:
    """One extracted layer: its rank and the fraction of ‖ΔW‖_F that rank keeps."""

    name: str
    rank: int
    retained: float


@dataclass(frozen=True)
class ExtractReport:
    """What was written: the LoRA, the version, each extracted layer, the layers whose difference was zero,
    and the text encoders left out (with their largest |ΔW|)."""

    output: Path
    version: ModelVersion
    modules: list[ExtractedModule]
    unchanged: list[str]
    text_encoders_left_out: dict[str, float]

    @property
    def mean_retained(self) -> float:
        """The retained Frobenius fraction averaged over the extracted layers."""
        return statistics.fmean(m.retained for m in self.modules)

    @property
    def least_retained(self) -> ExtractedModule:
        return min(self.modules, key=lambda m: m.retained)


def extract_lora(
    base: Path,
    tuned: Path,
    output: Path,
    *,
    rank: int,
    conv_rank: int | None = None,
    min_diff: float = MIN_DIFF,
    layout: str = "kohya",
    dtype: torch.dtype | None = torch.float16,
    device: str = "cpu",
    overwrite: bool = False,
    allow_pickle: bool = False,
    config_dir: Path | None = None,
) -> ExtractReport:
    """Write to `output` a LoRA of `rank` (3x3 convs: `conv_rank`, None: none) approximating `tuned` −
    `base`, two single-file checkpoints of one version (see the module doc).

    min_diff: leave out a text encoder whose largest |difference| is at most this. layout: "kohya",
    "diffusers" or "peft". dtype: the LoRA's (None: float32). device: where the SVDs run. allow_pickle:
    read .ckpt/.pt checkpoints (whole, with torch.load(weights_only=True)). config_dir: a diffusers folder
    whose configs name and size the layers (default: the full-size model of the checkpoints' version)."""
    base, tuned, output = Path(base), Path(tuned), Path(output)
    _check_options(rank, conv_rank, min_diff, layout)
    check_output(output, overwrite=overwrite, inputs=[base, tuned])
    where = pick_device(device)
    with _open(base, "--base", allow_pickle) as old, _open(tuned, "--tuned", allow_pickle) as new:
        version = detect_model_version(old.specs, base, "--base")
        tuned_version = detect_model_version(new.specs, tuned, "--tuned")
        if tuned_version != version:
            raise UserError(
                f"--tuned {tuned} is {a_or_an(VERSION_NAMES[tuned_version])} checkpoint and --base {base} "
                f"{a_or_an(VERSION_NAMES[version])} one; extract from a model and the base it was fine-tuned "
                "from."
            )
        if conv_rank is not None and not FAMILIES[version].has_convs:
            raise UserError(
                f"--conv-rank {conv_rank}: {VERSION_NAMES[version]} models have no convolutions to extract "
                "(LoCon); leave it out."
            )
        model = meta_model(version, config_dir)
        stored = CheckpointLayout.of(model, old.specs)
        targets = _held(extraction_targets(model, stored, rank, conv_rank), old, base)
        names = [t.name for t in targets]
        stored.check(old.shapes, names, what=f"--base {base}")
        stored.check(new.shapes, names, what=f"--tuned {tuned}")
        left_out = _quiet_text_encoders(targets, old, new, min_diff)
        targets = [t for t in targets if t.component not in left_out]
        modules, report, unchanged = _extract(targets, old, new, where)
    if not modules:
        raise UserError(
            f"--tuned {tuned}: no layer differs from --base {base}; there is nothing to extract (is it the "
            "same model?)."
        )
    lora = LoraModel(family=version_family(version) or SD_FAMILY, modules=modules, layout=layout)
    inputs = [(path, {"sshs_model_hash": _hash(path)}, None) for path in (base, tuned)]
    params = {"rank": rank, "conv_rank": conv_rank, "min_diff": min_diff}
    metadata = output_metadata({}, history_entry("extract", inputs, **params), **lora_facts(lora, version))
    save_lora(output, lora, model, metadata, layout=layout, dtype=dtype or torch.float32)
    result = ExtractReport(output, version, report, unchanged, left_out)
    log.info(
        "Extracted %d layers (%d unchanged, text encoders left out: %s); on average they keep %.1f%% of the "
        "difference's Frobenius norm (least: %s, %.1f%%). Wrote %s",
        len(modules),
        len(unchanged),
        ", ".join(left_out) or "none",
        100 * result.mean_retained,
        result.least_retained.name,
        100 * result.least_retained.retained,
        output,
    )
    return result


def _check_options(rank: int, conv_rank: int | None, min_diff: float, layout: str) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}")
    problems = [
        f"{flag} {value}: give a rank of 1 or more."
        for flag, value in (("--rank", rank), ("--conv-rank", conv_rank))
        if value is not None and value < 1
    ]
    if not min_diff >= 0:
        problems.append(f"--min-diff {min_diff}: give 0 or more (0 keeps every text encoder that changed).")
    if problems:
        raise UserError(problems)


def _open(path: Path, option: str, allow_pickle: bool) -> CheckpointFile:
    if not path.is_file():
        raise UserError(f"{option} {path}: no such file; give the path of a .safetensors checkpoint.")
    return CheckpointFile(path, allow_pickle=allow_pickle, what=option)


def extraction_targets(
    model: MetaModel, stored: CheckpointLayout, rank: int, conv_rank: int | None
) -> list[Target]:
    """The layers of `model` sd-scripts' extract adapts (see the module doc), with their locations in
    `stored` (the model's checkpoint layout) and their ranks."""
    family = FAMILIES[model.version]
    targets = []
    for component, net in component_networks(list(model.networks)).items():
        if component in DENOISERS and family.has_convs:
            linear, convs = unet_lora_layers(net.module, "kohya", conv=conv_rank is not None)
            ranked = [(path, rank) for path in linear] + [(path, conv_rank) for path in convs]
        elif component in DENOISERS:
            paths = resolve_targets(
                net.module, "kohya", key="extract", component=component, presets=family.denoiser_presets
            )
            ranked = [(path, rank) for path in paths]
        else:
            paths = resolve_targets(
                net.module, "kohya", key="extract", component=component, presets=TEXT_ENCODER_PRESETS
            )
            ranked = [(net.name_prefix + path, rank) for path in paths]
        for path, layer_rank in ranked:
            targets.append(Target(component, path, stored[f"{component}.{path}"], layer_rank))
    return targets


def _held(targets: list[Target], old: CheckpointFile, base: Path) -> list[Target]:
    """The targets of the components the base file holds (a FLUX transformer file has no text encoders);
    the others are left out, with a log line."""
    held = {t.component for t in targets if t.location.key in old.specs}
    for component in sorted({t.component for t in targets} - held):
        log.info("%s: --base %s holds no %s weights; left out.", component, base, component)
    return [t for t in targets if t.component in held]


def _quiet_text_encoders(
    targets: list[Target], old: CheckpointFile, new: CheckpointFile, min_diff: float
) -> dict[str, float]:
    """The text encoders whose largest |ΔW| over their targeted layers is at most `min_diff`, with it."""
    largest: dict[str, float] = defaultdict(float)
    for key, group in _by_key([t for t in targets if t.component not in DENOISERS]).items():
        before, after = old.get(key), new.get(key)
        for target in group:
            difference = _difference(target.location, before, after, torch.device("cpu"))
            largest[target.component] = max(largest[target.component], float(difference.abs().max()))
    left_out = {component: value for component, value in largest.items() if value <= min_diff}
    for component, value in left_out.items():
        log.warning(
            "%s differs by at most %.3g (≤ min_diff %g): left out, as sd-scripts does.",
            component,
            value,
            min_diff,
        )
    return left_out


def _extract(
    targets: list[Target], old: CheckpointFile, new: CheckpointFile, device: torch.device
) -> tuple[list[LoraModule], list[ExtractedModule], list[str]]:
    """Each target's low-rank factors (LoraModule, alpha = rank), its report, and the unchanged layers."""
    modules, report, unchanged = [], [], []
    groups = _by_key(targets)
    for key, group in tqdm(groups.items(), desc="extracting", unit="tensor", leave=False):
        before, after = old.get(key), new.get(key)
        for target in group:
            difference = _difference(target.location, before, after, device)
            if not bool(difference.any()):
                unchanged.append(target.name)
                continue
            module, retained = _low_rank_module(target, difference, device)
            modules.append(module)
            report.append(ExtractedModule(target.name, module.rank, retained))
    return modules, report, unchanged


def _by_key(targets: list[Target]) -> dict[str, list[Target]]:
    """Targets by stored key (OpenCLIP's q, k and v share one), in the targets' order."""
    groups: dict[str, list[Target]] = {}
    for target in targets:
        groups.setdefault(target.location.key, []).append(target)
    return groups


def _difference(
    location: WeightLocation, before: torch.Tensor, after: torch.Tensor, device: torch.device
) -> torch.Tensor:
    """W_tuned − W_base of one layer, float32 on `device`, in the layer's shape."""
    new = location.weight(after).to(device=device, dtype=torch.float32)
    return new - location.weight(before).to(device=device, dtype=torch.float32)


def _low_rank_module(
    target: Target, difference: torch.Tensor, device: torch.device
) -> tuple[LoraModule, float]:
    shape = tuple(difference.shape)
    up, down, singular_values = low_rank(difference.flatten(1), target.rank, device=device)
    rank = up.shape[1]
    down = down.to("cpu").reshape(rank, *shape[1:]).contiguous()
    up = up.to("cpu").reshape(shape[0], rank, *[1] * (len(shape) - 2)).contiguous()
    module = LoraModule(target.component, target.path, down, up, float(rank), source=target.name)
    return module, retained_fro(singular_values, rank)


def _hash(path: Path) -> str:
    """sd-scripts' sshs_model_hash of a .safetensors file ("" for a pickle checkpoint: it has no header)."""
    return file_model_hash(path) if path.suffix.lower() == ".safetensors" else ""
