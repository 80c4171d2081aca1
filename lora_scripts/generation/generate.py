"""`lora-scripts generate`: render images from a base model and the LoRAs named in the prompt.

Every mistake that can be found without loading the model (a malformed tag, an unknown LoRA name, a bad
size, an unknown sampler, a device this machine lacks, ...) is reported at once, before anything loads.
"""

from __future__ import annotations

import logging
import math
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import torch
from PIL import Image

from lora_scripts.errors import UserError
from lora_scripts.export.lora_reader import read_lora_header, version_family
from lora_scripts.generation.grid import make_grid
from lora_scripts.generation.infotext import build_infotext, checkpoint_short_hash, format_number
from lora_scripts.generation.lora_apply import (
    LoadedLora,
    check_family,
    load_lora,
    set_lora_weights,
    unload_loras,
)
from lora_scripts.generation.lora_library import LoraFile, LoraLibrary, looks_like_path
from lora_scripts.generation.options import MAX_SEED, GenerateOptions
from lora_scripts.generation.outputs import OutputTarget, image_paths, resolve_output, save_png
from lora_scripts.generation.pipeline import (
    LoadedPipeline,
    SamplingSettings,
    enable_memory_savers,
    load_pipeline,
    render_image,
    resolve_device,
    resolve_dtype,
)
from lora_scripts.generation.prompt_tags import LoraTag, ParsedPrompt, has_lora_tags, parse_prompt
from lora_scripts.generation.samplers import SamplerSpec, resolve_sampler
from lora_scripts.models.detect import ModelVersion
from lora_scripts.models.flux import FluxLoad
from lora_scripts.models.locate import BaseModelLocation, locate_base_model
from lora_scripts.models.registry import FAMILIES, base_model_version

logger = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass
class GenerateResult:
    """What was written: the PNG files, the seed of the first image and whether it was drawn at random;
    `stopped` when `should_stop` ended the work early (the files are those finished before)."""

    files: list[Path]
    seed: int
    random_seed: bool
    infotexts: list[str]
    stopped: bool = False


@dataclass
class _Plan:
    """Options checked and resolved, before the model loads."""

    prompt: ParsedPrompt
    lora_files: list[LoraFile]
    settings: SamplingSettings
    target: OutputTarget
    location: BaseModelLocation


class GenerationStopped(Exception):
    """Raised inside a render when the caller's `should_stop()` says so."""


# Loads (or hands out an already loaded) pipeline for the options' base model on a device in a dtype; the
# web app passes one that keeps the last pipeline loaded between requests.
PipelineLoader = Callable[[GenerateOptions, SamplerSpec, torch.device, torch.dtype], LoadedPipeline]


def load_fresh(
    options: GenerateOptions, sampler: SamplerSpec, device: torch.device, dtype: torch.dtype
) -> LoadedPipeline:
    """The CLI's loader: load the base model anew."""
    flux = FluxLoad(options.vae, options.clip_l, options.t5xxl)
    return load_pipeline(
        options.base_model,
        sampler,
        device=device,
        dtype=dtype,
        config_dir=options.base_model_config,
        flux=flux,
    )


@dataclass
class _Progress:
    """Steps done over all renders, reported as `report(done, total)`; the stop check runs at every step."""

    renders: int
    report: Callable[[int, int], None] | None
    should_stop: Callable[[], bool] | None
    finished: int = 0  # renders completed

    def on_step(self, done: int, steps: int) -> None:
        if self.should_stop is not None and self.should_stop():
            raise GenerationStopped
        if self.report is not None:
            self.report(self.finished * steps + done, self.renders * steps)


@dataclass
class _Written:
    files: list[Path] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)


def run_generate(
    options: GenerateOptions,
    *,
    load: PipelineLoader = load_fresh,
    on_progress: Callable[[int, int], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> GenerateResult:
    """Render `options.num_images` images (or one weight grid) and write them as PNGs with infotext.

    `on_progress(done, total)` counts denoising steps over every image; `should_stop()` is asked at each
    step, and True ends the work after the images already written (`GenerateResult.stopped`). The prompt's
    LoRAs are taken out of the pipeline again at the end, so a pipeline `load` keeps can serve the next call.
    """
    plan = _plan(options)
    device = resolve_device(options.device)
    dtype = resolve_dtype(options.precision, device)
    logger.info("Loading %s on %s (%s)", options.base_model, device, str(dtype).removeprefix("torch."))
    loaded = load(options, plan.settings.sampler, device, dtype)
    enable_memory_savers(
        loaded.pipe,
        attention_slicing=options.attention_slicing,
        vae_slicing=options.vae_slicing,
        vae_tiling=options.vae_tiling,
    )
    random_seed = options.seed == -1
    seed = secrets.randbelow(MAX_SEED) if random_seed else options.seed
    seeds = [seed + i for i in range(options.num_images)]
    columns = len(options.lora_weights) if options.lora_weights is not None else 1
    progress = _Progress(len(seeds) * columns, on_progress, should_stop)
    written = _Written()
    loras: list[LoadedLora] = []
    try:
        for i, (tag, file) in enumerate(zip(plan.prompt.loras, plan.lora_files, strict=True)):
            loras.append(load_lora(loaded.pipe, file.path, adapter=f"lora_{i}", label=tag.name))
        infotext_fields = _model_fields(loaded, plan)
        if options.lora_weights is not None:
            _render_grid(options, plan, loaded, loras, seeds, infotext_fields, progress, written)
        else:
            weights = [(tag.te_weight, tag.unet_weight) for tag in plan.prompt.loras]
            set_lora_weights(loaded.pipe, loras, weights)
            _render_images(options, plan, loaded, seeds, infotext_fields, progress, written)
    except GenerationStopped:
        logger.info("Stopped after %d image(s)", len(written.files))
        return GenerateResult(written.files, seed, random_seed, written.texts, stopped=True)
    finally:
        if loras:
            unload_loras(loaded.pipe, loras)
    return GenerateResult(files=written.files, seed=seed, random_seed=random_seed, infotexts=written.texts)


def _plan(options: GenerateOptions) -> _Plan:
    """Check every option and resolve the LoRA names; all problems are raised together."""
    problems: list[str] = []

    def attempt(action: Callable[[], T]) -> T | None:
        try:
            return action()
        except UserError as err:
            problems.extend(err.messages)
            return None

    prompt = attempt(lambda: parse_prompt(options.prompt))
    if has_lora_tags(options.negative_prompt):
        problems.append("--negative-prompt: LoRA tags are applied from --prompt only; move the tag there.")
    target = attempt(lambda: resolve_output(Path(options.output)))
    location = attempt(lambda: locate_base_model(options.base_model))
    # The model's family, from its header or configs: the size it was trained at (for --width / --height
    # left unset), its default sampler and CFG, and the LoRAs that fit it.
    version = attempt(lambda: base_model_version(options.base_model)) if location is not None else None
    family = FAMILIES[version] if version is not None else None
    sampler_name = options.sampler or (family.default_sampler if family is not None else "euler_a")
    sampler = attempt(lambda: resolve_sampler(sampler_name))
    if family is not None and family.objective == "flow" and sampler is not None:
        if sampler.key != "euler":
            problems.append(
                f"--sampler: FLUX.1 samples with flow-matching Euler only, not '{sampler.display_name}'; "
                "use euler or leave --sampler out."
            )
    problems.extend(_number_problems(options))
    attempt(lambda: resolve_dtype(options.precision, resolve_device(options.device)))
    lora_files: list[LoraFile] = []
    if prompt is not None:
        if options.lora_weights is not None and len(prompt.loras) != 1:
            problems.append(
                f"--lora-weights needs exactly one <lora:NAME> tag in --prompt (found {len(prompt.loras)})."
            )
        if prompt.loras:
            library = LoraLibrary(folders=[], files=[])
            if any(not looks_like_path(tag.name) for tag in prompt.loras):
                library = attempt(lambda: LoraLibrary.scan(options.lora_dirs)) or library
            for tag in prompt.loras:
                found = attempt(lambda tag=tag: library.resolve(tag.name))
                if found is not None:
                    lora_files.append(found)
                    if version is not None:
                        attempt(lambda tag=tag, found=found: _check_lora_family(tag, found, version))
    if problems:
        raise UserError(problems)
    native = family.native_resolution if family is not None else None
    settings = SamplingSettings(
        sampler=sampler,
        steps=options.steps,
        cfg_scale=options.cfg_scale if options.cfg_scale is not None else family.default_cfg_scale,
        width=options.width or native,
        height=options.height or native,
        negative_prompt=options.negative_prompt,
    )
    return _Plan(prompt=prompt, lora_files=lora_files, settings=settings, target=target, location=location)


def _check_lora_family(tag: LoraTag, file: LoraFile, version: ModelVersion) -> None:
    """UserError when the LoRA was made for another model family than the base model's (read from the file's
    header alone, so before anything loads; `load_lora` checks it again, for callers that skip this)."""
    keys, metadata = read_lora_header(file.path, f"<lora:{tag.name}>")
    check_family(tag.name, file.path, keys, metadata, version_family(version))


def _number_problems(options: GenerateOptions) -> list[str]:
    problems = []
    if options.steps < 1:
        problems.append(f"--steps: {options.steps} is out of range (must be ≥ 1).")
    if options.num_images < 1:
        problems.append(f"--num-images: {options.num_images} is out of range (must be ≥ 1).")
    for flag, value in (("--width", options.width), ("--height", options.height)):
        if value is not None and (value < 8 or value % 8):
            problems.append(f"{flag}: {value} must be a positive multiple of 8 (e.g. 512).")
    if options.cfg_scale is not None and not math.isfinite(options.cfg_scale):
        problems.append(f"--cfg-scale: {options.cfg_scale} is not a finite number.")
    if options.seed < -1 or options.seed > MAX_SEED:
        problems.append(f"--seed: {options.seed} is out of range (-1 for random, or 0 to {MAX_SEED}).")
    if options.lora_weights is not None and not options.lora_weights:
        problems.append("--lora-weights: give at least one weight (e.g. 0,0.5,1.0).")
    return problems


def _model_fields(loaded: LoadedPipeline, plan: _Plan) -> dict[str, object]:
    """Model hash / name and Lora hashes for the infotext (the checkpoint hash reads the whole file once)."""
    location = plan.location
    model_hash = None
    if location.kind == "single_file":
        logger.info("Hashing %s for the infotext", location.path.name)
        model_hash = checkpoint_short_hash(location.path)
    name = location.path.stem if location.kind != "hub_cache" else location.spec
    lora_hashes = {
        tag.name: f.short_hash() for tag, f in zip(plan.prompt.loras, plan.lora_files, strict=True)
    }
    return {"model_hash": model_hash, "model_name": name, "lora_hashes": lora_hashes}


def _infotext(
    options: GenerateOptions,
    plan: _Plan,
    seed: int,
    fields: dict[str, object],
    extra: dict[str, object] | None = None,
) -> str:
    settings = plan.settings
    return build_infotext(
        prompt=options.prompt,
        negative_prompt=options.negative_prompt,
        steps=settings.steps,
        sampler=settings.sampler.display_name,
        cfg_scale=settings.cfg_scale,
        seed=seed,
        width=settings.width,
        height=settings.height,
        extra=extra,
        **fields,
    )


def _render_images(
    options: GenerateOptions,
    plan: _Plan,
    loaded: LoadedPipeline,
    seeds: list[int],
    fields: dict[str, object],
    progress: _Progress,
    written: _Written,
) -> None:
    file_paths = image_paths(plan.target, seeds) if plan.target.is_file else None
    for i, seed in enumerate(seeds):
        image = _render(options, plan, loaded, seed, progress)
        text = _infotext(options, plan, seed, fields)
        # In a folder, number each file when it is written, after whatever is there by then.
        path = file_paths[i] if file_paths else image_paths(plan.target, [seed])[0]
        save_png(path, image, text)
        written.files.append(path)
        written.texts.append(text)


def _render_grid(
    options: GenerateOptions,
    plan: _Plan,
    loaded: LoadedPipeline,
    loras: list[LoadedLora],
    seeds: list[int],
    fields: dict[str, object],
    progress: _Progress,
    written: _Written,
) -> None:
    """One row per seed, one column per weight (the tag's weight replaced, text encoder and UNet alike)."""
    weights = options.lora_weights or []
    rows: list[list[Image.Image]] = []
    for seed in seeds:
        row = []
        for weight in weights:
            set_lora_weights(loaded.pipe, loras, [(weight, weight)])
            row.append(_render(options, plan, loaded, seed, progress))
        rows.append(row)
    labels = [format_number(w) for w in weights]
    grid = make_grid(rows, labels)
    extra = {"Lora weights": ", ".join(labels)}
    text = _infotext(options, plan, seeds[0], fields, extra=extra)
    path = image_paths(plan.target, [seeds[0]], suffix="-grid")[0]
    save_png(path, grid, text)
    written.files.append(path)
    written.texts.append(text)


def _render(
    options: GenerateOptions, plan: _Plan, loaded: LoadedPipeline, seed: int, progress: _Progress
) -> Image.Image:
    pipe, text, settings = loaded.pipe, plan.prompt.text, plan.settings
    image = render_image(pipe, text, settings, seed, progress=options.progress, on_step=progress.on_step)
    progress.finished += 1
    return image
