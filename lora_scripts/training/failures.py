"""Plain sentences for the ways a run dies that the user can fix: a full disk, a read-only output folder, and
running out of GPU memory.

`explain_failure` maps such an exception to a UserError (which the CLI prints as one `error:` line, exit code
2, no traceback) and returns None for everything else, so real bugs keep their traceback.
"""

from __future__ import annotations

import errno
import os
import re
from collections.abc import Iterator
from pathlib import Path

import torch

from lora_scripts.config import TrainConfig
from lora_scripts.errors import UserError

DISK_FULL = {errno.ENOSPC: "disk full", errno.EDQUOT: "disk quota exceeded"}
NOT_WRITABLE = {
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
}
# Writers in Rust (safetensors) and C++ report an OS error only inside their message, e.g.
# `IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })` or `... (os error 28)`.
_ERRNO_IN_MESSAGE = re.compile(r"\bos error (\d+)|\bOs \{ code: (\d+)")
# What torch (CUDA, and Apple's MPS, which raises a plain RuntimeError) says when an allocation fails.
_OOM_IN_MESSAGE = re.compile(r"out of memory", re.IGNORECASE)
_TRIED_TO_ALLOCATE = re.compile(r"Tried to allocate ([\d.]+ [KMGT]?i?B)")


def explain_failure(
    exc: BaseException, *, output_dir: Path, config: TrainConfig | None = None
) -> UserError | None:
    """The UserError to show for `exc` (or for the exception that caused it), or None if it is not one of
    the failures below.

    - disk full / quota exceeded (ENOSPC, EDQUOT) anywhere;
    - read-only file system / permission denied (EROFS, EACCES, EPERM) on `output_dir`, a path inside it,
      or a parent folder it needs created;
    - out of GPU memory (`torch.OutOfMemoryError`, MPS's RuntimeError): names the keys that lower memory use,
      with their values in `config` when given.

    A UserError passed in is left alone (None): it already speaks to the user.
    """
    if isinstance(exc, UserError):
        return None
    for link in _causes(exc):
        if isinstance(link, torch.OutOfMemoryError) or (
            isinstance(link, RuntimeError) and _OOM_IN_MESSAGE.search(str(link))
        ):
            return UserError(_out_of_memory_message(link, config))
        code, file_name = _os_error(link)
        if code in DISK_FULL:
            where = f"'{file_name}'" if file_name else f"into '{output_dir}'"
            return UserError(
                f"{DISK_FULL[code]} while writing {where}; free some space on that disk or choose an "
                "output_dir on another one, then run again (resume: auto continues from the last saved "
                "state); the files saved before are intact."
            )
        if code in NOT_WRITABLE and file_name and _concerns(Path(file_name), Path(output_dir)):
            return UserError(
                f"cannot write '{file_name}' ({NOT_WRITABLE[code]}); choose a writable output_dir."
            )
    return None


def _causes(exc: BaseException) -> Iterator[BaseException]:
    """`exc`, then what it was raised from (or during), down the chain; stops at a UserError or a loop."""
    seen: set[int] = set()
    link: BaseException | None = exc
    while link is not None and id(link) not in seen:
        if link is not exc and isinstance(link, UserError):
            return
        seen.add(id(link))
        yield link
        link = link.__cause__ or link.__context__


def _os_error(exc: BaseException) -> tuple[int | None, str | None]:
    """(errno, file name) of an OSError, or the errno found in another exception's message (file unknown)."""
    if isinstance(exc, OSError) and exc.errno is not None:
        name = exc.filename
        return exc.errno, os.fsdecode(name) if isinstance(name, str | bytes | os.PathLike) else None
    text = str(exc)
    match = _ERRNO_IN_MESSAGE.search(text)
    if match:
        return int(match[1] or match[2]), None
    for code in (*DISK_FULL, *NOT_WRITABLE):
        if os.strerror(code) in text:
            return code, None
    return None, None


def _concerns(path: Path, output_dir: Path) -> bool:
    """True when `path` is output_dir, lies inside it, or is a folder above it that mkdir had to create."""
    path, output_dir = Path(os.path.abspath(path)), Path(os.path.abspath(output_dir))
    return path == output_dir or output_dir in path.parents or path in output_dir.parents


def _out_of_memory_message(exc: BaseException, config: TrainConfig | None) -> str:
    """One sentence: how much was asked for (when torch says) and each key that lowers memory use."""
    tried = _TRIED_TO_ALLOCATE.search(str(exc))
    what = f"out of GPU memory (tried to allocate {tried[1]})" if tried else "out of GPU memory"

    def now(key: str) -> str:
        if config is None:
            return ""
        value = getattr(config, key)
        shown = ("true" if value else "false") if isinstance(value, bool) else str(value)
        return f" (now {shown})"

    # Only the switches that are still off (without a config: all of them).
    switches = [
        f"{key}: true (now false)" if config is not None else f"{key}: true"
        for key in ("gradient_checkpointing", "cache_latents")
        if config is None or not getattr(config, key)
    ]
    if config is None or config.mixed_precision == "no":
        switches.append(f"mixed_precision: bf16 or fp16{now('mixed_precision')}")
    if config is None or config.memory_profile != "low":
        switches.append("memory_profile: low (all of these at once)")
    set_them = f", set {', '.join(switches[:-1])} or {switches[-1]}" if len(switches) > 1 else ""
    if len(switches) == 1:
        set_them = f", set {switches[0]}"
    return (
        f"{what}; to use less, lower batch_size{now('batch_size')} (raise gradient_accumulation_steps to "
        f"keep the effective batch) or resolution{now('resolution')}{set_them}."
    )
