"""Atomic file writes: a crash, a kill or a full disk during a save never leaves a half-written file in place.

The data goes to a temporary file beside the target (`.<name>.<random>.tmp`), is flushed to the disk, and
only then renamed over the target. On any failure the temporary file is removed and the old file, if there
was one, is untouched.

The saved file has the mode any file the user creates has (0666 less the umask: 0644 under umask 022), so a
WebUI or ComfyUI running as another user, or in a container, can read the LoRA. Writers do not all keep it:
safetensors 0.8's `save_file` recreates its file with mode 0600. The mode the temporary file was created with
is put back after the writer is done.
"""

from __future__ import annotations

import errno
import os
import re
import secrets
import stat
from collections.abc import Callable
from pathlib import Path

# Failures that are about the disk we write to, whoever reports them (see _as_os_error).
_WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM)
# safetensors (Rust) reports `IoError(Os { code: 28, ... })`; Rust's Display form is `... (os error 28)`.
_ERRNO_IN_MESSAGE = re.compile(r"\bos error (\d+)|\bOs \{ code: (\d+)")


def write_atomic(path: Path, write: Callable[[Path], None], *, overwrite: bool = True) -> None:
    """Call `write(tmp_path)` on a temporary file beside `path`, fsync it, then rename it over `path`.

    The rename is atomic on POSIX and Windows (os.replace), so readers see the old file or the new one,
    never a truncated one. A disk error (full, read-only, permission denied) comes out as an OSError naming
    `path`, even when the writer reported it otherwise (safetensors raises its own error type), so callers
    and `training.failures` can tell the user which file could not be written.

    With `overwrite=False` an existing `path` is never replaced: FileExistsError, also when the file appears
    while `write` runs (uploads into a folder another program writes to).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _new_temporary_file(path)
    try:
        # What os.open(..., 0o666) gave: the umask applied (and a folder's default ACL, if any). Read from the
        # file rather than with os.umask(0)/os.umask(old), which changes the umask of the whole process for
        # a moment: a file another thread (TensorBoard's writer) creates then would be world-writable.
        mode = stat.S_IMODE(tmp.stat().st_mode)
        write(tmp)
        if stat.S_IMODE(tmp.stat().st_mode) != mode:  # e.g. safetensors' 0600
            os.chmod(tmp, mode)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        if overwrite:
            os.replace(tmp, path)
        else:
            _place_new(tmp, path)
    except BaseException as exc:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass  # e.g. the disk went read-only; the original error is the one to report
        if isinstance(exc, Exception):
            named = _as_os_error(exc, path, tmp)
            if named is not None:
                raise named from exc
        raise


def _place_new(tmp: Path, path: Path) -> None:
    """Give `tmp` the name `path` unless `path` exists (FileExistsError), without a moment of overwriting.

    A hard link fails atomically when the name is taken; file systems without hard links (FAT, exFAT, some
    network shares) get a check-then-rename, which on POSIX leaves a window of microseconds.
    """
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(path)) from None
    except OSError:
        if path.exists():
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(path)) from None
        os.rename(tmp, path)  # Windows' rename refuses an existing target by itself
        return
    tmp.unlink()


def write_text_atomic(path: Path, text: str) -> None:
    """Write a UTF-8 text file atomically."""
    write_atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def _new_temporary_file(path: Path) -> Path:
    """Create an empty `.<name>.<random>.tmp` beside `path` and return it.

    Not tempfile.mkstemp: that creates the file with mode 0600, which the rename would carry over to the
    saved LoRA (unreadable to a WebUI running as another user). os.open's 0666 is reduced by the umask, as
    for any file the user creates; write_atomic keeps that mode whatever the writer does.
    """
    for _ in range(100):
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        except FileExistsError:
            continue
        except OSError as exc:
            raise OSError(exc.errno, exc.strerror, str(path)) from exc
        return tmp
    raise FileExistsError(errno.EEXIST, "no free temporary file name", str(path))


def _as_os_error(exc: Exception, path: Path, tmp: Path) -> OSError | None:
    """An OSError naming `path` for a disk error while writing `tmp`; None to re-raise `exc` as it is.

    An OSError about another file (say, the source of a copy) is left alone.
    """
    if isinstance(exc, OSError):
        if exc.errno not in _WRITE_ERRNOS:
            return None
        name = exc.filename
        if isinstance(name, str | bytes | os.PathLike) and os.fsdecode(name) not in (str(tmp), str(path)):
            return None
        code = exc.errno
    else:
        code = _errno_in_message(str(exc))
        if code is None:
            return None
    # OSError(errno, ...) builds the matching subclass (PermissionError for EACCES, ...).
    return OSError(code, os.strerror(code), str(path))


def _errno_in_message(text: str) -> int | None:
    match = _ERRNO_IN_MESSAGE.search(text)
    if match and int(match[1] or match[2]) in _WRITE_ERRNOS:
        return int(match[1] or match[2])
    return next((code for code in _WRITE_ERRNOS if os.strerror(code) in text), None)
