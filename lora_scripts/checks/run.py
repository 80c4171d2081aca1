"""Run the checks: all of them for `lora-scripts check`, the cheap ones before every `train`.

Blocking problems (an invalid config, dataset problems, a base model or target layers training cannot use)
are errors; everything else is a warning. `train` raises the same UserError `check` lists as errors.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from lora_scripts.checks.captions import analyze_captions
from lora_scripts.checks.findings import caption_warnings, image_warnings, output_warnings, plan_warnings
from lora_scripts.checks.images import analyze_images
from lora_scripts.checks.plan import network_facts, output_facts, plan_facts
from lora_scripts.checks.report import CheckReport, DatasetFacts
from lora_scripts.config import TrainConfig, load_config
from lora_scripts.data import CaptionedImage, collect_dataset, find_images
from lora_scripts.errors import UserError
from lora_scripts.models.stable_diffusion import partial_fused_attention_warning

log = logging.getLogger(__name__)


def check_config_file(path: str | Path) -> CheckReport:
    """Load the config at `path` (as `train` does) and check it; config errors end up in `errors`."""
    try:
        config = load_config(path)
    except UserError as err:
        return CheckReport(config_path=str(path), errors=err.messages)
    return run_check(config, config_path=str(path))


def run_check(config: TrainConfig, *, config_path: str) -> CheckReport:
    """Every check of `config` (already validated by load_config), collecting errors instead of raising."""
    errors: list[str] = []
    data_dir = Path(config.train_data_dir)
    found = find_images(data_dir) if data_dir.is_dir() else []
    items: list[CaptionedImage] | None = None
    try:
        items = collect_dataset(data_dir, config.metadata_path)
    except UserError as err:
        errors += err.messages
    # Images are worth checking even when captions have problems: fix everything in one pass.
    names = [item.file_name for item in items] if items is not None else found
    images = analyze_images(data_dir, names, config.resolution) if names else None
    captions = analyze_captions(items, config.trigger_word) if items else None
    plan = plan_facts(len(items), config) if items else None
    network = None
    try:
        network = network_facts(config)
    except UserError as err:
        errors += err.messages
    outputs = output_facts(config, plan.total_steps if plan else None)

    warnings = image_warnings(images, config.resolution) if images else []
    warnings += caption_warnings(captions) if captions else []
    warnings += plan_warnings(config, plan) if plan else []
    warnings += output_warnings(outputs)
    if network is not None and network.sd_version == "sd_v2" and config.train_text_encoder:
        fused = partial_fused_attention_warning(list(config.text_encoder_target_modules))
        warnings += [fused] if fused else []
    return CheckReport(
        config_path=config_path,
        errors=errors,
        warnings=warnings,
        resolution=config.resolution,
        dataset=DatasetFacts(
            train_data_dir=data_dir,
            metadata_path=config.metadata_path,
            images_found=len(found),
            images_captioned=None if items is None else len(items),
        ),
        images=images,
        captions=captions,
        plan=plan,
        network=network,
        outputs=outputs,
    )


def check_before_training(config: TrainConfig) -> list[CaptionedImage]:
    """The dataset's captioned images, after the checks that cost seconds; what `train` runs first.

    Raises the UserError `check` reports for a dataset with blocking problems, and logs each warning.
    The base model is not looked at here: train() loads it next, and its target-layer check words its
    errors as `check` does. Nothing is written.
    """
    items = collect_dataset(config.train_data_dir, config.metadata_path)
    names = [item.file_name for item in items]
    warnings = image_warnings(
        analyze_images(Path(config.train_data_dir), names, config.resolution), config.resolution
    )
    warnings += caption_warnings(analyze_captions(items, config.trigger_word))
    # No accelerator exists yet; launchers (torchrun, accelerate launch) say the process count and rank in
    # the environment. Steps shrink with more processes, and one copy of each warning is enough.
    plan = plan_facts(len(items), config, num_processes=int(os.environ.get("WORLD_SIZE", "1")))
    warnings += plan_warnings(config, plan) + output_warnings(output_facts(config, plan.total_steps))
    if os.environ.get("RANK", "0") == "0":
        for message in warnings:
            log.warning("warning: %s", message)
    return items
