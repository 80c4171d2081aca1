"""Run the checks: all of them for `lora-scripts check`, the cheap ones before every `train`.

Blocking problems (an invalid config, dataset problems, a base model or target layers training cannot use,
an output_dir that cannot be written, is in use by another training or holds another run) are errors;
everything else is a warning. `train` raises the same UserError `check` lists as errors.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from lora_scripts.checks.captions import analyze_run_captions, metadata_csv_warnings
from lora_scripts.checks.findings import caption_warnings, image_warnings, output_problems, plan_warnings
from lora_scripts.checks.images import analyze_images
from lora_scripts.checks.plan import NetworkFacts, network_facts, output_facts, plan_facts, speed_facts
from lora_scripts.checks.report import CheckReport, DatasetFacts
from lora_scripts.config import TrainConfig, load_config, validate_config_dict
from lora_scripts.config.datasets import DatasetSettings, dataset_settings
from lora_scripts.data import CaptionedImage, find_images
from lora_scripts.data.training_set import TrainingSet, training_set_for
from lora_scripts.errors import UserError
from lora_scripts.models.registry import FAMILIES, family_of
from lora_scripts.models.stable_diffusion import partial_fused_attention_warning

log = logging.getLogger(__name__)


def check_config_file(path: str | Path) -> CheckReport:
    """Load the config at `path` (as `train` does) and check it; config errors end up in `errors`."""
    try:
        config = load_config(path)
    except UserError as err:
        return CheckReport(config_path=str(path), errors=err.messages)
    return run_check(config, config_path=str(path))


def check_config_dict(data: Mapping[str, Any], source: str) -> CheckReport:
    """check_config_file for a config given as a mapping (the web app's form); `source` names it."""
    try:
        config = validate_config_dict(data, source)
    except UserError as err:
        return CheckReport(config_path=source, errors=err.messages)
    return run_check(config, config_path=source)


def run_check(config: TrainConfig, *, config_path: str) -> CheckReport:
    """Every check of `config` (already validated by load_config), collecting errors instead of raising."""
    errors: list[str] = []
    datasets = dataset_settings(config)
    first_dir = Path(datasets[0].train_data_dir)
    found = sum(len(find_images(d.train_data_dir)) for d in datasets if Path(d.train_data_dir).is_dir())
    training_set: TrainingSet | None = None
    items: list[CaptionedImage] | None = None
    try:
        training_set = training_set_for(config)
        items = [item for item in training_set.images if not item.is_reg]
    except UserError as err:
        errors += err.messages
    # Images are worth checking even when captions have problems: fix everything in one pass.
    root, names = _image_names(datasets, training_set)
    images = analyze_images(root, names, config.resolution) if names else None
    captions = analyze_run_captions(items, config) if items else None
    plan = plan_facts(training_set, config) if items and training_set else None
    network = None
    try:
        network = network_facts(config)
    except UserError as err:
        errors += err.messages
    outputs = output_facts(config, plan.total_steps if plan else None)
    output_errors, output_notes = output_problems(outputs, config)
    errors += output_errors

    warnings = metadata_csv_warnings(config)
    warnings += image_warnings(images, config.resolution) if images else []
    warnings += caption_warnings(captions) if captions else []
    warnings += plan_warnings(config, plan) if plan else []
    warnings += output_notes
    if network is not None and network.sd_version == "sd_v2" and config.train_text_encoder:
        targets = config.text_encoder_target_modules
        fused = partial_fused_attention_warning(list(targets)) if not isinstance(targets, str) else None
        warnings += [fused] if fused else []
    return CheckReport(
        config_path=config_path,
        errors=errors,
        warnings=warnings,
        resolution=config.resolution,
        dataset=DatasetFacts(
            train_data_dir=first_dir,
            metadata_path=datasets[0].metadata_path,
            images_found=found,
            images_captioned=None if training_set is None else len(training_set.images),
            other_folders=tuple(Path(d.train_data_dir) for d in datasets[1:]),
            caption_extension=datasets[0].caption_extension,
        ),
        images=images,
        captions=captions,
        plan=plan,
        network=network,
        outputs=outputs,
        speed=speed_facts(config, _denoiser_name(config, network), network),
    )


def _denoiser_name(config: TrainConfig, network: NetworkFacts | None) -> str:
    """The family's name of the base model's denoiser ("UNet", FLUX.1's "transformer"); "UNet" for a base
    model that cannot be read (`errors` says why)."""
    if network is not None:
        return FAMILIES[network.sd_version].denoiser_name
    return family_of(config.base_model, fallback=True).denoiser_name


def _image_names(datasets: list[DatasetSettings], training_set: TrainingSet | None) -> tuple[Path, list[str]]:
    """(root, names) for the image checks: names relative to the folder for one dataset, full paths (which
    `root / name` leaves as they are) for several."""
    if len(datasets) == 1:
        root = Path(datasets[0].train_data_dir)
        if training_set is not None:
            return root, [item.file_name for item in training_set.images]
        return root, find_images(root) if root.is_dir() else []
    if training_set is not None:
        return Path(), [str(item.path) for item in training_set.images]
    names = [
        str(Path(d.train_data_dir) / name)
        for d in datasets
        if Path(d.train_data_dir).is_dir()
        for name in find_images(d.train_data_dir)
    ]
    return Path(), names


def check_before_training(config: TrainConfig, *, base_model: bool = False) -> TrainingSet:
    """The run's training set, after the checks that cost seconds; what `train` runs first.

    Raises the UserError `check` reports for a dataset with blocking problems, for an output_dir that cannot
    be written, is in use by another training or holds another run (unless overwrite/resume), and, with
    `base_model`, for a base model or target layers training cannot use (`network_facts`: headers and
    configs, no weights); every problem at once. Logs each warning. Nothing is written.
    """
    datasets = dataset_settings(config)
    # Every process sees output_dir as it was: launchers start them together, before anything is written.
    outputs = output_facts(config, None)
    if os.environ.get("RANK", "0") != "0":
        # Only the main process takes the lock, maybe already, for this very run: it alone checks it.
        outputs = replace(outputs, lock=None)
    output_errors, output_notes = output_problems(outputs, config)
    model_errors: list[str] = []
    if base_model:
        try:
            network_facts(config)
        except UserError as err:
            model_errors = err.messages
    try:
        training_set = training_set_for(config)
    except UserError as err:
        raise UserError(err.messages + model_errors + output_errors) from None
    if model_errors or output_errors:
        raise UserError(model_errors + output_errors)
    items = [item for item in training_set.images if not item.is_reg]
    root, names = _image_names(datasets, training_set)
    warnings = metadata_csv_warnings(config)
    warnings += image_warnings(analyze_images(root, names, config.resolution), config.resolution)
    warnings += caption_warnings(analyze_run_captions(items, config))
    # No accelerator exists yet; launchers (torchrun, accelerate launch) say the process count and rank in
    # the environment. Steps shrink with more processes, and one copy of each warning is enough.
    plan = plan_facts(training_set, config, num_processes=int(os.environ.get("WORLD_SIZE", "1")))
    warnings += plan_warnings(config, plan) + output_notes
    if os.environ.get("RANK", "0") == "0":
        for message in warnings:
            log.warning("warning: %s", message)
    return training_set
