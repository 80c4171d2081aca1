"""Which training states a run has saved, read from disk without loading anything (no torch): the folders
under `<output_dir>/state/` that are complete, oldest to newest. training/state.py writes and loads them; the
GUI's run list (training/runs.py) and `check` only need to find them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

FORMAT_VERSION = 1
PROGRESS_FILE = "progress.json"
STATE_PREFIX = "step-"


def state_name(step: int) -> str:
    return f"{STATE_PREFIX}{step:08d}"


def read_progress(folder: Path) -> dict[str, Any] | None:
    """progress.json of a complete state folder, or None when `folder` is not one."""
    try:
        data = json.loads((Path(folder) / PROGRESS_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("format") == FORMAT_VERSION else None


def list_states(root: Path) -> list[Path]:
    """The complete states under `root` (`<output_dir>/state`), oldest saved first."""
    if not Path(root).is_dir():
        return []
    found = []
    for folder in Path(root).iterdir():
        if folder.is_dir() and folder.name.startswith(STATE_PREFIX):
            progress = read_progress(folder)
            if progress is not None:
                found.append((progress.get("saved_at", 0.0), progress["global_step"], folder))
    return [folder for *_, folder in sorted(found)]


def latest_state(root: Path) -> Path | None:
    states = list_states(root)
    return states[-1] if states else None
