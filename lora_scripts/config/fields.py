"""Field types and validators shared by the config schema's sections (schema.py, keys_*.py)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any

from pydantic import AfterValidator, BeforeValidator, Field
from pydantic_core import PydanticCustomError, PydanticUndefined

# Characters that Windows or POSIX refuse in file names, plus control characters.
_BAD_NAME_CHARS = re.compile(r'[/\\:*?"<>|\x00-\x1f]')


def not_bool(value: Any) -> Any:
    """Refuse `true`/`false` where a number is expected (pydantic would read them as 1 and 0)."""
    if isinstance(value, bool):
        raise PydanticCustomError("lora_bool_not_number", "true or false is not a number", {})
    return value


def path_input(value: Any) -> Any:
    """Refuse an empty path (Path('') would silently mean the current folder); expand `~`."""
    if isinstance(value, str):
        if not value.strip():
            raise PydanticCustomError("lora_empty", "is empty", {})
        return Path(value).expanduser()
    return value


def yaml_no(value: Any) -> Any:
    """YAML 1.1 reads an unquoted `no` as false; `mixed_precision: no` means the string 'no'."""
    return "no" if value is False else value


def _file_stem(value: str) -> str:
    """Check that `value` can be used as a file name without extension."""
    if value != value.strip() or value in (".", "..") or _BAD_NAME_CHARS.search(value):
        raise PydanticCustomError(
            "lora_file_stem",
            "'{value}' is not a valid file name (no slashes, leading or trailing spaces, "
            'or any of : * ? " < > |)',
            {"value": value},
        )
    if value.lower().endswith(".safetensors"):
        raise PydanticCustomError(
            "lora_file_stem",
            "'{value}' includes the extension; write the name without '.safetensors'",
            {"value": value},
        )
    return value


def prompts_input(value: Any) -> Any:
    """A list of non-empty prompt strings, or a path: one clear message instead of a union's two."""
    if isinstance(value, list):
        for i, item in enumerate(value):
            if not isinstance(item, str) or not item.strip():
                raise PydanticCustomError(
                    "lora_prompt", "entry {index} is not a prompt (a non-empty string)", {"index": i}
                )
        return value
    if isinstance(value, str | Path):
        return path_input(value)
    raise PydanticCustomError("lora_prompts", "is neither a list of prompts nor a prompt file path", {})


def sampler_name(value: str) -> str:
    """Check that `value` names a sampler of `lora_scripts.generation.samplers`."""
    # Imported here: the samplers module pulls in diffusers, which the config should not need to load.
    from lora_scripts.errors import UserError
    from lora_scripts.generation.samplers import SAMPLERS, resolve_sampler

    try:
        resolve_sampler(value)
    except UserError:
        raise PydanticCustomError(
            "lora_sampler",
            "unknown sampler '{value}'; choose one of {choices}",
            {"value": value, "choices": ", ".join(f"'{key}'" for key in SAMPLERS)},
        ) from None
    return value


def _targets(value: Any, presets: tuple[str, ...]) -> Any:
    """A preset name, or a list of layer names; a lone layer name is the common mistake worth explaining."""
    if isinstance(value, str) and value not in presets:
        raise PydanticCustomError(
            "lora_targets",
            "'{value}' is not a preset ({presets}); to name layers, write a list such as ['{value}']",
            {"value": value, "presets": ", ".join(presets)},
        )
    return value


def text_encoder_lrs(value: Any) -> Any:
    """A rate for every text encoder (a number > 0), or one per text encoder as sd-scripts' SDXL
    `--text_encoder_lr te1 te2` or FLUX.1's [clip_l, t5] (a list of one or two numbers >= 0, not all 0; 0
    leaves that encoder frozen)."""
    # PyYAML reads 1e-5 (no '.') as text; pydantic would coerce a lone one after these checks, a listed one
    # not at all, so numbers written that way are read here, as the docs promise ("0.0002 or 2e-4").
    value = [_yaml_number(v) for v in value] if isinstance(value, list | tuple) else _yaml_number(value)
    if isinstance(value, bool):
        raise PydanticCustomError("lora_lr", "is a boolean, not a learning rate", {})
    if isinstance(value, int | float):
        if value <= 0:
            raise PydanticCustomError("lora_lr", "must be greater than 0 (got {value})", {"value": value})
        return float(value)
    if isinstance(value, list | tuple):
        if not 1 <= len(value) <= 2 or not all(
            isinstance(v, int | float) and not isinstance(v, bool) and v >= 0 for v in value
        ):
            raise PydanticCustomError(
                "lora_lr",
                "must be a number, or a list of one or two numbers >= 0 (one per text encoder, as "
                "[te1_lr, te2_lr] for SDXL, [clip_l_lr, t5_lr] for FLUX.1)",
                {},
            )
        if not any(value):
            raise PydanticCustomError(
                "lora_lr", "gives every text encoder rate 0; set train_text_encoder: false instead", {}
            )
        return float(value[0]) if len(value) == 1 else tuple(float(v) for v in value)
    return value


def _yaml_number(value: Any) -> Any:
    """'5e-5' → 5e-05; anything else unchanged."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def unet_targets(value: Any) -> Any:
    from lora_scripts.models.lora_presets import UNET_PRESETS  # the presets live beside the code using them

    return _targets(value, UNET_PRESETS)


def text_encoder_targets(value: Any) -> Any:
    from lora_scripts.models.lora_presets import TEXT_ENCODER_PRESETS

    return _targets(value, TEXT_ENCODER_PRESETS)


Int = Annotated[int, BeforeValidator(not_bool)]
Float = Annotated[float, BeforeValidator(not_bool)]
PathValue = Annotated[Path, BeforeValidator(path_input)]
NonEmptyStr = Annotated[str, Field(min_length=1)]
FileStem = Annotated[str, Field(min_length=1), AfterValidator(_file_stem)]


def field(
    section: str,
    description: str,
    default: Any = PydanticUndefined,
    *,
    what: str | None = None,
    default_doc: str | None = None,
    allowed_doc: str | None = None,
    **constraints: Any,
) -> Any:
    """A pydantic Field tagged with its doc section (and, for required keys, what it is)."""
    extra: dict[str, Any] = {"section": section}
    if what is not None:
        extra["what"] = what
    if default_doc is not None:
        extra["default_doc"] = default_doc
    if allowed_doc is not None:
        extra["allowed_doc"] = allowed_doc
    return Field(default, description=description, json_schema_extra=extra, **constraints)
