"""Never lose a run: refuse an output_dir that already holds one, or move its files aside first.

A run leaves `config.yaml`, `*.safetensors`, `state/`, `logs/` and `sample/` in its output_dir. Training into
such a folder again would silently replace its LoRA files and mix two runs' TensorBoard curves (sd-scripts
does exactly that), so a new run stops there, before anything is written, unless the config says what to do:
`resume` continues the run, `overwrite: true` first moves its files into
`<output_dir>/previous_runs/<YYYYmmdd-HHMMSS>/`. Nothing is ever deleted here.

A folder that cannot be created or written is refused too (`writable_problem`), before any model loads; that
two runs never share a folder is training/run_lock.py's part.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from datetime import datetime
from pathlib import Path

from lora_scripts.errors import UserError
from lora_scripts.training.progress_file import PROGRESS_FILE_NAME
from lora_scripts.training.saved_states import latest_state

log = logging.getLogger(__name__)

BACKUP_FOLDER = "previous_runs"
RUN_FILE_NAMES = ("config.yaml",)  # the resolved config train() dumps
RUN_FILE_SUFFIXES = (".safetensors",)  # step files, final files, <name>-best
RUN_FOLDERS = ("state", "logs", "sample")  # training states, TensorBoard, sample images
STATE_FOLDER = "state"


def run_files(output_dir: Path) -> list[str]:
    """What a run left in `output_dir`, sorted: file names, and folder names with a trailing "/".

    Empty when the folder does not exist or holds nothing of a run (other files, e.g. notes, do not count).
    """
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found: list[str] = []
    for entry in output_dir.iterdir():
        if entry.is_file() and (entry.name in RUN_FILE_NAMES or entry.suffix in RUN_FILE_SUFFIXES):
            found.append(entry.name)
        elif entry.is_dir() and entry.name in RUN_FOLDERS:
            found.append(entry.name + "/")
    return sorted(found)


def has_saved_state(output_dir: Path) -> bool:
    """True when `output_dir/state/` holds a complete training state, i.e. `resume: auto` continues the run
    (the same test train() makes; a half-saved state of a killed run does not count)."""
    return latest_state(Path(output_dir) / STATE_FOLDER) is not None


def will_resume(output_dir: Path, resume: str | None) -> bool:
    """Whether a run with this `resume` value continues the run in `output_dir` (rather than starting anew).

    An explicit state folder always resumes; `auto` only when there is a state to take (otherwise it starts
    fresh, and an earlier run's files would be replaced).
    """
    if resume is None:
        return False
    return resume != "auto" or has_saved_state(output_dir)


def output_dir_problem(
    output_dir: Path, *, overwrite: bool, resuming: bool, resume_requested: bool = False
) -> str | None:
    """The sentence that refuses `output_dir` (naming what it holds and the ways out), or None if usable.
    `resume_requested`: the config asked to resume, but there was nothing to resume from.

    `lora-scripts check` reports it as an error and `prepare_output_dir` raises it: the same words.
    """
    output_dir = Path(output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        return f"output_dir: '{output_dir}' is a file, not a folder; choose a folder for the run's files."
    unwritable = writable_problem(output_dir)
    if unwritable is not None:
        return unwritable
    if resuming or overwrite:
        return None
    existing = run_files(output_dir)
    if not existing:
        return None
    shown = ", ".join(existing[:5]) + (f" and {len(existing) - 5} more" if len(existing) > 5 else "")
    backup = f"the old files are moved to {output_dir / BACKUP_FOLDER}/"
    if has_saved_state(output_dir):
        ways = f"set resume: auto to continue it, overwrite: true to start again ({backup})"
    elif resume_requested:
        # resume: auto found nothing to continue (the run stopped before its first complete state).
        ways = (
            "resume: auto found no complete training state in it to continue from (the run stopped before "
            f"its first save); set overwrite: true to start again ({backup})"
        )
    else:
        ways = f"set overwrite: true to replace it ({backup}; it has no saved state to resume)"
    return f"output_dir: '{output_dir}' already holds a run ({shown}); {ways}, or choose another output_dir."


def writable_problem(output_dir: Path) -> str | None:
    """Why `output_dir` cannot be created or written, or None when it can; creates nothing that stays.

    Looks at the nearest folder of the path that exists (output_dir itself, or the parent its missing folders
    would be made in): it must be a folder (a file there is named), writable (`os.access`), and must really
    accept a new folder: an empty hidden one is made in it and removed at once, which catches what
    `os.access` cannot see (running as root, /proc or /sys, read-only bind mounts, network disks).
    """
    output_dir = Path(output_dir)
    existing = next((p for p in [output_dir, *output_dir.parents] if p.exists() or p.is_symlink()), None)
    if existing is None:
        return None  # not even the working directory exists; the OS error will say more
    if not existing.is_dir():
        return (
            f"output_dir: '{output_dir}' cannot be created, because '{existing}' is a file, not a folder; "
            "choose another output_dir, or move that file away."
        )
    where = "" if existing == output_dir else f" in '{existing}'"
    if not os.access(existing, os.W_OK | os.X_OK):
        return (
            f"output_dir: '{output_dir}' cannot be written{where} ({_denied_reason(existing)}); choose an "
            "output_dir on a writable disk."
        )
    try:
        probe = tempfile.mkdtemp(prefix=".lora-scripts-write-test-", dir=existing)
    except OSError as err:
        return (
            f"output_dir: '{output_dir}' cannot be written{where} (a test folder could not be made: "
            f"{err.strerror or err}); choose an output_dir on a writable disk."
        )
    with contextlib.suppress(OSError):
        os.rmdir(probe)
    return None


def _denied_reason(folder: Path) -> str:
    try:
        read_only = bool(os.statvfs(folder).f_flag & os.ST_RDONLY)
    except (AttributeError, OSError):  # no statvfs on Windows
        read_only = False
    return "read-only file system" if read_only else "permission denied"


def prepare_output_dir(
    output_dir: Path, *, overwrite: bool, resuming: bool, resume_requested: bool = False
) -> Path | None:
    """Make `output_dir` ready for a run; call it once, on the main process, before anything is written there.

    - resuming (see `will_resume`): nothing to do, returns None.
    - no earlier run there (or no folder yet): nothing to do, returns None. The folder is not created.
    - an earlier run and `overwrite`: its files are moved (renamed, never copied or deleted) into
      `<output_dir>/previous_runs/<YYYYmmdd-HHMMSS>/`, which is returned.
    - an earlier run otherwise: raises UserError (see `output_dir_problem`) and writes nothing.
    """
    output_dir = Path(output_dir)
    problem = output_dir_problem(
        output_dir, overwrite=overwrite, resuming=resuming, resume_requested=resume_requested
    )
    if problem is not None:
        raise UserError(problem)
    existing = run_files(output_dir)
    if resuming or not existing:
        return None
    backup = _new_backup_folder(output_dir / BACKUP_FOLDER)
    # Leftover temporary files of a killed save (`.<name>.<random>.tmp`, export/atomic.py) go with the run,
    # and so does its progress file (never without the files above; not one of them, so that `check` and
    # this message name what a user knows a run by).
    leftovers = [p.name for p in output_dir.glob(".*.tmp") if p.is_file()]
    leftovers += [PROGRESS_FILE_NAME] if (output_dir / PROGRESS_FILE_NAME).is_file() else []
    for name in [entry.rstrip("/") for entry in existing] + leftovers:
        # Same folder, same file system: a rename, instant even for gigabytes of states.
        os.replace(output_dir / name, backup / name)
    log.info("output_dir held an earlier run (overwrite: true); moved %s to %s", ", ".join(existing), backup)
    return backup


def _timestamp() -> str:
    """Local time as YYYYmmdd-HHMMSS (a function, so tests can fix it)."""
    return datetime.now().strftime("%Y%m%d-%H%M%S")


def _new_backup_folder(parent: Path) -> Path:
    """A new, empty `parent/<timestamp>` folder; `-2`, `-3`, ... when that second is taken already."""
    parent.mkdir(parents=True, exist_ok=True)
    stamp = _timestamp()
    for n in range(1, 1000):
        folder = parent / (stamp if n == 1 else f"{stamp}-{n}")
        try:
            folder.mkdir()
        except FileExistsError:
            continue
        return folder
    raise FileExistsError(f"{parent}: no free backup folder name for {stamp}")
