"""The facts of one check, and their two renderings: a screen of text and one JSON object (docs/check.md).

A section is None when it could not be worked out (an invalid config, a dataset with blocking problems,
a base model that cannot be used); the reasons are in `errors`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from lora_scripts.checks.captions import CaptionReport
from lora_scripts.checks.findings import named
from lora_scripts.checks.images import ImageFacts, ImageReport, aspect_ratio
from lora_scripts.checks.lora_file import LoraFileFacts
from lora_scripts.checks.plan import NetworkFacts, OutputFacts, PlanFacts, SpeedFacts
from lora_scripts.export.lycoris import TYPE_NAMES
from lora_scripts.models.detect import VERSION_NAMES
from lora_scripts.training.run_lock import LockStatus
from lora_scripts.training.saving import SAVE_DTYPES

JSON_FORMAT_VERSION = 1  # bumped when a key is renamed or removed (new keys may appear at any time)
LOCK_HOLDER_KEYS = ("pid", "host", "started", "command")  # null when the lock file is unreadable
_SHOWN = 4  # items listed per line of the text view (the JSON lists all)
_TOP_SHOWN = 8  # most frequent tags and words shown
# The label column of the text view: its longest fixed label ("transformer weights", FLUX.1's denoiser row)
# and a space; a longer label (none today) still gets one space.
_LABEL_WIDTH = len("transformer weights")
_PRECISIONS = {dtype: name for name, dtype in SAVE_DTYPES.items()}  # torch.float16 -> "fp16"


@dataclass(frozen=True)
class DatasetFacts:
    """The dataset as found on disk. `images_captioned` is None when it has blocking problems."""

    train_data_dir: Path
    metadata_path: Path | None  # None: captions from .txt files beside the images
    images_found: int
    images_captioned: int | None
    other_folders: tuple[Path, ...] = ()  # further datasets and the regularization folder, counted too
    caption_extension: str = ".txt"


@dataclass(frozen=True)
class CheckReport:
    """Everything `lora-scripts check` says about a config. Training can start when `errors` is empty."""

    config_path: str
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    resolution: int | None = None
    dataset: DatasetFacts | None = None
    images: ImageReport | None = None
    captions: CaptionReport | None = None
    plan: PlanFacts | None = None
    network: NetworkFacts | None = None
    outputs: OutputFacts | None = None
    speed: SpeedFacts | None = None

    @property
    def ok(self) -> bool:
        return not self.errors


# --- JSON ---------------------------------------------------------------------------------------------------


def report_to_json(report: CheckReport) -> dict[str, Any]:
    """The report as plain JSON types, with the keys documented in docs/check.md."""
    return {
        "format_version": JSON_FORMAT_VERSION,
        "config": report.config_path,
        "ok": report.ok,
        "errors": list(report.errors),
        "warnings": list(report.warnings),
        "dataset": _dataset_json(report.dataset),
        "images": _images_json(report.images, report.resolution),
        "captions": _captions_json(report.captions),
        "plan": _plan_json(report.plan),
        "network": _network_json(report.network),
        "outputs": _outputs_json(report.outputs),
        "speed": None if report.speed is None else asdict(report.speed),
    }


def _dataset_json(dataset: DatasetFacts | None) -> dict[str, Any] | None:
    if dataset is None:
        return None
    return {
        "train_data_dir": str(dataset.train_data_dir),
        "metadata_path": None if dataset.metadata_path is None else str(dataset.metadata_path),
        "images_found": dataset.images_found,
        "images_captioned": dataset.images_captioned,
        "other_folders": [str(folder) for folder in dataset.other_folders],
    }


def _images_json(images: ImageReport | None, resolution: int | None) -> dict[str, Any] | None:
    if images is None:
        return None
    return {
        "scanned": images.scanned,
        "unreadable": images.unreadable,
        "exact_duplicates": images.exact_duplicates,
        "near_duplicates": [
            {"files": [p.first, p.second], "distance": p.distance} for p in images.near_duplicates
        ],
        "resolution": resolution,
        "smaller_than_resolution": [_size(f) for f in images.too_small],
        "extreme_aspect_ratio": [
            {**_size(f), "ratio": round(aspect_ratio(f), 2)} for f in images.extreme_aspect
        ],
    }


def _size(facts: ImageFacts) -> dict[str, Any]:
    return {"file_name": facts.file_name, "width": facts.width, "height": facts.height}


def _captions_json(captions: CaptionReport | None) -> dict[str, Any] | None:
    if captions is None:
        return None
    return {
        "count": captions.count,
        "clip_token_limit": captions.token_limit,  # kept for format_version 1; see token_limit
        "token_limit": captions.token_limit,
        "text_encoder": captions.text_encoder,
        "longest_tokens": captions.longest_tokens,
        "too_long": [
            {"file_name": c.file_name, "tokens": c.tokens, "cut_off": c.cut_off} for c in captions.too_long
        ],
        "top_tags": [{"tag": tag, "count": count} for tag, count in captions.top_tags],
        "top_words": [{"word": word, "count": count} for word, count in captions.top_words],
        "trigger_word": captions.trigger_word,
        "without_trigger": captions.without_trigger,
        "trigger_cut_off": captions.trigger_cut_off,
    }


def _plan_json(plan: PlanFacts | None) -> dict[str, Any] | None:
    if plan is None:
        return None
    return {
        "num_images": plan.num_images,
        "num_reg_images": plan.num_reg_images,
        "samples_per_epoch": plan.num_samples,
        "train_samples_per_epoch": plan.num_train_samples,
        "buckets": [{"width": w, "height": h, "samples": n} for (w, h), n in plan.bucket_counts.items()],
        "num_processes": plan.num_processes,
        "batch_size": plan.batch_size,
        "gradient_accumulation_steps": plan.gradient_accumulation_steps,
        "effective_batch_size": plan.effective_batch_size,
        "batches_per_epoch": plan.batches_per_epoch,
        "steps_per_epoch": plan.steps_per_epoch,
        "epochs": plan.epochs,
        "total_steps": plan.total_steps,
        "limited_by": plan.limited_by,
    }


def _network_json(network: NetworkFacts | None) -> dict[str, Any] | None:
    if network is None:
        return None
    return {
        "base_model_kind": network.base_model_kind,
        "sd_version": network.sd_version,
        "architecture_from": str(network.architecture_from),
        "rank": network.rank,
        "alpha": network.alpha,
        "network_type": network.kind.type,
        "lokr_factor": network.kind.lokr_factor if network.kind.type == "lokr" else None,
        "lokr_full_matrix": network.kind.lokr_full_matrix if network.kind.type == "lokr" else None,
        "conv_rank": network.conv_rank,
        "conv_alpha": network.conv_alpha,
        "trainable_parameters": {
            "unet": network.unet_parameters,
            "text_encoder": network.text_encoder_parameters,
            "total": network.total_parameters,
        },
        "file": None if network.file is None else _file_json(network.file),
    }


def _file_json(file: LoraFileFacts) -> dict[str, Any]:
    return {
        "bytes": file.bytes,  # the whole .safetensors file but training's metadata
        "tensor_bytes": file.tensor_bytes,
        "tensors": file.tensors,
        "modules": file.modules,
        "save_precision": _PRECISIONS[file.dtype],
        "metadata_included": False,
    }


def _outputs_json(outputs: OutputFacts | None) -> dict[str, Any] | None:
    if outputs is None:
        return None
    return {
        "output_dir": str(outputs.output_dir),
        "output_name": outputs.output_name,
        "step_files": outputs.step_files,
        "final_files": outputs.final_files,
        "config_file": outputs.config_file,
        "logging_dir": str(outputs.logging_dir),
        "existing_files": outputs.existing_files,
        "exists": outputs.exists,
        "writable": outputs.writable_problem is None,
        "lock": _lock_json(outputs.lock),
    }


def _lock_json(lock: LockStatus | None) -> dict[str, Any] | None:
    if lock is None:
        return None
    holder = asdict(lock.holder) if lock.holder is not None else dict.fromkeys(LOCK_HOLDER_KEYS)
    return {"file": str(lock.path), "state": lock.state, **holder}


# --- text ---------------------------------------------------------------------------------------------------


def render_text(report: CheckReport) -> str:
    """The report as one screen of text (warnings included; errors are printed apart, on stderr)."""
    lines = [f"Check of {report.config_path}"]
    if report.dataset is not None:
        lines += _dataset_lines(report.dataset, report.images, report.resolution)
    if report.captions is not None:
        lines += _caption_lines(report.captions)
    elif report.dataset is not None:
        lines += ["", "Captions and plan: checked once the dataset problems below are fixed"]
    if report.plan is not None:
        lines += _plan_lines(report.plan)
    if report.network is not None:
        lines += _network_lines(report.network)
    if report.outputs is not None:
        lines += _output_lines(report.outputs)
    if report.speed is not None:
        lines += _speed_lines(report.speed)
    if report.warnings:
        lines += ["", *(f"warning: {message}" for message in report.warnings)]
    lines.append("")
    if report.ok:
        lines.append(f"Ready to train ({_count(len(report.warnings), 'warning')}).")
    else:
        lines.append(f"Cannot train: {_count(len(report.errors), 'problem')} (listed below).")
    return "\n".join(lines) + "\n"


def _speed_lines(speed: SpeedFacts) -> list[str]:
    def cache(on: bool, why: str) -> str:
        return "on" if on else f"off ({why})"

    batch = f"batch_size {speed.batch_size} x gradient_accumulation_steps {speed.gradient_accumulation_steps}"
    return [
        "",
        f"Speed and memory: memory_profile {speed.memory_profile}",
        _row("latent cache", cache(speed.cache_latents, speed.cache_latents_why)),
        _row("text cache", cache(speed.cache_text_encoder_outputs, speed.cache_text_encoder_outputs_why)),
        _row(
            "memory",
            f"gradient_checkpointing {'on' if speed.gradient_checkpointing else 'off'}, mixed_precision "
            f"{speed.mixed_precision}, optimizer {speed.optimizer_type}, {batch}",
        ),
        _row(f"{speed.denoiser} weights", _denoiser_weights(speed)),
        _row("torch_compile", "on" if speed.torch_compile else "off"),
    ] + _swap_lines(speed)


def _swap_lines(speed: SpeedFacts) -> list[str]:
    """blocks_to_swap: the blocks and the bytes of frozen weights that wait on the CPU instead of the GPU."""
    if not speed.blocks_to_swap:
        return []
    if speed.quantize_base != "no":
        size = f"~{speed.swapped_parameters / 2**30:.1f} GiB in 8 bits"
    else:
        per = 4 if speed.mixed_precision == "no" else 2
        dtype = {"no": "fp32", "fp16": "fp16", "bf16": "bf16"}[speed.mixed_precision]
        size = f"{per * speed.swapped_parameters / 2**30:.1f} GiB in {dtype}"
    text = (
        f"{speed.blocks_to_swap}: {speed.swapped_blocks} blocks' frozen weights ({size}) wait on the CPU, "
        "each copied to the GPU for its forward and its recompute"
    )
    return [_row("blocks_to_swap", text)]


def _denoiser_weights(speed: SpeedFacts) -> str:
    if speed.quantize_base != "no":
        return f"{speed.quantize_base} (quantize_base), LoRA in fp32"
    dtype = {"no": "fp32", "fp16": "fp16", "bf16": "bf16"}[speed.mixed_precision]
    return f"{dtype} (mixed_precision), LoRA in fp32"


def _count(n: int, word: str, plural: str | None = None) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {plural or word + 's'}"


def _row(label: str, text: str) -> str:
    return f"  {label:<{_LABEL_WIDTH}} {text}"


def _listed(summary: str, items: list[str]) -> str:
    """'3 pairs: a, b, c' (the first _SHOWN items), or just the summary when there are none."""
    return f"{summary}: {named(items, _SHOWN)}" if items else summary


def _dataset_lines(dataset: DatasetFacts, images: ImageReport | None, resolution: int | None) -> list[str]:
    source = (
        f"captions from {dataset.metadata_path}"
        if dataset.metadata_path
        else f"captions from {dataset.caption_extension} files"
    )
    captioned = "?" if dataset.images_captioned is None else str(dataset.images_captioned)
    folders = " + ".join(str(folder) for folder in (dataset.train_data_dir, *dataset.other_folders))
    lines = ["", f"Data: {folders} ({source})"]
    lines.append(_row("images", f"{dataset.images_found} found, {captioned} captioned"))
    if images is None:
        return lines
    if images.unreadable:
        lines.append(_row("unreadable", _listed(str(len(images.unreadable)), images.unreadable)))
    extra = sum(len(group) - 1 for group in images.exact_duplicates)
    groups = [" = ".join(group) for group in images.exact_duplicates]
    pairs = [f"{p.first} ~ {p.second} ({p.distance})" for p in images.near_duplicates]
    small = [f"{f.file_name} {f.width}x{f.height}" for f in images.too_small]
    wide = [f"{f.file_name} {aspect_ratio(f):.1f}:1" for f in images.extreme_aspect]
    lines += [
        _row("duplicates", _listed(_count(extra, "identical copy", "identical copies"), groups)),
        _row("near-duplicates", _listed(_count(len(pairs), "pair"), pairs)),
        _row(f"< {resolution} px", _listed(f"{len(small)} upscaled", small)),
        _row("aspect > 2.5:1", _listed(f"{len(wide)} cropped hard", wide)),
    ]
    return lines


def _caption_lines(captions: CaptionReport) -> list[str]:
    lines = [
        "",
        f"Captions: {captions.count}, longest {captions.longest_tokens} {captions.text_encoder} tokens",
    ]
    lines.append(_row(f"> {captions.token_limit} tokens", f"{len(captions.too_long)} cut"))
    for caption in captions.too_long[:5]:
        lines.append(f'    {caption.file_name}: {caption.tokens} tokens, cut: "{_clip(caption.cut_off)}"')
    if captions.trigger_word is not None:
        missing = captions.without_trigger
        text = f"'{captions.trigger_word}' missing from {len(missing)} of {captions.count} captions"
        lines.append(_row("trigger word", _listed(text, missing)))
    else:
        lines.append(_row("trigger word", "not set (trigger_word in the config)"))
    lines.append(
        _row("top tags", ", ".join(f"{_clip(tag, 30)} ({n})" for tag, n in captions.top_tags[:_TOP_SHOWN]))
    )
    lines.append(_row("top words", ", ".join(f"{word} ({n})" for word, n in captions.top_words[:_TOP_SHOWN])))
    return lines


def _clip(text: str, width: int = 60) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."


def _plan_lines(plan: PlanFacts) -> list[str]:
    samples = _count(plan.num_images, "image")
    if plan.num_train_samples != plan.num_images:
        samples = f"{plan.num_train_samples} samples ({samples} with repeats)"
    if plan.num_reg_images:
        reg = plan.num_samples - plan.num_train_samples
        samples += f" + {reg} regularization ({_count(plan.num_reg_images, 'image')}) = {plan.num_samples}"
    buckets = len(plan.bucket_counts)
    per_epoch = f"{samples} / batch {plan.batch_size}"
    per_epoch += f" within {buckets} buckets" if buckets > 1 else ""
    per_epoch += f" = {plan.batches_per_epoch} batches per epoch"
    if plan.num_processes > 1:
        per_epoch += f" per process ({plan.num_processes} processes)"
    if plan.limited_by == "epochs":
        total = f"{plan.epochs} epochs x {plan.steps_per_epoch} = {plan.total_steps} steps"
    else:
        total = f"max_train_steps {plan.total_steps} = {plan.epochs} epochs (epochs is ignored)"
    lines = [
        "",
        f"Plan: {plan.total_steps} steps",
        _row("per epoch", per_epoch),
        _row(
            "steps",
            f"{plan.batches_per_epoch} batches / accumulation {plan.gradient_accumulation_steps} = "
            f"{_count(plan.steps_per_epoch, 'step')} per epoch (effective batch {plan.effective_batch_size})",
        ),
        _row("total", total),
    ]
    return lines + _bucket_lines(plan)


def _bucket_lines(plan: PlanFacts) -> list[str]:
    """The bucket histogram: size, samples and batches per bucket, with a bar scaled to the largest."""
    if not plan.bucket_counts:
        return []
    largest = max(plan.bucket_counts.values())
    lines = ["", f"Buckets: {len(plan.bucket_counts)}"]
    for (width, height), count in plan.bucket_counts.items():
        batches = -(-count // plan.batch_size)
        bar = "#" * max(1, round(20 * count / largest))
        lines.append(f"  {width:>5} x {height:<5} {count:>5} samples {batches:>4} batches  {bar}")
    return lines


_DENOISER_NAMES = {"flux1": "transformer"}  # how the report names a family's denoiser (default: UNet)


def _network_lines(network: NetworkFacts) -> list[str]:
    kind = network.base_model_kind.replace("_", " ")
    lines = [
        "",
        f"LoRA: rank {network.rank}, alpha {network.alpha:g}, "
        f"{VERSION_NAMES.get(network.sd_version, network.sd_version)} ({kind})",
        _row("network_type", _network_type(network)),
        _row(
            _DENOISER_NAMES.get(network.sd_version, "UNet"),
            f"{network.unet_parameters:,} trainable parameters",
        ),
    ]
    if network.text_encoder_parameters:
        lines.append(
            _row(
                "text encoders" if network.sd_version in ("sdxl", "flux1") else "text encoder",
                f"{network.text_encoder_parameters:,} trainable parameters",
            )
        )
    lines.append(_row("total", f"{network.total_parameters:,}"))
    if network.file is not None:
        lines.append(_row("file size", _file_size(network.file)))
    return lines


def _network_type(network: NetworkFacts) -> str:
    """ "LoKr (lokr_factor -1, lokr_full_matrix false), 3x3 convs at conv_rank 4 (conv_alpha 4)"."""
    kind = network.kind
    text = TYPE_NAMES.get(kind.type, kind.type)
    if kind.type == "lokr":
        text += f" (lokr_factor {kind.lokr_factor}, lokr_full_matrix {str(kind.lokr_full_matrix).lower()})"
    if network.conv_rank is not None:
        alpha = f"{network.conv_alpha:g}" if network.conv_alpha is not None else str(network.conv_rank)
        text += f", 3x3 convs at conv_rank {network.conv_rank} (conv_alpha {alpha})"
    return text


def _file_size(file: LoraFileFacts) -> str:
    """ "171,036 bytes (167.0 KiB) in fp16, 58 modules, plus training's metadata"."""
    size = f"{file.bytes / 2**20:.1f} MiB" if file.bytes >= 2**20 else f"{file.bytes / 2**10:.1f} KiB"
    return (
        f"{file.bytes:,} bytes ({size}) in {_PRECISIONS[file.dtype]}, {_count(file.modules, 'module')}, "
        "plus training's metadata (a few KiB)"
    )


def _output_lines(outputs: OutputFacts) -> list[str]:
    lines = ["", f"Output: {outputs.output_dir}", _row("folder", _folder_state(outputs))]
    if outputs.step_files is not None:
        steps = outputs.step_files
        shown = steps if len(steps) <= 3 else [steps[0], steps[1], "...", steps[-1]]
        lines.append(_row("every save_steps", _listed(f"{len(steps)} files", shown)))
    lines.append(_row("final", ", ".join(outputs.final_files)))
    lines.append(_row("config", outputs.config_file))
    lines.append(_row("logs", str(outputs.logging_dir)))
    if outputs.existing_files:
        lines.append(_row("already there", named(outputs.existing_files, _SHOWN) + " (an earlier run)"))
    return lines


def _folder_state(outputs: OutputFacts) -> str:
    """One line: whether output_dir can take the run (the errors below say why not)."""
    lock = outputs.lock
    holder = lock.holder if lock is not None else None
    if lock is not None and lock.state != "stale":
        who = f"pid {holder.pid} on host '{holder.host}', started {holder.started}" if holder else "unknown"
        kind = "in use by another training" if lock.state == "in_use" else "locked from another machine"
        return f"{kind} ({who}; see the error below)"
    if outputs.writable_problem is not None:
        return "cannot be written (see the error below)"
    state = "exists, writable" if outputs.exists else "new, writable (made when training starts)"
    if lock is not None:
        ended = f" (pid {holder.pid})" if holder else ""
        state += f"; the lock left by an ended training{ended} is taken over"
    return state
