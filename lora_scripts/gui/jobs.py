"""Long work the page starts and then watches (labeling): a background thread per job, one job per folder.

The page polls `GET /api/jobs/{id}` for the job's status, phase, progress and errors. Jobs live in this
server process only: a restart forgets them, while what they wrote stays on disk (the labeler saves as it
goes, so a rerun picks up where a stopped one ended).
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from lora_scripts.errors import UserError

log = logging.getLogger(__name__)
KEEP_FINISHED = 50  # finished jobs remembered, for pages that poll late


@dataclass
class Job:
    """One job. `status`: running, done or failed; `phase`: what a running job is doing (the kind's words);
    `done` of `total` items (total None until known); `errors`: one sentence each when failed; `result`:
    what a finished job reports (the kind's keys)."""

    id: str
    kind: str
    folder: str  # ROOT/relative, as the page names it
    status: str = "running"
    phase: str = "starting"
    done: int = 0
    total: int | None = None
    errors: list[str] = field(default_factory=list)
    result: dict[str, Any] | None = None
    started: float = field(default_factory=time.time)
    finished: float | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def update(self, **changes: Any) -> None:
        """Set fields from the worker thread (phase=, done=, total=)."""
        with self._lock:
            for name, value in changes.items():
                setattr(self, name, value)

    def to_json(self) -> dict[str, Any]:
        with self._lock:
            return {
                "id": self.id,
                "kind": self.kind,
                "folder": self.folder,
                "status": self.status,
                "phase": self.phase,
                "done": self.done,
                "total": self.total,
                "errors": list(self.errors),
                "result": self.result,
                "seconds": round((self.finished or time.time()) - self.started, 1),
            }


class JobRegistry:
    """The jobs of one app: at most one running per folder; the last KEEP_FINISHED finished ones kept."""

    def __init__(self) -> None:
        self._jobs: dict[str, Job] = {}
        self._lock = threading.Lock()

    def start(self, kind: str, folder: str, work: Callable[[Job], dict[str, Any]]) -> Job:
        """Run `work(job)` in a new thread; its return value becomes `job.result`. A UserError it raises
        becomes the job's errors; any other exception is logged with its traceback and named in one."""
        with self._lock:
            running = self.running(folder)
            if running is not None:
                raise UserError(
                    f"'{folder}': a {running.kind} job is already running there; wait until it finishes."
                )
            job = Job(id=secrets.token_hex(8), kind=kind, folder=folder)
            self._jobs[job.id] = job
            self._forget_old()
        threading.Thread(target=_run, args=(job, work), name=f"{kind}-{job.id}", daemon=True).start()
        return job

    def get(self, job_id: str) -> Job:
        job = self._jobs.get(job_id)
        if job is None:
            raise UserError(f"job '{job_id}': no such job (the server may have restarted); start it again.")
        return job

    def running(self, folder: str) -> Job | None:
        return next(
            (j for j in list(self._jobs.values()) if j.folder == folder and j.status == "running"), None
        )

    def latest(self, folder: str | None = None) -> Job | None:
        """The folder's most recent job (any folder's with None), running or finished."""
        jobs = reversed(list(self._jobs.values()))
        return next((j for j in jobs if folder is None or j.folder == folder), None)

    def all(self) -> list[Job]:
        """Every job remembered, oldest first."""
        return list(self._jobs.values())

    def _forget_old(self) -> None:
        finished = [j for j in self._jobs.values() if j.status != "running"]
        for job in finished[: max(0, len(finished) - KEEP_FINISHED)]:
            del self._jobs[job.id]


def _run(job: Job, work: Callable[[Job], dict[str, Any]]) -> None:
    try:
        result = work(job)
    except UserError as err:
        job.update(status="failed", errors=list(err.messages), finished=time.time())
    except Exception as exc:  # noqa: BLE001 - the page must learn that the job ended, whatever ended it
        log.exception("%s job %s failed", job.kind, job.id)
        message = f"The {job.kind} job failed ({exc}); the server's log has details."
        job.update(status="failed", errors=[message], finished=time.time())
    else:
        job.update(status="done", phase="done", result=result, finished=time.time())
