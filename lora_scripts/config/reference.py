"""Markdown reference of every config key, generated from the schema.

`python -m lora_scripts.config.reference > docs/config.md` regenerates the docs; a test keeps them in step.
"""

from __future__ import annotations

import types
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from annotated_types import Ge, Gt, Le, Lt, MinLen, MultipleOf
from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from lora_scripts.config.loader import KNOWN_ALIASES, MUST_EXIST
from lora_scripts.config.schema import (
    SECTIONS,
    TrainConfig,
    allowed_values,
    field_allowed_doc,
    field_default_doc,
)

SECTION_TITLES = {
    "data": "Data: images and captions",
    "buckets": "Aspect-ratio buckets",
    "caching": "Caching: latents and text-encoder outputs",
    "model": "Model: the base checkpoint",
    "network": "Network: the LoRA itself",
    "training": "Training: steps, learning rate, optimizer, memory",
    "loss": "Loss, noise and prediction",
    "saving": "Saving: where and how the LoRA is written",
    "validation": "Validation and numerical safety",
    "logging": "Logging",
}

_BASE_TYPE_NAMES: dict[Any, str] = {
    int: "integer",
    float: "number",
    bool: "true / false",
    str: "string",
    Path: "path",
}

_INTRO = """\
# Training config reference

<!-- Generated from lora_scripts/config/schema.py by `python -m lora_scripts.config.reference`;
     do not edit by hand. -->

A training config is a YAML file of `key: value` lines; `configs/` holds commented examples. Only the
keys marked **required** must be given, every other key has the default shown.

- Unknown keys are errors, with a suggestion: `learnig_rate: unknown key (did you mean 'learning_rate'?)`.
  Every problem in a file is reported at once, as `<file>: <key>: <problem>`.
- Numbers may be written as `0.0002` or `2e-4`.
- Relative paths start from the directory you run the command in, not from the config file's folder.
- `null` (or leaving the key out) means "use the default"; for keys whose default is derived from another
  key (e.g. `lora_alpha`), training writes the filled-in value to `config.yaml` in `output_dir`.
"""


def render_reference() -> str:
    """The whole Markdown reference (what docs/config.md holds)."""
    parts = [_INTRO]
    for section, names in TrainConfig.fields_by_section().items():
        if section not in SECTIONS or not names:
            continue
        parts.append(f"\n## {SECTION_TITLES[section]}\n\n")
        parts.append("| Key | Type | Default | Allowed | Description |\n")
        parts.append("|---|---|---|---|---|\n")
        for name in names:
            cells = [f"`{name}`", type_text(name), default_text(name), allowed_text(name), _description(name)]
            parts.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |\n")
    parts.append("\n## Coming from kohya sd-scripts\n\n")
    parts.append("These names are not keys here; the loader suggests the key to use instead.\n\n")
    parts.append("| kohya / diffusers name | key here |\n|---|---|\n")
    for alias, key in sorted(KNOWN_ALIASES.items()):
        parts.append(f"| `{alias}` | `{key}` |\n")
    return "".join(parts)


def type_text(name: str) -> str:
    """The type of field `name` in words, e.g. 'integer', 'list of strings', 'number or null'."""
    annotation, nullable = _unwrap(TrainConfig.model_fields[name].annotation)
    text = _type_words(annotation)
    return f"{text} or null" if nullable else text


def _type_words(annotation: Any) -> str:
    if get_origin(annotation) is Literal:
        return "choice"
    if get_origin(annotation) in (tuple, list):
        item, _ = _unwrap(get_args(annotation)[0])
        if isinstance(item, type) and issubclass(item, BaseModel):
            return "list of mappings"
        return f"list of {_BASE_TYPE_NAMES[item]}s"
    if get_origin(annotation) is dict:
        return "mapping"
    if get_origin(annotation) in (Union, types.UnionType):  # e.g. a list of prompts or a prompt file
        return " or ".join(_type_words(_unwrap(arg)[0]) for arg in get_args(annotation))
    return _BASE_TYPE_NAMES[annotation]


def default_text(name: str) -> str:
    """The default of field `name` as written in YAML, or how it is derived; 'required' if there is none."""
    field = TrainConfig.model_fields[name]
    if field.default is PydanticUndefined:
        return "**required**"
    described = field_default_doc(name)
    if described is not None:
        return described
    return f"`{_yaml_text(field.default)}`"


def allowed_text(name: str) -> str:
    """Allowed values or ranges of field `name`, e.g. '≥ 1', 'multiple of 8', or the list of choices."""
    choices = allowed_values(name)
    if choices is not None:
        return ", ".join(f"`{choice}`" for choice in choices)
    if name in MUST_EXIST:
        return f"an existing {MUST_EXIST[name]}"
    described = field_allowed_doc(name)
    if described is not None:
        return described
    annotation, _ = _unwrap(TrainConfig.model_fields[name].annotation)
    if annotation is bool:
        return "`true`, `false`"
    rules: list[str] = []
    for rule in TrainConfig.model_fields[name].metadata:
        if isinstance(rule, Ge):
            rules.append(f"≥ {rule.ge}")
        elif isinstance(rule, Gt):
            rules.append(f"> {rule.gt}")
        elif isinstance(rule, Le):
            rules.append(f"≤ {rule.le}")
        elif isinstance(rule, Lt):
            rules.append(f"< {rule.lt}")
        elif isinstance(rule, MultipleOf):
            rules.append(f"multiple of {rule.multiple_of}")
        elif isinstance(rule, MinLen) and annotation is str:
            rules.append("not empty")
        elif isinstance(rule, MinLen):
            rules.append(f"at least {rule.min_length} item{'s' if rule.min_length != 1 else ''}")
    return ", ".join(rules) or "any"


def key_facts(name: str) -> dict[str, Any]:
    """What a form needs to show field `name`, as plain JSON types: its widget kind ("bool", "int", "float",
    "choice", "path", "string", "list", "mapping", "other"), type and allowed values in words, default
    (None when required or derived), choices, numeric bounds and help."""
    field = TrainConfig.model_fields[name]
    annotation, nullable = _unwrap(field.annotation)
    bounds: dict[str, Any] = {}
    for rule in field.metadata:
        for attr in ("ge", "gt", "le", "lt", "multiple_of"):
            if hasattr(rule, attr) and getattr(rule, attr) is not None:
                bounds[attr] = getattr(rule, attr)
    required = field.default is PydanticUndefined and field.default_factory is None
    default = None if required else field.get_default(call_default_factory=True)
    return {
        "name": name,
        "kind": _kind(annotation),
        "nullable": nullable,
        "required": required,
        "type": type_text(name),
        "default": _json_value(default),
        "default_text": default_text(name),
        "allowed": allowed_text(name),
        "choices": None if allowed_values(name) is None else [_json_value(c) for c in allowed_values(name)],
        "bounds": bounds,
        "help": _description(name),
    }


def _kind(annotation: Any) -> str:
    if get_origin(annotation) is Literal:
        return "choice"
    if get_origin(annotation) in (tuple, list):
        return "list"
    if get_origin(annotation) is dict:
        return "mapping"
    simple = {bool: "bool", int: "int", float: "float", str: "string", Path: "path"}
    return simple.get(annotation, "other")


def _json_value(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, tuple | list):
        return [_json_value(item) for item in value]
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    return value


def _description(name: str) -> str:
    return TrainConfig.model_fields[name].description or ""


def _unwrap(annotation: Any) -> tuple[Any, bool]:
    """Strip Optional[...] and Annotated[...]: (bare type, whether null is allowed)."""
    nullable = False
    while get_origin(annotation) is Annotated:
        annotation = get_args(annotation)[0]
    if get_origin(annotation) in (Union, types.UnionType):
        args = get_args(annotation)
        rest = [arg for arg in args if arg is not type(None)]
        nullable = len(rest) < len(args)
        annotation = rest[0] if len(rest) == 1 else Union[tuple(rest)]  # noqa: UP007 - built at run time
    while get_origin(annotation) is Annotated:
        annotation = get_args(annotation)[0]
    return annotation, nullable


def _yaml_text(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, tuple | list):
        return "[" + ", ".join(_yaml_text(item) for item in value) + "]"
    return str(value)


def main() -> None:
    """Print the reference to stdout."""
    print(render_reference(), end="")


if __name__ == "__main__":
    main()
