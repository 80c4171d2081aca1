"""What a run tells other programs through its output_dir: `progress.jsonl`, which it writes, and `STOP`,
which it reads.

`<output_dir>/progress.jsonl` gets one JSON object per line, appended as things happen (docs/training.md
lists the events and their keys): `start`, `step` (every step's loss, written when the loop reads the losses,
every `logging_steps`), `sample`, `save` and `end` (`finished`, `stopped` or `failed`). A resumed run appends
to the same file, beginning with a new `start`. Each write is whole lines, flushed (not fsynced: a reader on
the same machine sees them at once, and a lost tail after a power cut costs only the newest points), so a
reader may read while the file grows and take every line that ends in a newline. A write that fails (a full
disk, the file made read-only) is logged once and never stops the run.

`<output_dir>/STOP` asks the run to stop as Ctrl-C does: it finishes the step, saves its LoRA file and state
and ends with a `stopped` event. The loop looks for the file at most once a second (one `stat`), and the run
deletes it when it ends, so a resume does not stop at once; one found when a run takes output_dir's lock was
left by a run that was killed before it could, and is deleted too. Any program can create it, on any OS
(where a signal cannot be sent, e.g. to a process on Windows).

Only the main process of a run writes the progress file and looks for the stop file.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shlex
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Literal

log = logging.getLogger(__name__)

PROGRESS_FILE_NAME = "progress.jsonl"
STOP_FILE_NAME = "STOP"
STOP_CHECK_SECONDS = 1.0  # how often the loop may stat the stop file
LR_GROUP_NAMES = ("unet", "text_encoder", "text_encoder_2")  # the optimizer's parameter groups, in order
_RATE_WINDOW = 10  # loss reads the step rate is measured over: smooths out saves and samples

EndStatus = Literal["finished", "stopped", "failed"]


class ProgressFile:
    """Appends the events of one run to `<output_dir>/progress.jsonl`; does nothing when not `enabled`
    (processes other than the main one). `config_path`: the config file the run was started with, for the
    start event. Times are Unix seconds; paths are relative to output_dir."""

    def __init__(
        self,
        output_dir: Path,
        *,
        enabled: bool = True,
        config_path: str | Path | None = None,
        clock: Callable[[], float] = time.time,
    ):
        self.output_dir = Path(output_dir)
        self.path = self.output_dir / PROGRESS_FILE_NAME
        self.enabled = enabled
        self.config_path = config_path
        self.clock = clock
        self.total_steps: int | None = None
        self.last_step: int | None = None  # the newest step reported (for an end that comes from an error)
        self._reads: deque[tuple[float, int]] = deque(maxlen=_RATE_WINDOW + 1)  # (time, step) of each read
        self._warned = False

    def start(self, *, total_steps: int, epochs: int, resumed_from: int | None) -> None:
        """The run is loaded and about to train (`resumed_from`: the step of the state it continues)."""
        now = self.clock()
        self.total_steps = total_steps
        self.last_step = resumed_from or 0
        self._reads.clear()
        self._reads.append((now, self.last_step))
        self._write(
            [
                {
                    "event": "start",
                    "time": now,
                    "pid": os.getpid(),
                    "total_steps": total_steps,
                    "epochs": epochs,
                    "resumed_from": resumed_from,
                    "config": None if self.config_path is None else os.path.abspath(self.config_path),
                    "command": shlex.join(sys.argv),
                }
            ]
        )

    def steps(self, points: Iterable[tuple[int, float, list[float]]], epoch: int) -> None:
        """The losses just read: (step, loss, learning rate of each parameter group), oldest first. They were
        read together, so they share `time`, `rate` (steps/s over the last reads) and `eta_s`."""
        points = list(points)
        if not points or not self.enabled:
            return
        now, step = self.clock(), points[-1][0]
        if self._reads and step <= self._reads[-1][1]:  # a NaN rollback went back: measure afresh
            self._reads.clear()
        self._reads.append((now, step))
        rate = eta = None
        (first_time, first_step), (last_time, last_step) = self._reads[0], self._reads[-1]
        if last_time > first_time and last_step > first_step:
            rate = (last_step - first_step) / (last_time - first_time)
            if self.total_steps is not None:
                eta = max(self.total_steps - step, 0) / rate
        self.last_step = step
        self._write(
            [
                {
                    "event": "step",
                    "step": s,
                    "epoch": epoch,
                    "loss": _number(loss),
                    "lr": {_group_name(i): _number(lr) for i, lr in enumerate(lrs)},
                    "rate": _number(rate),
                    "eta_s": _number(eta),
                    "time": now,
                }
                for s, loss, lrs in points
            ]
        )

    def sampled(self, step: int, files: list[Path]) -> None:
        """Sample images written at `step`."""
        if files:
            self._write([{"event": "sample", "step": step, "files": [self._relative(p) for p in files]}])

    def saved(self, step: int, path: Path | None, kind: Literal["lora", "state"]) -> None:
        """A LoRA file or a training state folder written at `step`."""
        if path is not None:
            self._write([{"event": "save", "step": step, "file": self._relative(path), "kind": kind}])

    def end(self, status: EndStatus, message: str, step: int | None = None) -> None:
        """The run is over (`step`: where it ended; the newest step reported when not given)."""
        step = self.last_step if step is None else step
        self._write(
            [
                {
                    "event": "end",
                    "status": status,
                    "message": message,
                    "step": step,
                    "pid": os.getpid(),
                    "time": self.clock(),
                }
            ]
        )

    def _write(self, events: list[dict[str, Any]]) -> None:
        if not self.enabled:
            return
        try:
            text = "".join(json.dumps(e, ensure_ascii=False, allow_nan=False) + "\n" for e in events)
            # Opened per write: a file moved or deleted meanwhile is made anew, and nothing stays open.
            with open(self.path, "a", encoding="utf-8", newline="\n") as fh:
                fh.write(text)
        except (OSError, ValueError) as err:
            if not self._warned:
                self._warned = True
                log.warning(
                    "Cannot write the progress file %s (%s); training goes on without it", self.path, err
                )

    def _relative(self, path: Path) -> str:
        try:
            return Path(path).relative_to(self.output_dir).as_posix()
        except ValueError:
            return str(path)


class StopFile:
    """`<output_dir>/STOP` (see the module doc), looked at no more often than every `interval` seconds."""

    def __init__(
        self,
        output_dir: Path,
        *,
        interval: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.path = stop_file_path(output_dir)
        self.interval = STOP_CHECK_SECONDS if interval is None else interval
        self.clock = clock
        self._next_check = -math.inf

    def requested(self) -> bool:
        """Whether the file is there; False without looking when it was looked at less than `interval` ago."""
        now = self.clock()
        if now < self._next_check:
            return False
        self._next_check = now + self.interval
        return self.path.exists()

    def remove(self, *, stale: bool = False) -> None:
        """Delete the file if it is there (`stale`: left by an earlier run, which is logged)."""
        try:
            self.path.unlink()
        except FileNotFoundError:
            return
        except OSError as err:
            log.warning("Cannot delete the stop file %s (%s); delete it before resuming", self.path, err)
            return
        if stale:
            log.warning("Deleted the stop file %s left by an earlier run", self.path)


def stop_file_path(output_dir: Path) -> Path:
    return Path(output_dir) / STOP_FILE_NAME


def _group_name(index: int) -> str:
    return LR_GROUP_NAMES[index] if index < len(LR_GROUP_NAMES) else f"group_{index}"


def _number(value: float | None) -> float | None:
    """JSON has no NaN or infinity: those become null."""
    if value is None or not math.isfinite(value):
        return None
    return float(value)
