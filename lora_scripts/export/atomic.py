"""Atomic file writes: a crash or kill during a save never leaves a half-written file in place."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path


def write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    """Call `write(tmp_path)` on a temporary file beside `path`, fsync it, then rename it over `path`.

    The rename is atomic on POSIX and Windows (os.replace), so readers see the old file or the new one,
    never a truncated one.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text_atomic(path: Path, text: str) -> None:
    """Write a UTF-8 text file atomically."""
    write_atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
