"""AUTOMATIC1111's "infotext": the generation parameters written into each PNG's `parameters` text chunk.

The format (modules/processing.py `create_infotext`, modules/infotext_utils.py):

    ancient temple, <lora:ink_painting_v1:0.7>, ink wash painting
    Negative prompt: modern, cartoon
    Steps: 30, Sampler: Euler a, CFG scale: 7, Seed: 42, Size: 512x512, Model hash: 6ce0161689, …
        … Model: v1-5-pruned, Lora hashes: "ink_painting_v1: 0123456789ab", Version: lora-scripts 0.1.0

(the last line is one line, wrapped here).
The prompt is the one the user wrote, tags included (WebUI re-applies the LoRAs when it is pasted back); the
negative line is left out when empty; a value containing `,`, `:` or a newline is JSON-quoted. WebUI,
Civitai and most image browsers read this; `parse_infotext` reads it back.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from pathlib import Path

from lora_scripts import __version__

VERSION = f"lora-scripts {__version__}"
PNG_TEXT_KEY = "parameters"

# A1111's `re_param_code`: `Key: value` pairs, a value either JSON-quoted or running to the next comma.
_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
_IMAGE_SIZE = re.compile(r"^(\d+)x(\d+)$")
_HASH_BLOCK = 1024 * 1024


def format_number(value: float) -> str:
    """`7.0` -> `7`, `7.5` -> `7.5`, `0.1` -> `0.1`: the shortest exact repr, no trailing `.0`."""
    if float(value).is_integer():
        return str(int(value))
    return repr(float(value))


def quote(value: object) -> str:
    """A1111's `quote`: JSON-quote a value only when it contains `,`, `:` or a newline."""
    text = str(value)
    if "," not in text and "\n" not in text and ":" not in text:
        return text
    return json.dumps(text, ensure_ascii=False)


def unquote(text: str) -> str:
    """A1111's `unquote`: undo `quote` (text that is not valid JSON is returned as it is)."""
    if len(text) < 2 or text[0] != '"' or text[-1] != '"':
        return text
    try:
        return json.loads(text)
    except ValueError:
        return text


def format_lora_hashes(hashes: Mapping[str, str]) -> str:
    """`{"ink": "0123456789ab"}` -> `ink: 0123456789ab`; WebUI strips `:` and `,` from the names."""
    return ", ".join(f"{name.translate(str.maketrans('', '', ':,'))}: {h}" for name, h in hashes.items())


def parse_lora_hashes(value: str) -> dict[str, str]:
    """The inverse of `format_lora_hashes` (the unquoted "Lora hashes" value)."""
    pairs = (item.split(":", 1) for item in value.split(",") if ":" in item)
    return {name.strip(): h.strip() for name, h in pairs}


def build_infotext(
    *,
    prompt: str,
    negative_prompt: str,
    steps: int,
    sampler: str,
    cfg_scale: float,
    seed: int,
    width: int,
    height: int,
    model_hash: str | None = None,
    model_name: str | None = None,
    lora_hashes: Mapping[str, str] | None = None,
    extra: Mapping[str, object] | None = None,
) -> str:
    """The infotext of one image, fields in WebUI's order; `sampler` is the display name (`Euler a`).

    extra: further `Key: value` fields, placed before `Version` (values are quoted as needed).
    """
    params: dict[str, object] = {
        "Steps": steps,
        "Sampler": sampler,
        "CFG scale": format_number(cfg_scale),
        "Seed": seed,
        "Size": f"{width}x{height}",
        "Model hash": model_hash,
        "Model": model_name,
        "Lora hashes": format_lora_hashes(lora_hashes) if lora_hashes else None,
        **(extra or {}),
        "Version": VERSION,
    }
    return format_infotext(prompt, negative_prompt, params)


def format_infotext(prompt: str, negative_prompt: str, params: Mapping[str, object]) -> str:
    """A1111's layout: prompt, `Negative prompt: …` (if any), then `Key: value, …`; None values left out."""
    fields = ", ".join(f"{key}: {quote(value)}" for key, value in params.items() if value is not None)
    negative = f"\nNegative prompt: {negative_prompt}" if negative_prompt else ""
    return f"{prompt}{negative}\n{fields}".strip()


def parse_infotext(text: str) -> dict[str, str]:
    """A port of the essentials of A1111's `parse_generation_parameters`.

    Returns {"Prompt": …, "Negative prompt": …, "Steps": "30", "Sampler": "Euler a", …} with every value a
    string as WebUI keeps them; `Size: 512x512` also gives "Size-1" (width) and "Size-2" (height). The last
    line counts as parameters only when it holds at least 3 `Key: value` pairs, as in WebUI.
    """
    *lines, last = text.strip().split("\n")
    if len(_PARAM.findall(last)) < 3:
        lines.append(last)
        last = ""
    prompt: list[str] = []
    negative: list[str] = []
    for line in lines:
        line = line.strip()
        if line.startswith("Negative prompt:"):
            negative.append(line[len("Negative prompt:") :].strip())
        elif negative:
            negative.append(line)
        else:
            prompt.append(line)
    result = {"Prompt": "\n".join(prompt), "Negative prompt": "\n".join(negative)}
    for key, value in _PARAM.findall(last):
        value = unquote(value) if value[:1] == '"' and value[-1:] == '"' else value
        result[key] = value
        size = _IMAGE_SIZE.match(value)
        if size:
            result[f"{key}-1"], result[f"{key}-2"] = size.group(1), size.group(2)
    return result


def checkpoint_short_hash(path: Path) -> str:
    """WebUI's "Model hash": the first 10 hex characters of the sha256 of the whole checkpoint file."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(_HASH_BLOCK), b""):
            digest.update(block)
    return digest.hexdigest()[:10]
