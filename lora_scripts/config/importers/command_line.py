"""Read a pasted sd-scripts command line (`accelerate launch train_network.py --a=1 \\ ...`) as options."""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field
from typing import Any

from lora_scripts.errors import UserError

# A line continuation: `\` (sh), `^` (cmd.exe .bat) or a backtick (PowerShell) at the end of a line.
_CONTINUATION = re.compile(r"[\\^`][ \t]*\r?\n")


@dataclass
class CommandLine:
    """The training script's name and its options in order; a flag is True, `--x a b` a list of strings."""

    script: str
    options: dict[str, Any] = field(default_factory=dict)
    launcher_args: list[str] = field(default_factory=list)  # `accelerate launch` options, not training ones


def parse_command_line(text: str, source: str) -> CommandLine:
    """Find the `*.py` training script in `text` (a shell script or pasted command); parse its options."""
    joined = _CONTINUATION.sub(" ", text)
    for line in joined.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", "rem ", "REM ", "::")):
            continue
        try:
            tokens = shlex.split(line, posix=True)
        except ValueError as exc:
            raise UserError(f"{source}: cannot read the command line ({exc}); check its quotes.") from exc
        script_at = next((i for i, t in enumerate(tokens) if t.endswith(".py")), None)
        if script_at is not None:
            return CommandLine(
                script=tokens[script_at],
                options=_parse_options(tokens[script_at + 1 :], source),
                launcher_args=[t for t in tokens[:script_at] if t.startswith("--")],
            )
    raise UserError(f"{source}: no sd-scripts command found (a line running train_network.py or the like).")


def _parse_options(tokens: list[str], source: str) -> dict[str, Any]:
    options: dict[str, Any] = {}
    name: str | None = None
    for token in tokens:
        if token.startswith("--"):
            name, eq, value = token[2:].partition("=")
            name = name.replace("-", "_")
            options[name] = value if eq else True
            if eq:
                name = None  # `--a=1` takes no more values
            continue
        if name is None:
            raise UserError(
                f"{source}: '{token}' is not an option (options start with --); check the quotes."
            )
        current = options[name]
        if current is True:
            options[name] = token
        elif isinstance(current, list):
            current.append(token)
        else:
            options[name] = [current, token]
    return options
