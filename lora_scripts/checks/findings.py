"""Turn the facts of a check into warnings: one sentence each, naming the files and what to do.

Warnings never stop training; `check` prints them and `train` logs them, with the same words. The errors
made here, about output_dir (in use, not writable, holding another run), stop both.
"""

from __future__ import annotations

from collections.abc import Sequence

from lora_scripts.checks.captions import CaptionReport
from lora_scripts.checks.images import (
    EXTREME_ASPECT_RATIO,
    NEAR_DUPLICATE_MAX_DISTANCE,
    ImageReport,
    aspect_ratio,
)
from lora_scripts.checks.plan import OutputFacts, PlanFacts
from lora_scripts.config import TrainConfig
from lora_scripts.training.output_dir import BACKUP_FOLDER, output_dir_problem, will_resume

MAX_NAMED = 5  # files named in one warning; the rest are counted


def named(items: Sequence[str], limit: int = MAX_NAMED) -> str:
    """'a, b, c' or 'a, b, c and 4 more'."""
    shown = ", ".join(items[:limit])
    return shown if len(items) <= limit else f"{shown} and {len(items) - limit} more"


def _plural(count: int, word: str, plural: str | None = None) -> str:
    return f"{count} {word if count == 1 else plural or word + 's'}"


def image_warnings(images: ImageReport, resolution: int) -> list[str]:
    """Duplicates, near-duplicates, images that get upscaled and images the centre crop mostly discards."""
    out: list[str] = []
    if images.exact_duplicates:
        extra = sum(len(group) - 1 for group in images.exact_duplicates)
        groups = [" = ".join(group) for group in images.exact_duplicates]
        out.append(
            f"{_plural(extra, 'image is an identical copy', 'images are identical copies')} of another "
            f"file: {named(groups)}; a copy weighs double in training, so remove the extra copies."
        )
    if images.near_duplicates:
        pairs = [f"{p.first} ~ {p.second}" for p in images.near_duplicates]
        verb = "looks" if len(pairs) == 1 else "look"
        out.append(
            f"{_plural(len(pairs), 'pair')} of images {verb} almost the same (perceptual hashes at most "
            f"{NEAR_DUPLICATE_MAX_DISTANCE} of 64 bits apart): {named(pairs)}; a near-copy weighs double in "
            "training, so keep only the better one."
        )
    if images.too_small:
        sizes = [f"{f.file_name} ({f.width}x{f.height})" for f in images.too_small]
        out.append(
            f"{_plural(len(sizes), 'image')} {'is' if len(sizes) == 1 else 'are'} smaller than resolution "
            f"{resolution} px on the short side and will be upscaled (blurry): {named(sizes)}; use larger "
            "images or a lower resolution."
        )
    if images.extreme_aspect:
        shapes = [
            f"{f.file_name} ({f.width}x{f.height}, {aspect_ratio(f):.1f}:1)" for f in images.extreme_aspect
        ]
        out.append(
            f"{_plural(len(shapes), 'image')} {'is' if len(shapes) == 1 else 'are'} longer than "
            f"{EXTREME_ASPECT_RATIO}:1 and will lose most of the picture to the centre crop: "
            f"{named(shapes)}; crop to the part that matters."
        )
    return out


def caption_warnings(captions: CaptionReport) -> list[str]:
    """Captions the text encoder cuts (CLIP; FLUX.1: T5-XXL), and captions without (or with a cut-off)
    trigger word."""
    out: list[str] = []
    if captions.too_long:
        longest = [f"{c.file_name} ({c.tokens} tokens)" for c in captions.too_long]
        out.append(
            f"{_plural(len(longest), 'caption is', 'captions are')} longer than the {captions.token_limit} "
            f"{captions.text_encoder} tokens training reads and will be cut: {named(longest)}; shorten "
            "or put what matters first."
        )
    if captions.trigger_word is not None and captions.without_trigger:
        out.append(
            f"trigger_word '{captions.trigger_word}' is missing from {len(captions.without_trigger)} of "
            f"{captions.count} captions: {named(captions.without_trigger)}; write it in every caption of "
            "the subject."
        )
    if captions.trigger_word is not None and captions.trigger_cut_off:
        out.append(
            f"trigger_word '{captions.trigger_word}' comes after the {captions.token_limit}th token in "
            f"{_plural(len(captions.trigger_cut_off), 'caption')}, where {captions.text_encoder} never reads "
            f"it: {named(captions.trigger_cut_off)}; move it to the front."
        )
    return out


def plan_warnings(config: TrainConfig, plan: PlanFacts) -> list[str]:
    """Settings that the run's length makes pointless."""
    out: list[str] = []
    if config.save_steps is not None and config.save_steps > plan.total_steps:
        out.append(
            f"save_steps: {config.save_steps} is more than the {plan.total_steps} steps of this run, so only "
            "the final LoRA is written."
        )
    if config.lr_warmup_steps > 0 and config.lr_warmup_steps >= plan.total_steps:
        out.append(
            f"lr_warmup_steps: {config.lr_warmup_steps} is not less than the {plan.total_steps} steps of "
            "this run, so the learning rate never reaches learning_rate; lower lr_warmup_steps."
        )
    return out


def output_problems(outputs: OutputFacts, config: TrainConfig) -> tuple[list[str], list[str]]:
    """(errors, warnings) about output_dir, in the words `train` stops with.

    A training running in it (its lock, training/run_lock.py) is an error, and then the only one: the files
    there are that run's. So is a folder that cannot be created or written. An earlier run is an error unless
    `overwrite` or `resume` says what to do with it (training/output_dir.py); with `overwrite` a warning says
    where its files go.
    """
    in_use = outputs.lock.problem(outputs.output_dir) if outputs.lock is not None else None
    if in_use is not None:
        return [in_use], []
    resuming = will_resume(outputs.output_dir, config.resume)
    problem = output_dir_problem(
        outputs.output_dir,
        overwrite=config.overwrite,
        resuming=resuming,
        resume_requested=config.resume is not None,
    )
    if problem is not None:
        return [problem], []
    if not outputs.existing_files or resuming:
        return [], []
    return [], [
        f"output_dir: '{outputs.output_dir}' already holds a run ({named(outputs.existing_files)}); "
        f"overwrite: true moves its files to {outputs.output_dir / BACKUP_FOLDER}/YYYYmmdd-HHMMSS/ before "
        "training starts."
    ]
