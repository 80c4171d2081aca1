"""Load a training config from YAML and report every mistake in it at once, in plain sentences.

Each message reads `<file>: <key>: <problem>`, e.g.
`configs/x.yaml: learnig_rate: unknown key (did you mean 'learning_rate'?)`. Pydantic's error types are
translated here so that users never see its wording or URLs.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from lora_scripts.config.cross_keys import cross_key_problems
from lora_scripts.config.keys_data import PER_DATASET_KEYS
from lora_scripts.config.schema import TrainConfig, allowed_values, field_what
from lora_scripts.errors import UserError
from lora_scripts.export.atomic import write_text_atomic
from lora_scripts.models.locate import base_model_problem

# Names users bring from kohya sd-scripts or the diffusers examples for keys spelt differently here.
KNOWN_ALIASES: dict[str, str] = {
    "network_dim": "lora_rank",
    "network_alpha": "lora_alpha",
    "rank": "lora_rank",
    "train_batch_size": "batch_size",
    "max_train_epochs": "epochs",
    "num_train_epochs": "epochs",
    "conv_dim": "conv_rank",
    "network_weight": "network_weights",
    "optimizer": "optimizer_type",
    "lr_scheduler_type": "lr_scheduler",
    "reg_dir": "reg_data_dir",
    "class_data_dir": "reg_data_dir",
    "with_prior_preservation": "reg_data_dir",
    "random_flip": "flip_aug",
    "snr_gamma": "min_snr_gamma",
    "prediction_type": "v_parameterization",
    "caption_column": "metadata_path",
    "pretrained_model_name_or_path": "base_model",
    "save_every_n_steps": "save_steps",
    "checkpointing_steps": "save_steps",
    "lr_warmup": "lr_warmup_steps",
    "max_train_step": "max_train_steps",
}

# Keys whose value must name something that exists: key -> "folder" or "file".
MUST_EXIST: dict[str, str] = {
    "train_data_dir": "folder",
    "metadata_path": "file",
    "base_model_config": "folder",
    "reg_data_dir": "folder",
    "network_weights": "file",
    "validation_data_dir": "folder",
    "vae": "file",
    "clip_l": "file",
    "t5xxl": "file",
}

_MAX_SHOWN = 60  # characters of a value quoted in a message


def load_config(
    path: str | Path, overrides: Mapping[str, Any] | None = None, *, check_paths: bool = True
) -> TrainConfig:
    """Read the YAML config at `path`, apply `overrides` (key -> value, e.g. from the command line) and
    return the validated config with every derived default filled in.

    With `check_paths=False` nothing on disk is looked at (useful to check a config written for another
    machine). Raises UserError listing every problem, each as `<file>: <key>: <problem>`.
    """
    source = str(path)
    data, duplicates = _read_yaml(Path(path), source)
    if overrides:
        data = {**data, **overrides}
    return _validate(data, source, check_paths=check_paths, earlier_problems=duplicates)


def validate_config_dict(data: Mapping[str, Any], source: str, *, check_paths: bool = True) -> TrainConfig:
    """Validate a config given as a mapping (`source` names it in messages) and return it resolved.

    Raises UserError listing every problem found: unknown keys, wrong types, out-of-range values, missing
    required keys, paths that do not exist (only for values of the right type) and cross-key conflicts.
    """
    return _validate(data, source, check_paths=check_paths, earlier_problems=[])


def _validate(
    data: Mapping[str, Any], source: str, *, check_paths: bool, earlier_problems: list[tuple[str, str]]
) -> TrainConfig:
    """validate_config_dict, also reporting problems found while reading the file (duplicate keys)."""
    if not isinstance(data, Mapping):
        raise UserError([f"{source}: the top level must be a mapping of keys to values, not a {_kind(data)}"])
    data = {str(key): value for key, value in data.items()}
    order = {key: i for i, key in enumerate(data)}
    problems: list[tuple[int, str, str]] = []  # (position of the key, key path, problem)
    for key, problem in earlier_problems:
        problems.append((order.get(key, len(order)), key, problem))

    config: TrainConfig | None = None
    bad_keys: set[str] = set()
    try:
        config = TrainConfig.model_validate(data)
    except ValidationError as err:
        for key_path, problem, top_key in _translate(err.errors(), data):
            bad_keys.add(top_key)
            problems.append((order.get(top_key, len(order) + _field_index(top_key)), key_path, problem))

    if data.get("train_data_dir") is None and data.get("datasets") is None:
        # Not required by the schema (datasets may replace it), so pydantic does not report it.
        if "train_data_dir" in data:
            problems.append((order["train_data_dir"], "train_data_dir", _null_problem("train_data_dir")))
        else:
            problem = "missing required key (the folder of training images)"
            problems.append((len(order) + _field_index("train_data_dir"), "train_data_dir", problem))
    if check_paths:
        for key, problem in _path_problems(data, skip=bad_keys):
            problems.append((order.get(key.split("[")[0], len(order)), key, problem))
    if config is not None:
        for key, problem in cross_key_problems(config):
            problems.append((order.get(key, len(order)), key, problem))

    if problems:
        problems.sort(key=lambda item: item[0])
        raise UserError([f"{source}: {key_path}: {problem}" for _, key_path, problem in problems])
    assert config is not None
    if "resolution" not in data and check_paths:
        config = config.model_copy(update={"resolution": _native_resolution(config.base_model)})
    return config.resolved()


def _native_resolution(base_model: str) -> int:
    """The resolution a base model was trained at (SDXL 1024, SD 512), the default of `resolution`.

    Only the model family knows it, from the file's header or the folder's configs, so this reaches up into
    models/ (lazily: the config layer is below it). A base model that cannot be read keeps the schema's 512;
    `check` and `train` then report what is wrong with it.
    """
    from lora_scripts.models.registry import native_resolution

    try:
        return native_resolution(base_model)
    except UserError:
        return TrainConfig.model_fields["resolution"].default


def dump_config(config: TrainConfig, path: str | Path) -> None:
    """Write `config` (normally resolved) as YAML, in schema order, so that `load_config` reads it back."""
    text = yaml.safe_dump(config.to_yaml_dict(), sort_keys=False, allow_unicode=True)
    write_text_atomic(Path(path), text)


# --- reading YAML ---


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that notes duplicate keys (PyYAML silently keeps the last one)."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self.duplicates: list[tuple[str, int, int]] = []  # (key, first line, repeated line), 1-based

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            try:
                if key in seen:
                    self.duplicates.append((str(key), seen[key], line))
                else:
                    seen[key] = line
            except TypeError:  # an unhashable key: let PyYAML report it
                pass
        return super().construct_mapping(node, deep=deep)


def _read_yaml(path: Path, source: str) -> tuple[dict[str, Any], list[tuple[str, str]]]:
    """Parse the config file into (data, [(key, problem)] for duplicate keys).

    Every way the file cannot be read at all becomes one UserError sentence.
    """
    if not path.exists():
        raise UserError([f"{source}: config file not found"])
    if path.is_dir():
        raise UserError([f"{source}: is a folder, not a YAML config file"])
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserError([f"{source}: is not a UTF-8 text file; save the config as UTF-8 text"]) from None
    loader = _StrictLoader(text)
    try:
        data = loader.get_single_data()
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        problem = err.problem or err.context or "unreadable YAML"
        hint = "check the indentation, colons and quotes there"
        raise UserError([f"{source}: {where}YAML syntax error ({problem}); {hint}"]) from None
    except yaml.YAMLError as err:
        raise UserError([f"{source}: YAML syntax error ({err})"]) from None
    finally:
        loader.dispose()
    if data is None:
        raise UserError([f"{source}: the file is empty; write one 'key: value' line per setting"])
    if not isinstance(data, dict):
        raise UserError(
            [f"{source}: the top level must be a mapping of 'key: value' lines, not a {_kind(data)}"]
        )
    duplicates = [
        (key, f"duplicate key (lines {first} and {again}); keep only one")
        for key, first, again in loader.duplicates
    ]
    return data, duplicates


# --- translating pydantic errors ---


def _translate(errors: Iterable[Any], data: Mapping[str, Any]) -> list[tuple[str, str, str]]:
    """Turn pydantic errors into (key path, problem, top-level key), one per problem a user can fix."""
    errors = list(errors)
    # A list with a bad item also fails min_length (pydantic counts only the valid items): report the item.
    with_item_errors = {e["loc"][0] for e in errors if len(e["loc"]) > 1}
    out: list[tuple[str, str, str]] = []
    for error in errors:
        loc = error["loc"]
        top = str(loc[0]) if loc else ""
        if len(loc) > 1 and isinstance(loc[1], str) and (loc[1] == "str" or "[" in loc[1]):
            # A union (a preset name or a list): keep only the branch of the value's own kind, and drop
            # pydantic's branch tag from the key path.
            if (loc[1] == "str") != isinstance(data.get(top), str):
                continue
            loc = (loc[0], *loc[2:])
        if error["type"] == "too_short" and len(error["loc"]) <= 2 and top in with_item_errors:
            continue
        key_path = top + "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in loc[1:])
        if top == "datasets" and len(loc) >= 3 and isinstance(loc[-1], str):
            out.append((key_path, _dataset_entry_problem(error, str(loc[-1]), data), top))
        else:
            out.append((key_path, _problem(error, top, data), top))
    return out


def _problem(error: Mapping[str, Any], key: str, data: Mapping[str, Any]) -> str:
    """One pydantic error as a plain sentence (without the key, which the caller prefixes)."""
    kind: str = error["type"]
    value = error.get("input")
    ctx: Mapping[str, Any] = error.get("ctx") or {}
    shown = _show(value)

    if kind == "extra_forbidden":
        suggestion = _suggest_key(key)
        return f"unknown key (did you mean '{suggestion}'?)" if suggestion else "unknown key"
    if kind == "missing":
        what = field_what(key)
        return f"missing required key ({what})" if what else "missing required key"
    if value is None and key in data and len(error["loc"]) == 1:
        return _null_problem(key)
    if kind == "lora_bool_not_number":
        return f"{shown} is not a number"
    if kind.startswith("lora_"):  # raised by the schema's own validators, already in plain words
        return str(error["msg"])
    if kind in ("int_parsing", "int_type", "int_from_float"):
        return f"{shown} is not an integer"
    if kind in ("float_parsing", "float_type"):
        return f"{shown} is not a number"
    if kind == "finite_number":
        return f"{shown} is not a finite number"
    if kind in ("bool_parsing", "bool_type"):
        return f"{shown} is not true or false"
    if kind == "string_type":
        return f"{shown} is not a string"
    if kind == "string_too_short":
        return "an empty string is not allowed"
    if kind == "path_type":
        return f"{shown} is not a path (write it as a string, e.g. './data/my_images')"
    if kind in ("tuple_type", "list_type"):
        example = f'["{value}"]' if isinstance(value, str) else '["to_q", "to_v"]'
        return f"{shown} is not a list (write it as {example})"
    if kind == "too_short":
        return f"{shown} is empty (give at least one value)"
    if kind in ("literal_error", "enum"):
        return _choice_problem(key, value)
    if kind in ("greater_than_equal", "greater_than", "less_than_equal", "less_than"):
        symbol = {"greater_than_equal": "≥", "greater_than": ">", "less_than_equal": "≤", "less_than": "<"}
        bound = next(iter(ctx.values()))
        if isinstance(bound, float) and bound.is_integer():
            bound = int(bound)
        return f"{shown} is out of range (must be {symbol[kind]} {bound})"
    if kind == "string_pattern_mismatch" and key == "caption_extension":
        return f"{shown} is not a file extension (write it with a dot, e.g. '.txt')"
    if kind == "dict_type":
        return f"{shown} is not a mapping (write it as {{name: value, ...}})"
    if kind == "multiple_of":
        return f"{shown} is not a multiple of {ctx['multiple_of']}"
    return f"{shown} is not valid"


def _dataset_entry_problem(error: Mapping[str, Any], name: str, data: Mapping[str, Any]) -> str:
    """A problem inside one `datasets` entry, where `name` is the entry's key."""
    if error["type"] == "extra_forbidden":
        if name in TrainConfig.model_fields:
            return "cannot be set per dataset; set it once at the top level of the config"
        close = difflib.get_close_matches(name, list(PER_DATASET_KEYS), n=1, cutoff=0.6)
        return f"unknown key (did you mean '{close[0]}'?)" if close else "unknown key"
    if error["type"] == "missing":
        return "missing required key (the folder of this dataset's images)"
    if error["type"] == "string_pattern_mismatch":
        return f"{_show(error.get('input'))} is not a file extension (write it with a dot, e.g. '.txt')"
    return _problem(error, name, {})


def _null_problem(key: str) -> str:
    """`key: null` (or an empty value) for a key that does not accept null."""
    what = field_what(key)
    if what is not None:
        return f"has no value ({what})"
    default = TrainConfig.model_fields[key].default
    if isinstance(default, tuple):
        default = list(default)
    return f"null is not allowed (leave the key out to use the default, {_show(default)})"


def _choice_problem(key: str, value: Any) -> str:
    choices = allowed_values(key) or ()
    listed = ", ".join(f"'{choice}'" for choice in choices)
    message = f"{_show(value)} is not one of {listed}"
    close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1, cutoff=0.6)
    return message + (f" (did you mean '{close[0]}'?)" if close else "")


def _suggest_key(key: str) -> str | None:
    if key in KNOWN_ALIASES:
        return KNOWN_ALIASES[key]
    close = difflib.get_close_matches(key, list(TrainConfig.model_fields), n=1, cutoff=0.6)
    return close[0] if close else None


def _show(value: Any) -> str:
    """A value as the user would recognise it from YAML: 'text', 3, true, null, [...]."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str | Path):
        text = repr(str(value))
    elif isinstance(value, list | tuple):
        text = "[" + ", ".join(_show(item) for item in value) + "]"
    elif isinstance(value, Mapping):
        text = "{" + ", ".join(f"{k}: {_show(v)}" for k, v in value.items()) + "}"
    else:
        text = repr(value)
    return text if len(text) <= _MAX_SHOWN else text[: _MAX_SHOWN - 3] + "..."


def _kind(value: Any) -> str:
    if isinstance(value, list):
        return "list"
    if isinstance(value, str):
        return "single string"
    return type(value).__name__


def _field_index(key: str) -> int:
    names = list(TrainConfig.model_fields)
    return names.index(key) if key in names else len(names)


# --- checks beyond types ---


def _path_problems(data: Mapping[str, Any], skip: set[str]) -> list[tuple[str, str]]:
    """Paths that must exist but do not; only for keys given as a non-empty string without type errors."""
    problems: list[tuple[str, str]] = []
    for key, kind in MUST_EXIST.items():
        value = data.get(key)
        if key in skip or not isinstance(value, str | Path) or not str(value).strip():
            continue
        problem = _missing_path(Path(value).expanduser(), value, kind)
        if problem:
            problems.append((key, problem))
    entries = data.get("datasets")
    if "datasets" not in skip and isinstance(entries, list):
        for i, entry in enumerate(entries):
            if not isinstance(entry, Mapping):
                continue
            for key, kind in (("train_data_dir", "folder"), ("metadata_path", "file")):
                value = entry.get(key)
                if isinstance(value, str | Path) and str(value).strip():
                    problem = _missing_path(Path(value).expanduser(), value, kind)
                    if problem:
                        problems.append((f"datasets[{i}].{key}", problem))
    resume = data.get("resume")
    if "resume" not in skip and isinstance(resume, str) and resume.strip() and resume != "auto":
        if not Path(resume).expanduser().is_dir():
            problems.append(
                ("resume", f"'{resume}' is not a saved state folder; write auto, or a folder in state/")
            )
    base_model = data.get("base_model")
    if "base_model" not in skip and isinstance(base_model, str) and base_model.strip():
        problem = base_model_problem(base_model)
        if problem is not None:
            problems.append(("base_model", problem.removeprefix("base_model: ")))
    return problems


def _missing_path(path: Path, value: Any, kind: str) -> str | None:
    if kind == "folder" and not path.is_dir():
        return f"'{value}' is a file, not a folder" if path.is_file() else f"folder '{value}' does not exist"
    if kind == "file" and not path.is_file():
        return f"'{value}' is a folder, not a file" if path.is_dir() else f"file '{value}' does not exist"
    return None
