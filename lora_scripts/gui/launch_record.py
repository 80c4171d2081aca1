"""The Train page's queue on disk, so that a server restart loses neither the runs waiting their turn nor
the runs that ended before they wrote any progress (a broken config: only their `train.log` tells why).

`<first root>/.lora-scripts/launches.json` (a hidden folder, which the pages and `find_runs` skip) holds the
queued launches in order and the ended ones, rewritten atomically after every change. A run that was going
when the server stopped is found again through its output folder; if it wrote nothing there, the record
shows it as "unknown" with its log.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lora_scripts.export.atomic import write_text_atomic

log = logging.getLogger(__name__)
RECORD_FOLDER = ".lora-scripts"
RECORD_FILE = "launches.json"
VERSION = 1


@dataclass
class LaunchRecord:
    """One launch as it is kept: `state` queued, running or ended; `returncode` None when not known."""

    config_path: Path
    output_dir: Path
    resume: bool
    state: str
    queued_at: float
    returncode: int | None = None
    dequeued: bool = False

    def to_json(self) -> dict[str, Any]:
        return {
            "config": str(self.config_path),
            "output_dir": str(self.output_dir),
            "resume": self.resume,
            "state": self.state,
            "queued_at": self.queued_at,
            "returncode": self.returncode,
            "dequeued": self.dequeued,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> LaunchRecord:
        return cls(
            config_path=Path(data["config"]),
            output_dir=Path(data["output_dir"]),
            resume=bool(data["resume"]),
            state=str(data["state"]),
            queued_at=float(data["queued_at"]),
            returncode=None if data.get("returncode") is None else int(data["returncode"]),
            dequeued=bool(data.get("dequeued", False)),
        )


class LaunchStore:
    """Reads and writes the record file; a damaged file is set aside (logged), never a reason to fail."""

    def __init__(self, root: Path) -> None:
        self.path = Path(root) / RECORD_FOLDER / RECORD_FILE

    def load(self) -> list[LaunchRecord]:
        if not self.path.is_file():
            return []
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            if data.get("version") != VERSION:
                raise ValueError(f"version {data.get('version')!r}")
            return [LaunchRecord.from_json(item) for item in data["launches"]]
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
            aside = self.path.with_name(self.path.name + ".damaged")
            log.warning("Ignoring %s (%s); it is kept as %s", self.path, err, aside.name)
            try:
                self.path.replace(aside)
            except OSError:
                pass
            return []

    def save(self, records: list[LaunchRecord]) -> None:
        text = json.dumps({"version": VERSION, "launches": [r.to_json() for r in records]}, indent=1)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            write_text_atomic(self.path, text + "\n")
        except OSError as err:  # a read-only root: the queue still works, only a restart forgets it
            log.warning("Cannot write %s (%s); a restart of the app will forget the queue", self.path, err)
