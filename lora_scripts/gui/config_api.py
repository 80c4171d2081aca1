"""The Config and Check pages' endpoints: the schema as a form, presets, validation, YAML import/export, and
`check` on a config. Everything goes through the library the CLI uses (config.loader, config.reference,
checks), so a message here is the CLI's sentence and the facts are `check --json`'s.

GET  /api/config/schema           groups (docs/config.md's sections) of keys: kind, type, default, help, ...
GET  /api/config/presets          the shipped configs (configs/*.yaml) by name
GET  /api/config/preset?name=     one of them: {name, config, errors}
POST /api/config/validate         {config, check_paths}: {ok, errors: [{key, path, message}]}
POST /api/config/export           {config, path?, overwrite}: {yaml, path?}; written atomically, never
                                  over a file unless overwrite
POST /api/config/import           {yaml} or {path}: {config, errors}
POST /api/check                   {config} or {path}: the facts of `lora-scripts check --json`

Relative paths in a config start from the directory the server runs in, as for the CLI (docs/config.md),
so an exported file is the dict as given, in schema order: `lora-scripts train --config` reads the same.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml
from fastapi import APIRouter, Body
from pydantic import BaseModel, ConfigDict

from lora_scripts.checks import check_config_dict, check_config_file, report_to_json
from lora_scripts.config import SECTIONS, TrainConfig, load_config, validate_config_dict
from lora_scripts.config.reference import SECTION_TITLES, key_facts
from lora_scripts.errors import UserError
from lora_scripts.export.atomic import write_atomic
from lora_scripts.gui.dataset_api import parse
from lora_scripts.gui.roots import Roots

PRESETS = Path(__file__).resolve().parents[2] / "configs"
SOURCE = "config"  # how a config sent from the page is named in messages, as the CLI names its file
YAML_SUFFIXES = (".yaml", ".yml")


class ValidateBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    config: dict[str, Any]
    check_paths: bool = True


class ExportBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    config: dict[str, Any]
    path: str | None = None  # ROOT/relative.yaml to write; None: only return the text
    overwrite: bool = False


class SourceBody(BaseModel):
    """A config from the page (`config`/`yaml`) or a file under a root (`path`); exactly one."""

    model_config = ConfigDict(extra="forbid")
    config: dict[str, Any] | None = None
    yaml: str | None = None
    path: str | None = None


def schema_json() -> dict[str, Any]:
    """Every key of TrainConfig, grouped as docs/config.md groups them."""
    groups = [
        {"name": section, "title": SECTION_TITLES[section], "keys": [key_facts(name) for name in names]}
        for section, names in TrainConfig.fields_by_section().items()
        if section in SECTIONS and names
    ]
    return {"groups": groups}


def preset_names() -> list[str]:
    return sorted(path.stem for path in PRESETS.glob("*.yaml"))


def yaml_text(config: dict[str, Any]) -> str:
    """`config` as YAML, keys in schema order (unknown keys last, so the loader still names them)."""
    order = {name: i for i, name in enumerate(TrainConfig.model_fields)}
    ordered = dict(sorted(config.items(), key=lambda item: order.get(item[0], len(order))))
    return yaml.safe_dump(ordered, sort_keys=False, allow_unicode=True)


def read_yaml(text: str, source: str) -> dict[str, Any]:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise UserError(f"{source}: not valid YAML: {err}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"{source}: the top level must be a mapping of keys to values.")
    return {str(key): value for key, value in data.items()}


def keyed_errors(messages: list[str], source: str) -> list[dict[str, Any]]:
    """The loader's sentences `<source>: <key path>: <problem>`, each with the top key it concerns (None
    for a message about the whole config), so the page shows it at that field."""
    keyed = []
    for message in messages:
        rest = message.removeprefix(f"{source}: ")
        path = rest.split(": ", 1)[0] if ": " in rest and rest != message else None
        key = re.split(r"[.\[]", path)[0] if path else None
        keyed.append({"key": key, "path": path, "message": message})
    return keyed


def router_for(settings: Any) -> APIRouter:  # noqa: ANN401 - GuiSettings (app.py imports this module)
    routes = ConfigRoutes(settings.roots)
    router = APIRouter(prefix="/api")
    router.add_api_route("/config/schema", routes.schema, methods=["GET"])
    router.add_api_route("/config/presets", routes.presets, methods=["GET"])
    router.add_api_route("/config/preset", routes.preset, methods=["GET"])
    router.add_api_route("/config/validate", routes.validate, methods=["POST"])
    router.add_api_route("/config/export", routes.export, methods=["POST"])
    router.add_api_route("/config/import", routes.import_config, methods=["POST"])
    router.add_api_route("/check", routes.check, methods=["POST"])
    return router


class ConfigRoutes:
    def __init__(self, roots: Roots) -> None:
        self.roots = roots

    def schema(self) -> dict[str, Any]:
        return schema_json()

    def presets(self) -> dict[str, Any]:
        return {"presets": preset_names()}

    def preset(self, name: str = "") -> dict[str, Any]:
        if name not in preset_names():
            raise UserError(f"'{name}' is not a shipped config; the presets are {', '.join(preset_names())}.")
        path = PRESETS / f"{name}.yaml"
        config = read_yaml(path.read_text(encoding="utf-8"), path.name)
        return {"name": name, "config": config, "errors": self._errors(config, check_paths=False)}

    def validate(self, body: Any = Body(None)) -> dict[str, Any]:  # noqa: B008 - FastAPI's idiom
        request = parse(ValidateBody, body)
        errors = self._errors(request.config, check_paths=request.check_paths)
        return {"ok": not errors, "errors": errors}

    def export(self, body: Any = Body(None)) -> dict[str, Any]:  # noqa: B008
        request = parse(ExportBody, body)
        problems = self._errors(request.config, check_paths=False)
        if problems:  # a file `train` would refuse is no use; the page shows these at their fields
            raise UserError([problem["message"] for problem in problems])
        text = yaml_text(request.config)
        if request.path is None:
            return {"yaml": text}
        target = self.roots.resolve(request.path)
        if not target.name.lower().endswith(YAML_SUFFIXES):
            raise UserError(f"'{request.path}': give a file name ending in .yaml.")
        if target.is_dir():
            raise UserError(f"'{request.path}': a folder; give a file name ending in .yaml.")
        try:
            write_atomic(
                target, lambda tmp: tmp.write_text(text, encoding="utf-8"), overwrite=request.overwrite
            )
        except FileExistsError:
            raise UserError(
                f"'{request.path}' exists; tick 'overwrite' to replace it, or give another name."
            ) from None
        return {"yaml": text, "path": self.roots.name_of(target)}

    def import_config(self, body: Any = Body(None)) -> dict[str, Any]:  # noqa: B008
        request = parse(SourceBody, body)
        if (request.yaml is None) == (request.path is None):
            raise UserError("Send either the YAML text ('yaml') or a file under a root ('path').")
        if request.path is not None:
            file = self._config_file(request.path)
            config = read_yaml(file.read_text(encoding="utf-8"), str(file))
            try:
                load_config(file, check_paths=False)  # the CLI's reading: duplicate keys too
                messages: list[str] = []
            except UserError as err:
                messages = err.messages
            return {"config": config, "errors": keyed_errors(messages, str(file))}
        config = read_yaml(request.yaml or "", SOURCE)
        return {"config": config, "errors": self._errors(config, check_paths=False)}

    def check(self, body: Any = Body(None)) -> dict[str, Any]:  # noqa: B008
        request = parse(SourceBody, body)
        if request.yaml is not None or (request.config is None) == (request.path is None):
            raise UserError("Send either the config ('config') or a config file under a root ('path').")
        if request.path is not None:
            report = check_config_file(self._config_file(request.path))
        else:
            report = check_config_dict(request.config or {}, SOURCE)
        return report_to_json(report)

    def _config_file(self, path: str) -> Path:
        file = self.roots.resolve(path, must_exist=True)
        if not file.is_file():
            raise UserError(f"'{path}': not a file; give a config .yaml file.")
        return file

    @staticmethod
    def _errors(config: dict[str, Any], *, check_paths: bool) -> list[dict[str, Any]]:
        try:
            validate_config_dict(config, SOURCE, check_paths=check_paths)
        except UserError as err:
            return keyed_errors(err.messages, SOURCE)
        return []
