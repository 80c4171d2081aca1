"""Training runs as their output folders show them, for the GUI and any other program that watches runs.

Everything is read from disk, so a watcher that restarts loses nothing: `progress.jsonl` (the run's events,
training/progress_file.py), the run lock (training/run_lock.py: whether the run is still going, and its pid),
the LoRA files, `sample/`, `state/` and the log. Nothing here imports torch.

The log is `<output_dir>/train.log`, which the run does not write itself: a program that starts a run sends
the run's stdout and stderr there (everything: warnings, tracebacks, the last words of a crash), and
`read_log_tail` reads its end. Progress bars redraw with a carriage return; a line reads as a terminal would
show it. A run started from a terminal has no such file unless its output was sent there
(`lora-scripts train --config x.yaml 2>&1 | tee <output_dir>/train.log`).

`request_stop` asks a running run to stop as Ctrl-C does, on every OS (the stop file).
"""

from __future__ import annotations

import bisect
import json
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from lora_scripts.training.output_dir import STATE_FOLDER
from lora_scripts.training.progress_file import PROGRESS_FILE_NAME, stop_file_path
from lora_scripts.training.run_lock import LOCK_FILE_NAME, LockStatus, lock_status
from lora_scripts.training.saved_states import list_states, read_progress

RUN_LOG_FILE_NAME = "train.log"
SAMPLE_FOLDER = "sample"
_SAMPLE_NAME = re.compile(r"_s(\d+)_p(\d+)_[a-z0-9_]*$")  # <output_name>_s000010_p00_<slug>.png
_LOG_TAIL_BYTES = 256 * 1024

RunStatus = Literal["running", "finished", "stopped", "failed", "crashed", "unknown"]


@dataclass(frozen=True)
class SampleImage:
    step: int
    prompt_index: int
    path: Path


@dataclass(frozen=True)
class SavedState:
    """A complete training state a run can resume from."""

    step: int
    path: Path


@dataclass(frozen=True)
class RunInfo:
    """One run as its output folder shows it.

    `status`: "running" (its lock is held by a live process), else what the last `end` event says
    ("finished", "stopped", "failed"); "crashed" when the last `start` has no `end` and the run is not
    running (killed, or the machine went down); "unknown" when there is nothing to tell (no progress file:
    a run from before it existed, or one still loading, which is "running" while it holds the lock).
    `steps`, `loss` and each `lr[group]` are aligned, one point per step of the run as it stands: the steps a
    resume or a NaN rollback went back over are there once, as trained last. Times are Unix seconds.
    """

    output_dir: Path
    status: RunStatus
    message: str | None = None  # the end event's sentence
    config_path: Path | None = None  # the config the run was started with, else the resolved config.yaml
    pid: int | None = None  # the running process, else the one that ran last
    started: float | None = None  # when the last (re)start began training
    updated: float | None = None  # the newest event, else the folder's modification time
    step: int | None = None
    total_steps: int | None = None
    epoch: int | None = None
    epochs: int | None = None
    rate: float | None = None  # steps per second, as last measured
    eta_s: float | None = None  # only while running
    steps: list[int] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)
    lr: dict[str, list[float | None]] = field(default_factory=dict)
    samples: list[SampleImage] = field(default_factory=list)  # by step, then prompt
    lora_files: list[Path] = field(default_factory=list)  # oldest first
    states: list[SavedState] = field(default_factory=list)  # oldest saved first; the last is resumed from
    log_tail: list[str] = field(default_factory=list)

    @property
    def resumable(self) -> bool:
        """Whether `lora-scripts train --config <config_path> --resume auto` continues it now."""
        return self.status != "running" and bool(self.states)


def find_runs(roots: Iterable[Path], *, max_depth: int = 3) -> list[RunInfo]:
    """The runs in `roots` and in their folders up to `max_depth` levels down, the latest updated first.

    A run's folder holds a progress file or a run lock, or `config.yaml` with what a run leaves beside it
    (`state/`, `logs/`, a LoRA file). Folders inside a run (its `previous_runs/` among them) and hidden
    folders are not searched; roots that do not exist are skipped. Log tails are left out (`read_run` has
    them).
    """
    found: dict[Path, None] = {}
    for root in roots:
        _collect(Path(root), max_depth, found)
    runs = [read_run(folder, log_lines=0) for folder in found]
    return sorted(runs, key=lambda run: run.updated or 0.0, reverse=True)


def read_run(output_dir: Path, *, log_lines: int = 100) -> RunInfo:
    """Everything about the run in `output_dir` (see RunInfo), with the last `log_lines` lines of its log."""
    output_dir = Path(output_dir)
    events, _ = read_events(output_dir)
    lock = lock_status(output_dir)
    start_at = next((i for i in reversed(range(len(events))) if events[i]["event"] == "start"), None)
    last_start = events[start_at] if start_at is not None else None
    after_start = events[start_at + 1 :] if start_at is not None else events
    end = _last(after_start, "end")
    last_step = _last(after_start, "step")
    status = _status(lock, last_start, end)
    steps, loss, lr = _series(events)
    config = (last_start or {}).get("config")
    if config is None and (output_dir / "config.yaml").is_file():
        config = output_dir / "config.yaml"
    holder_pid = lock.holder.pid if lock and lock.holder else None
    return RunInfo(
        output_dir=output_dir,
        status=status,
        message=end.get("message") if end and status != "running" else None,
        config_path=Path(config) if config else None,
        pid=holder_pid if status == "running" else _pid_of(end or last_start),
        started=(last_start or {}).get("time"),
        updated=_updated(output_dir, events),
        step=_step(last_step, end, last_start),
        total_steps=(last_start or {}).get("total_steps"),
        epoch=(last_step or {}).get("epoch"),
        epochs=(last_start or {}).get("epochs"),
        rate=(last_step or {}).get("rate"),
        eta_s=(last_step or {}).get("eta_s") if status == "running" else None,
        steps=steps,
        loss=loss,
        lr=lr,
        samples=list_samples(output_dir),
        lora_files=sorted(output_dir.glob("*.safetensors"), key=_modified_then_name),
        states=resumable_states(output_dir),
        log_tail=read_log_tail(output_dir, log_lines) if log_lines > 0 else [],
    )


def read_events(output_dir: Path, offset: int = 0) -> tuple[list[dict[str, Any]], int]:
    """The events of `<output_dir>/progress.jsonl` from byte `offset` on, and the offset to read on from.

    Only whole lines are taken (the run may be writing the next one), so a watcher can poll with the offset
    it got back; a line that is not a JSON object is skipped. No file: ([], offset).
    """
    try:
        with open(Path(output_dir) / PROGRESS_FILE_NAME, "rb") as fh:
            fh.seek(offset)
            data = fh.read()
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
        return [], offset
    complete = data[: data.rfind(b"\n") + 1]
    events = []
    for line in complete.splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if isinstance(event, dict) and isinstance(event.get("event"), str):
            events.append(event)
    return events, offset + len(complete)


def read_log_tail(output_dir: Path, lines: int = 100) -> list[str]:
    """The last `lines` lines of `<output_dir>/train.log` (none when there is no such file), each as a
    terminal shows it: what follows its last carriage return."""
    path = Path(output_dir) / RUN_LOG_FILE_NAME
    try:
        with open(path, "rb") as fh:
            size = fh.seek(0, os.SEEK_END)
            start = max(0, size - _LOG_TAIL_BYTES)
            fh.seek(start)
            data = fh.read()
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
        return []
    text = data.decode("utf-8", errors="replace")
    rows = text.split("\n")
    if start > 0:
        rows = rows[1:]  # began in the middle of a line
    if rows and rows[-1] == "":
        rows.pop()
    shown = [row.rstrip("\r").rsplit("\r", 1)[-1] for row in rows]
    return shown[-lines:] if lines > 0 else []


def list_samples(output_dir: Path) -> list[SampleImage]:
    """The sample images under `<output_dir>/sample/`, by step, then prompt."""
    found = []
    for path in (Path(output_dir) / SAMPLE_FOLDER).glob("*.png"):
        match = _SAMPLE_NAME.search(path.stem)
        if match:
            found.append(SampleImage(int(match[1]), int(match[2]), path))
    return sorted(found, key=lambda s: (s.step, s.prompt_index, s.path.name))


def resumable_states(output_dir: Path) -> list[SavedState]:
    """The complete training states under `<output_dir>/state/`, oldest saved first (a resume takes the
    last)."""
    states = []
    for folder in list_states(Path(output_dir) / STATE_FOLDER):
        progress = read_progress(folder) or {}
        states.append(SavedState(int(progress.get("global_step", 0)), folder))
    return states


def request_stop(output_dir: Path) -> bool:
    """Ask the run in `output_dir` to stop as Ctrl-C does (finish the step, save, end "stopped") by creating
    its stop file. Returns False, writing nothing, when no run holds the folder's lock (not started yet, or
    over: a process still loading before it takes the lock is stopped through its process handle instead).
    Raises OSError when the file cannot be created."""
    status = lock_status(output_dir)
    if status is None or status.state == "stale":
        return False
    stop_file_path(output_dir).touch()
    return True


def _collect(folder: Path, depth: int, found: dict[Path, None]) -> None:
    if _is_run_folder(folder):
        found.setdefault(folder, None)
        return
    if depth <= 0:
        return
    try:
        children = sorted(e.path for e in os.scandir(folder) if e.is_dir() and not e.name.startswith("."))
    except OSError:  # missing, not a folder, unreadable
        return
    for child in children:
        _collect(Path(child), depth - 1, found)


def _is_run_folder(folder: Path) -> bool:
    if (folder / PROGRESS_FILE_NAME).is_file() or (folder / LOCK_FILE_NAME).is_file():
        return True
    if not (folder / "config.yaml").is_file():
        return False
    beside = (folder / STATE_FOLDER).is_dir() or (folder / "logs").is_dir()
    return beside or any(folder.glob("*.safetensors"))


def _status(lock: LockStatus | None, last_start: dict | None, end: dict | None) -> RunStatus:
    if lock is not None and lock.state == "in_use":
        ending = end is not None and lock.holder is not None and end.get("pid") == lock.holder.pid
        if not ending:  # (an end written by the lock's holder: it is only releasing the lock)
            return "running"
    if end is not None and end.get("status") in ("finished", "stopped", "failed"):
        return end["status"]
    if last_start is not None or (lock is not None and lock.state == "stale"):
        # A lock on another host cannot be checked: it may still be running.
        return "unknown" if lock is not None and lock.state == "unknown" else "crashed"
    return "unknown"


def _series(events: list[dict]) -> tuple[list[int], list[float], dict[str, list[float | None]]]:
    """(steps, losses, lr by group) of the run as it stands: a resume drops the points after its state (a
    killed run trained on past it), a step at or before the last point (a NaN rollback) those from it on."""
    steps: list[int] = []
    points: list[tuple[float, dict[str, float]]] = []
    for event in events:
        kind = event["event"]
        if kind == "start":
            resumed = event.get("resumed_from")
            keep = 0 if resumed is None else bisect.bisect_right(steps, resumed)
            del steps[keep:], points[keep:]
        elif kind == "step" and isinstance(event.get("step"), int) and event.get("loss") is not None:
            step = event["step"]
            keep = bisect.bisect_left(steps, step)
            del steps[keep:], points[keep:]
            steps.append(step)
            points.append((float(event["loss"]), event.get("lr") or {}))
    groups = list(dict.fromkeys(group for _, lrs in points for group in lrs))
    lr = {group: [lrs.get(group) for _, lrs in points] for group in groups}
    return steps, [value for value, _ in points], lr


def _last(events: list[dict], kind: str) -> dict | None:
    return next((e for e in reversed(events) if e["event"] == kind), None)


def _step(last_step: dict | None, end: dict | None, last_start: dict | None) -> int | None:
    for event, key in ((end, "step"), (last_step, "step"), (last_start, "resumed_from")):
        if event is not None and isinstance(event.get(key), int):
            return event[key]
    return 0 if last_start is not None else None


def _pid_of(event: dict | None) -> int | None:
    return event.get("pid") if event else None


def _updated(output_dir: Path, events: list[dict]) -> float | None:
    times = [e["time"] for e in events if isinstance(e.get("time"), int | float)]
    if times:
        return max(times)
    try:
        return output_dir.stat().st_mtime
    except OSError:
        return None


def _modified_then_name(path: Path) -> tuple[float, str]:
    try:
        return path.stat().st_mtime, path.name
    except OSError:
        return 0.0, path.name
