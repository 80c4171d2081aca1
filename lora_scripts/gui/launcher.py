"""Starting training runs as their own processes, one at a time, the others queued in order.

A run is `python -m lora_scripts.cli train --config <file>` in a new session (process group), so a Ctrl-C
in the server's terminal does not reach it and a crash of either never takes the other down. Its stdout and
stderr go to `<output_dir>/train.log` (training/runs.py reads the tail). The queue and the ended launches
are kept on disk (gui/launch_record.py), so a restarted server goes on with the queue; runs that did start go
on by themselves and are found again through their output folders (runs.find_runs).

One run at a time, also across a restart: a queued run waits while any run under the roots holds its lock.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Literal

from lora_scripts.errors import UserError
from lora_scripts.gui.launch_record import LaunchRecord, LaunchStore
from lora_scripts.training.runs import RUN_LOG_FILE_NAME, request_stop

log = logging.getLogger(__name__)
POLL_S = 1.0  # how often the queue looks whether it may start the next run
KEEP_LAUNCHED = 50  # ended launches remembered (for a run that failed before writing any progress)


@dataclass
class Launch:
    """One run this server was asked to start. `state`: queued, running (its process is alive) or ended."""

    config_path: Path
    output_dir: Path
    resume: bool
    state: Literal["queued", "running", "ended"] = "queued"
    queued_at: float = field(default_factory=time.time)
    returncode: int | None = None
    dequeued: bool = False  # taken out of the queue before it started
    process: subprocess.Popen | None = field(default=None, repr=False)

    def record(self) -> LaunchRecord:
        return LaunchRecord(
            self.config_path,
            self.output_dir,
            self.resume,
            self.state,
            self.queued_at,
            self.returncode,
            self.dequeued,
        )

    @classmethod
    def restored(cls, record: LaunchRecord) -> Launch:
        """A launch of an earlier server: queued ones wait again; one that was running is not this server's
        process any more, so it counts as ended with its outcome unknown (its folder tells the rest)."""
        state = "queued" if record.state == "queued" else "ended"
        returncode = record.returncode if record.state == "ended" else None
        return cls(
            record.config_path,
            record.output_dir,
            record.resume,
            state,  # type: ignore[arg-type]
            record.queued_at,
            returncode,
            record.dequeued,
        )


def train_command(config_path: Path, *, resume: bool) -> list[str]:
    command = [sys.executable, "-m", "lora_scripts.cli", "train", "--config", str(config_path)]
    return command + ["--resume", "auto"] if resume else command


class RunLauncher:
    """The runs one server starts. `others_running()` tells whether a run not started here holds a lock;
    `before_start()` is called (and must not block) just before each run's process starts."""

    def __init__(
        self,
        others_running: Callable[[], bool] = lambda: False,
        before_start: Callable[[], None] = lambda: None,
        store: LaunchStore | None = None,
    ) -> None:
        self._others_running = others_running
        self._before_start = before_start
        self._store = store
        self._queue: deque[Launch] = deque()
        self._current: Launch | None = None
        self._ended: deque[Launch] = deque(maxlen=KEEP_LAUNCHED)
        self._lock = threading.Lock()
        self._save_lock = threading.Lock()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        if store is not None:
            for launch in map(Launch.restored, store.load()):
                (self._queue if launch.state == "queued" else self._ended).append(launch)
            if self._queue:
                with self._lock:
                    self._ensure_thread()

    def submit(self, config_path: Path, output_dir: Path, *, resume: bool) -> Launch:
        """Queue the run; it starts at once when nothing runs. UserError: that folder is queued already."""
        self._reap()
        with self._lock:
            # Only the queue is searched: a run that has ended but whose process is still exiting (a
            # resume right after a stop) may be queued behind it; `train` itself refuses a folder in use.
            for other in self._queue:
                if other.output_dir == output_dir:
                    raise UserError(f"'{output_dir.name}': a run into that folder is already {other.state}.")
            launch = Launch(Path(config_path), Path(output_dir), resume)
            self._queue.append(launch)
            self._ensure_thread()
        self._save()
        self._wake.set()
        self._start_next()  # at once when it may, so the answer already says "running"
        return launch

    def stop(self, output_dir: Path) -> str:
        """Stop the run in `output_dir`: "dequeued" (it had not started), "requested" (the stop file: the
        step finishes and the state is saved), "terminated" (a process still loading, before it took the
        folder's lock), or "none" (nothing there to stop)."""
        with self._lock:
            queued = next((launch for launch in self._queue if launch.output_dir == output_dir), None)
            if queued is not None:
                self._queue.remove(queued)
                queued.state, queued.dequeued = "ended", True
                self._ended.append(queued)
            current = self._current
        if queued is not None:
            self._save()
            return "dequeued"
        if request_stop(output_dir):
            return "requested"
        if current is not None and current.output_dir == output_dir and current.process is not None:
            if current.process.poll() is None:
                current.process.terminate()
                return "terminated"
        return "none"

    def launches(self) -> list[Launch]:
        """Queued (in order), the running one, then the ended ones, newest first."""
        self._reap()
        with self._lock:
            current = [self._current] if self._current else []
            return [*self._queue, *current, *reversed(self._ended)]

    def _ensure_thread(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._watch, name="run-queue", daemon=True)
            self._thread.start()

    def _watch(self) -> None:
        while True:
            self._wake.wait(POLL_S)
            self._wake.clear()
            self._reap()
            self._start_next()
            with self._lock:
                if self._current is None and not self._queue:
                    self._thread = None
                    return

    def _reap(self) -> None:
        with self._lock:
            current = self._current
            if current is None or current.process is None or current.process.poll() is None:
                return
            current.returncode = current.process.returncode
            current.state = "ended"
            self._ended.append(current)
            self._current = None
        self._save()

    def _start_next(self) -> None:
        with self._lock:
            if self._current is not None or not self._queue:
                return
        if self._others_running():  # a run this server did not start (or one from before a restart)
            return
        with self._lock:
            if self._current is not None or not self._queue:
                return
            launch = self._queue.popleft()
            self._before_start()
            try:
                launch.process = _spawn(launch)
            except OSError as err:
                log.error("Could not start the run of %s: %s", launch.config_path, err)
                launch.state, launch.returncode = "ended", -1
                self._ended.append(launch)
            else:
                launch.state = "running"
                self._current = launch
        self._save()

    def _save(self) -> None:
        """Write the record: oldest ended first, then the running one, then the queue in order (one writer
        at a time, so an older picture never lands after a newer one)."""
        if self._store is None:
            return
        with self._save_lock:
            with self._lock:
                launches = [*self._ended, *([self._current] if self._current else []), *self._queue]
                records = [launch.record() for launch in launches]
            self._store.save(records)


def _spawn(launch: Launch) -> subprocess.Popen:
    launch.output_dir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "TQDM_MININTERVAL": "5", "PYTHONUNBUFFERED": "1"}
    logfile: IO[bytes]
    with open(launch.output_dir / RUN_LOG_FILE_NAME, "ab") as logfile:
        # A new session: the server's Ctrl-C (sent to its process group) does not stop the run.
        detach: dict = (
            {"creationflags": subprocess.CREATE_NEW_PROCESS_GROUP}  # type: ignore[attr-defined]
            if os.name == "nt"
            else {"start_new_session": True}
        )
        return subprocess.Popen(
            train_command(launch.config_path, resume=launch.resume),
            stdin=subprocess.DEVNULL,
            stdout=logfile,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=os.getcwd(),
            **detach,
        )
