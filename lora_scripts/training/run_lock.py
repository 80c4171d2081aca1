"""One run at a time per output_dir: a lock file that a second run is refused by, and a killed run's is not.

The main process of a run creates `<output_dir>/.lora-scripts.lock` (O_CREAT|O_EXCL: only one creator wins)
before anything else is written there, holds an exclusive `flock` on it while it runs, and deletes it at the
end, whatever the end (an exception, Ctrl-C: a `finally`). The file says who holds it: pid, host, start time
and command, as JSON.

Whether the holder still runs is asked of the kernel, not guessed from the pid: a process that dies, even by
`kill -9`, drops its flock, so a file whose flock is free was left by a run that ended, and the next run takes
it over (and logs so). Where flock is not available (Windows, some network file systems) the pid decides:
`os.kill(pid, 0)` on the same host. A lock written on another host whose flock is free cannot be checked from
here (a network disk may not pass flocks between machines), so it is refused with the path to delete.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import shlex
import socket
import sys
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Literal

from lora_scripts.errors import UserError

try:
    import fcntl
except ImportError:  # Windows: the pid decides
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

LOCK_FILE_NAME = ".lora-scripts.lock"
_ATTEMPTS = 5  # create, or take over a stale lock and create again; more only under a storm of starts

LockState = Literal["in_use", "unknown", "stale"]


@dataclass(frozen=True)
class LockHolder:
    """Who holds (or held) a run lock. `started`: local time, ISO 8601 with the UTC offset."""

    pid: int
    host: str
    started: str
    command: str

    @classmethod
    def this_process(cls) -> LockHolder:
        return cls(
            pid=os.getpid(),
            host=socket.gethostname(),
            started=datetime.now().astimezone().isoformat(timespec="seconds"),
            command=shlex.join(sys.argv),
        )

    def describe(self) -> str:
        return f"pid {self.pid} on host '{self.host}', started {self.started}, command: {self.command}"


@dataclass(frozen=True)
class LockStatus:
    """A lock file found in an output_dir. `holder` is None when the file is empty or unreadable (a run
    killed between creating and writing it). `state`: "in_use" (its run is running), "stale" (it ended;
    the next run takes the lock over) or "unknown" (written on another host: cannot be checked)."""

    path: Path
    holder: LockHolder | None
    state: LockState

    def problem(self, output_dir: Path) -> str | None:
        """The sentence a run into `output_dir` is refused with, or None when the lock can be taken."""
        if self.state == "stale":
            return None
        who = self.holder.describe() if self.holder else "its details unreadable"
        holder = self.holder
        if (
            self.state == "in_use"
            and holder
            and holder.host == socket.gethostname()
            and not _pid_alive(holder.pid)
        ):
            # A process the killed run forked (a DataLoader worker) shares its flock until it notices, ~5 s.
            return (
                f"output_dir: '{output_dir}' is still locked by a process of a training that ended ({who}); "
                f"wait a few seconds and run again, or stop what that training started (its lock file is "
                f"'{self.path}')."
            )
        if self.state == "in_use":
            return (
                f"output_dir: '{output_dir}' is in use by another training ({who}); wait for it to end or "
                f"stop it, or choose another output_dir (its lock file is '{self.path}')."
            )
        return (
            f"output_dir: '{output_dir}' is locked by a training on another machine ({who}), which cannot be "
            f"checked from here; if it is no longer running, delete '{self.path}' and run again, or choose "
            "another output_dir."
        )


def lock_path(output_dir: Path) -> Path:
    return Path(output_dir) / LOCK_FILE_NAME


def lock_status(output_dir: Path) -> LockStatus | None:
    """The lock in `output_dir` as a run would find it (None: no lock file). Reads only; `check` uses it."""
    path = lock_path(output_dir)
    try:
        fd = os.open(path, os.O_RDONLY)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError:
        return LockStatus(path, None, "in_use")  # unreadable: another user's run, assume it is running
    try:
        locked = _try_flock(fd, shared=True)
        holder = _read_holder(fd)
        return LockStatus(path, holder, _state(holder, locked))
    finally:
        os.close(fd)


class RunLock:
    """The lock of one run on `output_dir`; `acquire` creates the folder (and its missing parents) and the
    lock file, `release` deletes them again (folders only when empty: those this lock created)."""

    def __init__(self, output_dir: Path):
        self.output_dir = Path(output_dir)
        self.path = lock_path(self.output_dir)
        self._fd: int | None = None
        self._created: list[Path] = []  # outermost first

    def acquire(self) -> None:
        """Take the lock, or raise UserError naming the run that holds it (or why the folder cannot be made).
        The folder is made with its missing parents."""
        self._created = _make_folders(self.output_dir)
        try:
            for _ in range(_ATTEMPTS):
                if self._try_create():
                    return
                self._clear_stale()
            raise UserError(
                f"output_dir: could not take the lock '{self.path}' (other trainings keep starting there); "
                "run again, or choose another output_dir."
            )
        except BaseException:
            self._remove_created_folders()
            raise

    def release(self) -> None:
        """Delete the lock file (if it is still ours), drop the flock, remove the folders `acquire` created if
        nothing else was written in them. Safe to call twice."""
        fd, self._fd = self._fd, None
        if fd is not None:
            try:
                if _same_file(fd, self.path):
                    self.path.unlink()
            except OSError:
                pass  # the folder is gone or read-only now: the flock below is what counts
            finally:
                os.close(fd)
        self._remove_created_folders()

    def _try_create(self) -> bool:
        """Create the lock file and hold it; False when a lock file is there already (or just won by another
        run)."""
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            return False
        except OSError as err:
            raise UserError(_cannot_write(self.output_dir, err)) from err
        try:
            # Between the create and the flock another run may take the empty file for a stale lock, delete it
            # and make its own: then this file is no longer the one at `path`, and that run holds the lock.
            if _try_flock(fd, shared=False) is False or not _same_file(fd, self.path):
                os.close(fd)
                return False
            holder = LockHolder.this_process()
            os.write(fd, (json.dumps(asdict(holder)) + "\n").encode("utf-8"))
        except OSError as err:  # e.g. the disk filled up: leave no empty lock file behind
            with contextlib.suppress(OSError):
                if _same_file(fd, self.path):
                    self.path.unlink()
            os.close(fd)
            raise UserError(_cannot_write(self.output_dir, err)) from err
        self._fd = fd
        return True

    def _clear_stale(self) -> None:
        """Delete the lock file at `path` if its run has ended (logged); raise the refusal if it runs."""
        try:
            fd = _open_existing(self.path)
        except FileNotFoundError:
            return  # released in the meantime
        except OSError as err:
            raise UserError(_cannot_write(self.output_dir, err)) from err
        try:
            locked = _try_flock(fd, shared=False)
            holder = _read_holder(fd)
            status = LockStatus(self.path, holder, _state(holder, locked))
            problem = status.problem(self.output_dir)
            if problem is not None:
                raise UserError(problem)
            if not _same_file(fd, self.path):
                return  # replaced by a newer lock meanwhile: look again
            who = f"({holder.describe()}) " if holder else ""
            log.warning(
                "output_dir: taking over the lock %s left by a training %sthat is no longer running",
                self.path,
                who,
            )
            self.path.unlink()  # while holding its flock: no other run can be taking it over too
        finally:
            os.close(fd)

    def _remove_created_folders(self) -> None:
        for folder in reversed(self._created):
            try:
                folder.rmdir()
            except OSError:
                break  # not empty: the run wrote something, keep it (and every folder above it)
        self._created = []


@contextlib.contextmanager
def output_dir_lock(output_dir: Path, *, enabled: bool = True) -> Iterator[RunLock | None]:
    """Hold the run lock on `output_dir` for the `with` block. `enabled=False` (processes other than the
    main one of a multi-process run, which write nothing there) holds nothing."""
    if not enabled:
        yield None
        return
    lock = RunLock(output_dir)
    lock.acquire()
    try:
        yield lock
    finally:
        lock.release()


def _open_existing(path: Path) -> int:
    """The lock file opened for writing (an exclusive flock on a network disk needs it), else for reading."""
    try:
        return os.open(path, os.O_RDWR)
    except PermissionError:
        return os.open(path, os.O_RDONLY)


def _state(holder: LockHolder | None, locked: bool | None) -> LockState:
    """What a lock file means: `locked` is whether we got its flock (None: flock is not available here)."""
    if locked is False:
        return "in_use"
    if holder is None:
        return "stale"  # an empty file whose creator died before writing (or flock says it ended)
    if holder.host != socket.gethostname():
        return "unknown"
    if locked is True:
        return "stale"  # a running holder would hold the flock
    return "in_use" if _pid_alive(holder.pid) else "stale"


def _pid_alive(pid: int) -> bool:
    if os.name != "posix":
        return True  # os.kill(pid, 0) would terminate the process on Windows; assume it runs
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    except OSError:
        return True
    return True


def _try_flock(fd: int, *, shared: bool) -> bool | None:
    """True: got it; False: another open file holds it; None: no flock on this system or file system."""
    if fcntl is None:
        return None
    try:
        fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError as err:
        if err.errno in (errno.EAGAIN, errno.EACCES):
            return False
        return None  # ENOLCK, EOPNOTSUPP, EBADF (NFS exclusive lock on a read-only fd): fall back to the pid
    return True


def _read_holder(fd: int) -> LockHolder | None:
    try:
        data = json.loads(os.pread(fd, 65536, 0).decode("utf-8"))
        return LockHolder(
            pid=int(data["pid"]),
            host=str(data["host"]),
            started=str(data["started"]),
            command=str(data["command"]),
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _same_file(fd: int, path: Path) -> bool:
    """Whether `fd` is still the file at `path` (a lock taken over is deleted and made anew)."""
    try:
        here, there = os.fstat(fd), os.stat(path)
    except OSError:
        return False
    return (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)


def _make_folders(folder: Path) -> list[Path]:
    """Create `folder` and its missing parents; returns those created here, outermost first."""
    missing = []
    for candidate in [folder, *folder.parents]:
        if candidate.exists():
            break
        missing.append(candidate)
    created = []
    for candidate in reversed(missing):
        try:
            candidate.mkdir()
        except FileExistsError:
            continue  # made by another run at the same moment: not ours to remove
        except OSError as err:
            _undo(created)
            raise UserError(_cannot_write(folder, err)) from err
        created.append(candidate)
    return created


def _undo(created: list[Path]) -> None:
    for folder in reversed(created):
        with contextlib.suppress(OSError):
            folder.rmdir()


def _cannot_write(output_dir: Path, err: OSError) -> str:
    reason = err.strerror or type(err).__name__
    where = f"'{err.filename}'" if err.filename else f"'{output_dir}'"
    return f"output_dir: cannot write {where} ({reason}); choose an output_dir on a writable disk."
