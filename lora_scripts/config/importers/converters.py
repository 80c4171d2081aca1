"""Value converters for imported options: each takes the source value (TOML-typed, or a string from a command
line) and returns ours, or raises ValueError with the reason the value has no equivalent."""

from __future__ import annotations

import ast
import math
from collections.abc import Callable
from typing import Any

Converter = Callable[[Any], Any]


def same(value: Any) -> Any:
    return value


def as_str(value: Any) -> str:
    if isinstance(value, list):
        value = " ".join(str(v) for v in value)  # an unquoted path with spaces on a command line
    return str(value)


def as_int(value: Any) -> int:
    if isinstance(value, bool):
        raise ValueError("expected a whole number")
    number = float(value)
    if not number.is_integer():
        raise ValueError(f"{value} is not a whole number")
    return int(number)


def as_float(value: Any) -> float:
    if isinstance(value, bool):
        raise ValueError("expected a number")
    return float(value)


def int_or_float(value: Any) -> int | float:
    """sd-scripts' int_or_float: a whole number of steps, or a fraction of the run below 1."""
    number = float(value)
    return (
        int(number) if number.is_integer() and (isinstance(value, int) or "." not in str(value)) else number
    )


def as_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "1", "yes"):
        return True
    if text in ("false", "0", "no"):
        return False
    raise ValueError(f"{value!r} is not true or false")


def float_or_list(value: Any) -> float | list[float]:
    """text_encoder_lr: one rate, or one per text encoder (sd-scripts' nargs='*')."""
    if isinstance(value, list):
        rates = [float(v) for v in value]
        return rates[0] if len(rates) == 1 else rates
    if isinstance(value, str) and " " in value.strip():
        return float_or_list(value.split())
    return float(value)


def resolution(value: Any) -> int:
    """'512', '512,512' or [768, 512] -> one side; a non-square size keeps its area (buckets: side²)."""
    if isinstance(value, (list, tuple)):
        sides = [int(v) for v in value]
    else:
        sides = [int(float(v)) for v in str(value).replace("x", ",").split(",") if v.strip()]
    if len(sides) == 1 or sides[0] == sides[1]:
        return sides[0]
    return int(round(math.sqrt(sides[0] * sides[1]) / 8) * 8)


def key_values(value: Any) -> dict[str, Any]:
    """['betas=0.9,0.99', 'weight_decay=0.1'] -> {'betas': [0.9, 0.99], 'weight_decay': 0.1}."""
    items = value if isinstance(value, list) else str(value).split()
    out: dict[str, Any] = {}
    for item in items:
        name, eq, text = str(item).partition("=")
        if not eq:
            raise ValueError(f"'{item}' is not key=value")
        out[name.strip()] = _literal(text.strip())
    return out


def _literal(text: str) -> Any:
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text
    return list(value) if isinstance(value, tuple) else value


def choice(mapping: dict[str, str], what: str) -> Converter:
    """A converter for a name picked from `mapping` (sd-scripts' spelling, any case -> ours)."""

    def convert(value: Any) -> str:
        name = str(value).strip()
        ours = mapping.get(name.lower())
        if ours is None:
            raise ValueError(
                f"{what} '{name}' has no equivalent here (supported: {', '.join(sorted(mapping))})"
            )
        return ours

    return convert


def precision(value: Any) -> str:
    return choice({"float": "fp32", "fp32": "fp32", "fp16": "fp16", "bf16": "bf16"}, "save_precision")(value)


def true_if_set(value: Any) -> bool:
    """A flag option that sets one of our keys to true (given as a flag or `key = true`)."""
    if not as_bool(value):
        raise ValueError("false: the same as leaving it out")
    return True
