"""Import another trainer's setup as our config: `lora-scripts import SOURCE -o config.yaml`.

Reads kohya sd-scripts (config TOML, dataset TOML, command line), kohya_ss GUI JSON presets and Akegarasu
SD-Trainer TOMLs, ai-toolkit YAML jobs and OneTrainer JSON configs; see docs/import.md.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from lora_scripts.config.importers.ai_toolkit import import_ai_toolkit, is_ai_toolkit_job, read_yaml
from lora_scripts.config.importers.onetrainer import import_onetrainer, is_onetrainer_config
from lora_scripts.config.importers.report import ImportReport, render_report
from lora_scripts.config.importers.sd_scripts import Imported, import_sd_scripts
from lora_scripts.config.loader import validate_config_dict
from lora_scripts.errors import UserError
from lora_scripts.export.atomic import write_atomic

__all__ = ["ImportReport", "import_to_file", "render_report"]


def import_to_file(
    source: Path, output: Path, *, dataset_config: Path | None = None, force: bool = False
) -> ImportReport:
    """Import `source`, write our YAML config to `output` atomically and return the report.

    An existing `output` is only replaced with `force`. Problems the loader finds in the result (a required
    key the source did not give, a value out of our range) are put in the report, not raised: the file is
    written so the user can finish it.
    """
    if output.exists() and not force:
        raise UserError(f"{output} already exists; choose another -o file or add --force to replace it.")
    imported = _import(source, dataset_config)
    try:
        validate_config_dict(imported.config, str(output), check_paths=False)
    except UserError as err:
        imported.report.problems.extend(err.messages)
    text = f"# Imported from {source} by `lora-scripts import`; see docs/config.md for every key.\n"
    text += yaml.safe_dump(imported.config, sort_keys=False, allow_unicode=True)
    output.parent.mkdir(parents=True, exist_ok=True)
    try:
        write_atomic(output, lambda tmp: tmp.write_text(text, encoding="utf-8"), overwrite=force)
    except FileExistsError:
        raise UserError(
            f"{output} already exists; choose another -o file or add --force to replace it."
        ) from None
    return imported.report


def _import(source: Path, dataset_config: Path | None) -> Imported:
    """Pick the reader by the file's content: ai-toolkit (.yaml with job and config.process), OneTrainer
    (.json with model_type and training_method), else the sd-scripts family."""
    suffix = source.suffix.lower()
    if suffix in (".yaml", ".yml") and source.is_file():
        data = read_yaml(source)
        if not is_ai_toolkit_job(data):
            raise UserError(f"{source}: not an ai-toolkit job (no job: and config.process).")
        nested = import_ai_toolkit(source, data)
        return Imported(nested.config, nested.report)
    if suffix == ".json" and source.is_file():
        try:
            data = json.loads(source.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise UserError(f"{source}: not valid JSON ({exc}).") from exc
        if is_onetrainer_config(data):
            nested = import_onetrainer(source, data)
            return Imported(nested.config, nested.report)
    return import_sd_scripts(source, dataset_config)
