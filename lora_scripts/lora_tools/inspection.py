"""`lora-scripts inspect`: what a LoRA file is and how it was trained.

The family and version, layout and network type come from the file's modules resolved against the family's
full-size layers (lora_tools/files.py), not from its metadata alone; the training facts from sd-scripts'
`ss_*` metadata (ours, sd-scripts', kohya_ss' and OneTrainer's files carry it); the hashes are recomputed
from the file. Where it loads: the kohya names lora-scripts writes are the ones the A1111/Forge and ComfyUI
key-map tests accept (tests/export), so a kohya file whose every module carries that name loads there; any
other name is listed, and `convert --to kohya` rewrites it.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

from lora_scripts.export.hashes import file_model_hash
from lora_scripts.export.kohya import LoraNetwork
from lora_scripts.export.lora_layouts import component_networks
from lora_scripts.export.lora_model import LoraModel, LoraModule
from lora_scripts.export.lycoris import TYPE_NAMES
from lora_scripts.lora_tools.files import FAMILY_VERSIONS, HISTORY_KEY, OpenedLora, is_spatial, open_lora
from lora_scripts.models.detect import VERSION_NAMES
from lora_scripts.models.flux import FLUX_MODELSPEC_ARCHITECTURE

# The variant a file's `modelspec.architecture` names ("flux-1-dev/lora"), shown after its version.
VARIANTS = {architecture: variant for variant, architecture in FLUX_MODELSPEC_ARCHITECTURE.items()}

# sd-scripts' training keys worth showing, in this order, with a readable label.
TRAINING_KEYS = {
    "ss_output_name": "output name",
    "ss_sd_model_name": "base model",
    "ss_training_started_at": "started",
    "ss_training_finished_at": "finished",
    "ss_steps": "steps",
    "ss_max_train_steps": "planned steps",
    "ss_epoch": "epoch",
    "ss_num_epochs": "epochs planned",
    "ss_num_train_images": "training images (with repeats)",
    "ss_resolution": "resolution",
    "ss_batch_size_per_device": "batch size",
    "ss_gradient_accumulation_steps": "gradient accumulation",
    "ss_optimizer": "optimizer",
    "ss_learning_rate": "learning rate",
    "ss_unet_lr": "UNet learning rate",
    "ss_text_encoder_lr": "text encoder learning rate",
    "ss_lr_scheduler": "lr scheduler",
    "ss_network_module": "network module",
    "ss_network_dim": "network dim (rank)",
    "ss_network_alpha": "network alpha",
    "ss_network_args": "network args",
    "ss_mixed_precision": "mixed precision",
    "ss_clip_skip": "clip skip",
    "ss_noise_offset": "noise offset",
    "ss_min_snr_gamma": "min SNR gamma",
    "ss_seed": "seed",
    "ss_training_comment": "comment",
}
_TIMES = ("ss_training_started_at", "ss_training_finished_at")
TOP_TAGS = 15


@dataclass
class ComponentSummary:
    component: str
    modules: int  # adapted layers (a FLUX fused qkv / linear1 module counts once per part it adapts)
    conv_modules: int  # 3x3 LoCon convs
    ranks: dict[int | str, int]  # rank → modules (a LoKr whose factors are both full: "full")
    alphas: dict[float, int]  # alpha → modules
    parameters: int = 0  # the numbers its modules store (alphas aside)
    model: str = ""  # the component's class (UNet2DConditionModel, FluxTransformer2DModel, T5EncoderModel)
    kohya_prefix: str = ""  # how kohya files name it (lora_unet, lora_te1, lora_te3 ...)
    blocks: dict[str, int] = field(default_factory=dict)  # top-level part of its kohya path → modules


@dataclass
class Dataset:
    folder: str
    repeats: int | None
    images: int | None


@dataclass
class Inspection:
    path: str
    size_bytes: int
    layout: str
    family: str
    version: str
    network_type: str  # "LoRA", "LoCon", "LoHa", "LoKr" or "DoRA" (export/lycoris.py TYPE_NAMES)
    components: list[ComponentSummary]
    parameters: int  # the numbers the file's modules store (alphas aside)
    notes: list[str]  # what the report cannot show without the base model, and what works with the type
    training: dict[str, str]  # label → value, as TRAINING_KEYS orders them
    datasets: list[Dataset]
    top_tags: list[tuple[str, int]]
    hashes: dict[str, str]
    loads_in: dict[str, str]
    history: list[dict] = field(default_factory=list)


def inspect_lora(path: Path, *, config_dir: Path | None = None, allow_pickle: bool = False) -> Inspection:
    """Everything `inspect` shows about the LoRA at `path`."""
    opened = open_lora(Path(path), key="inspect", config_dir=config_dir, allow_pickle=allow_pickle)
    model, metadata = opened.model, opened.model.metadata
    summaries = _components(model, list(opened.base.networks))
    return Inspection(
        path=str(path),
        size_bytes=_size(Path(path)),
        layout=model.layout,
        family=model.family,
        version=_version_text(opened),
        network_type=network_type_name(model),
        components=summaries,
        parameters=sum(s.parameters for s in summaries),
        notes=type_notes(model),
        training=training_facts(metadata),
        datasets=dataset_folders(metadata),
        top_tags=top_tags(metadata),
        hashes=_hashes(Path(path), metadata),
        loads_in=loads_in(model, list(opened.base.networks)),
        history=_json(metadata.get(HISTORY_KEY), []),
    )


def network_type_name(model: LoraModel) -> str:
    """The file's network type as LyCORIS names it: LoRA (LoCon with 3x3 convs), LoHa, LoKr or DoRA."""
    kind = model.network_type
    if kind == "lora" and any(is_spatial(m) for m in model.modules):
        kind = "locon"
    return TYPE_NAMES[kind]


def type_notes(model: LoraModel) -> list[str]:
    """What inspect and the tools say of a LoHa, LoKr or DoRA file (none for a plain LoRA)."""
    kind = model.network_type
    if kind == "dora":
        return [
            "DoRA: each module also rescales its layer's weight per input channel (dora_scale), so its "
            "update depends on the base model's weights, which inspect does not read; `merge --base` "
            "applies it exactly.",
            "resize, merge into one LoRA and convert to diffusers / peft take plain LoRA only.",
        ]
    if kind in ("loha", "lokr"):
        what = "Hadamard product of two" if kind == "loha" else "Kronecker product of two"
        return [
            f"{TYPE_NAMES[kind]}: each update is the {what} factors (LyCORIS), not up @ down.",
            "merge --base applies it exactly; `merge --rank N` makes a plain LoRA of it by SVD; resize and "
            "convert to diffusers / peft take plain LoRA only.",
        ]
    return []


def _version_text(opened: OpenedLora) -> str:
    metadata = opened.model.metadata
    declared = metadata.get("ss_base_model_version")
    name = VERSION_NAMES[opened.version]
    variant = VARIANTS.get(metadata.get("modelspec.architecture", "").lower().split("/")[0])
    if variant is not None:
        return f"{name} {variant}"
    if len(FAMILY_VERSIONS[opened.model.family]) == 1 or declared or metadata.get("ss_v2"):
        return name
    # An SD LoRA that does not say: its layers exist in both 1.x and 2.x unless a text-encoder or
    # cross-attention width tells them apart, which resolving tried 1.x first for.
    return f"{name} (the file does not say; its layers fit it)"


def _components(model: LoraModel, networks: list[LoraNetwork]) -> list[ComponentSummary]:
    nets = component_networks(networks)
    out = []
    for component in model.components():
        modules = [m for m in model.modules if m.component == component]
        net = nets[component]
        blocks = Counter(_block(net, m.path.removeprefix(net.name_prefix)) for m in modules)
        out.append(
            ComponentSummary(
                component=component,
                modules=len(modules),
                conv_modules=sum(is_spatial(m) for m in modules),
                ranks=_ranks(modules),
                alphas=dict(sorted(Counter(m.alpha for m in modules).items())),
                parameters=sum(m.parameter_count() for m in modules),
                model=type(net.module).__name__,
                kohya_prefix=net.kohya_prefix,
                blocks=dict(blocks),
            )
        )
    return out


def _ranks(modules: list[LoraModule]) -> dict[int | str, int]:
    """rank → modules, ascending; a LoKr module whose two factors are both full (rank 0) as "full", last."""
    counts = Counter(m.rank for m in modules)
    out: dict[int | str, int] = {rank: n for rank, n in sorted(counts.items()) if rank}
    if counts.get(0):
        out["full"] = counts[0]
    return out


def _block(net: LoraNetwork, path: str) -> str:
    """The top-level part of a layer's path in kohya files (`double_blocks`, `input_blocks`, `down_blocks`,
    `text_model`, `encoder` ...), what the module counts are broken down by."""
    try:
        return net.file_path(path).split(".")[0]
    except ValueError:  # a layer kohya files have no name for
        return path.split(".")[0]


def training_facts(metadata: dict[str, str]) -> dict[str, str]:
    """sd-scripts' training keys present in `metadata`, label → value (TRAINING_KEYS' labels and order)."""
    out = {}
    for key, label in TRAINING_KEYS.items():
        value = metadata.get(key)
        if value in (None, "", "None"):
            continue
        if key in _TIMES:
            try:
                value = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(float(value)))
            except (ValueError, OverflowError):
                pass
        out[label] = value
    return out


def dataset_folders(metadata: dict[str, str]) -> list[Dataset]:
    """sd-scripts' `ss_dataset_dirs` ({folder: {n_repeats, img_count}}), or the subsets of `ss_datasets`
    (its dataset-config runs)."""
    dirs = _json(metadata.get("ss_dataset_dirs"), {})
    out = [
        Dataset(folder, _int(info.get("n_repeats")), _int(info.get("img_count")))
        for folder, info in dirs.items()
        if isinstance(info, dict)
    ]
    if out:
        return out
    for dataset in _json(metadata.get("ss_datasets"), []):
        for subset in dataset.get("subsets", []) if isinstance(dataset, dict) else []:
            folder = subset.get("image_dir") or subset.get("metadata_file") or "?"
            out.append(Dataset(str(folder), _int(subset.get("num_repeats")), _int(subset.get("img_count"))))
    return out


def top_tags(metadata: dict[str, str]) -> list[tuple[str, int]]:
    """The most frequent caption tags over all folders (`ss_tag_frequency`: {folder: {tag: count}})."""
    counts: Counter[str] = Counter()
    frequency = _json(metadata.get("ss_tag_frequency"), {})
    if not frequency:
        for dataset in _json(metadata.get("ss_datasets"), []):
            if isinstance(dataset, dict):
                frequency.update(dataset.get("tag_frequency") or {})
    for tags in frequency.values():
        if isinstance(tags, dict):
            counts.update({str(tag): _int(n) or 0 for tag, n in tags.items()})
    return counts.most_common(TOP_TAGS)


def _hashes(path: Path, metadata: dict[str, str]) -> dict[str, str]:
    """The hashes WebUIs show, recomputed: A1111's LoRA hash (sd-scripts' sshs_model_hash: sha256 of the
    tensor data; infotext shows its first 12 characters) and Civitai's AutoV2 (sha256 of the whole file,
    first 10)."""
    if path.is_dir() or path.suffix.lower() != ".safetensors":
        return {}
    model_hash = file_model_hash(path)
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    recorded = metadata.get("sshs_model_hash")
    return {
        "A1111 LoRA hash (sshs_model_hash)": model_hash[:12],
        "sshs_model_hash in the metadata": (
            "missing" if not recorded else "matches" if recorded == model_hash else f"stale ({recorded[:12]})"
        ),
        "Civitai AutoV2": digest.hexdigest()[:10].upper(),
        "sha256": digest.hexdigest(),
    }


def loads_in(model: LoraModel, networks: list[LoraNetwork]) -> dict[str, str]:
    """Where the file loads as it is, per tool, with what to do where it does not."""
    convert_hint = "convert it with `lora-scripts convert FILE -o OUT --to kohya`"
    diffusers = _diffusers_loads(model)
    if model.layout == "peft":
        note = f"no (a peft adapter folder); {convert_hint}"
        return {
            "A1111/Forge": note,
            "ComfyUI": note,
            "diffusers": "PeftModel.from_pretrained per component, or `convert --to diffusers`",
        }
    if model.layout == "diffusers":
        note = f"no (they read kohya names); {convert_hint}"
        return {"A1111/Forge": note, "ComfyUI": note, "diffusers": diffusers}
    nets = component_networks(networks)
    renamed = [
        m.source
        for m in model.modules
        if m.source != nets[m.component].file_name(m.path.removeprefix(nets[m.component].name_prefix))
    ]
    if renamed:
        note = (
            f"not sure: {len(renamed)} of {len(model.modules)} modules use another spelling than sd-scripts' "
            f"(e.g. '{renamed[0]}'); {convert_hint} to rename them"
        )
        return {"A1111/Forge": note, "ComfyUI": note, "diffusers": diffusers}
    everything = f"yes, all {len(model.modules)} modules"
    return {"A1111/Forge": everything, "ComfyUI": everything, "diffusers": diffusers}


def _diffusers_loads(model: LoraModel) -> str:
    """Whether diffusers' `load_lora_weights` applies the file as it means: LyCORIS' LoHa / LoKr keys are not
    read for SD / SDXL, and it reads a kohya `dora_scale` as peft's magnitude per output channel, where
    this one is per input channel (export/lycoris.py)."""
    if model.plain:
        return "yes (load_lora_weights)"
    why = {
        "dora": "its dora_scale is per input channel, diffusers' DoRA per output channel",
        "loha": "its LoHa keys are not read for this family",
        "lokr": "its LoKr keys are not read for this family",
    }[model.network_type]
    return f"no ({why}); fuse it into a checkpoint with `lora-scripts merge --base`"


# --- output -------------------------------------------------------------------------------------------------


def to_json(inspection: Inspection) -> str:
    return json.dumps(asdict(inspection), indent=2, default=str)


def format_inspection(ins: Inspection) -> str:
    """The report as aligned plain text."""
    lines = [
        f"{ins.path}  ({ins.size_bytes / 2**20:.1f} MiB)",
        "",
        *_rows(
            {
                "model": f"{ins.version}  ({ins.family} family)",
                "layout": ins.layout,
                "network": ins.network_type,
                "parameters": f"{ins.parameters:,}",
            }
        ),
        *(f"  {note}" for note in ins.notes),
        "",
        "modules",
    ]
    for s in ins.components:
        ranks = ", ".join(f"{rank}×{n}" if len(s.ranks) > 1 else str(rank) for rank, n in s.ranks.items())
        alphas = ", ".join(
            f"{_num(alpha)}×{n}" if len(s.alphas) > 1 else _num(alpha) for alpha, n in s.alphas.items()
        )
        conv = f" ({s.conv_modules} 3x3 conv)" if s.conv_modules else ""
        lines.append(
            f"  {s.component:<15} {s.modules:>4} modules{conv}   rank {ranks}   alpha {alphas}   "
            f"{s.parameters:,} parameters   ({s.kohya_prefix}: {s.model})"
        )
        if len(s.blocks) > 1:
            lines.append("  " + " " * 16 + ", ".join(f"{block} {n}" for block, n in s.blocks.items()))
    if ins.training:
        lines += ["", "training", *_rows(ins.training, indent=2)]
    if ins.datasets:
        lines += ["", "datasets"]
        for d in ins.datasets:
            lines.append(f"  {d.folder}: {_or_unknown(d.images)} images × {_or_unknown(d.repeats)} repeats")
    if ins.top_tags:
        lines += ["", "most frequent tags", "  " + ", ".join(f"{tag} ({n})" for tag, n in ins.top_tags)]
    if ins.hashes:
        lines += ["", "hashes", *_rows({k: v for k, v in ins.hashes.items() if k != "sha256"}, indent=2)]
    lines += ["", "loads in", *_rows(ins.loads_in, indent=2)]
    if ins.history:
        lines += ["", "made by lora-scripts tools"]
        for entry in ins.history:
            inputs = ", ".join(
                i.get("file", "?") + (f":{i['weight']}" if i.get("weight") is not None else "")
                for i in entry.get("inputs", [])
            )
            lines.append(
                f"  {entry.get('at', '?')}  {entry.get('tool', '?')}  {inputs}  {entry.get('params', {})}"
            )
    return "\n".join(lines)


def _rows(values: dict[str, str], indent: int = 0) -> list[str]:
    width = max((len(k) for k in values), default=0)
    return [f"{' ' * indent}{key:<{width}}  {value}" for key, value in values.items()]


def _num(value: float) -> str:
    return f"{value:g}"


def _or_unknown(value: int | None) -> str:
    return "?" if value is None else str(value)


def _int(value: object) -> int | None:
    try:
        return int(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None


def _json(text: str | None, default):
    try:
        value = json.loads(text) if text else default
    except json.JSONDecodeError:
        return default
    return value if isinstance(value, type(default)) else default


def _size(path: Path) -> int:
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size
