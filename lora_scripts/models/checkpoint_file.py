"""A single-file checkpoint read one tensor at a time, and a new one written the same way: what merge and
extract use so that a 2-7 GB model never sits in memory whole.

A .safetensors file is opened with safetensors' `safe_open`: its header (names, dtypes, shapes, metadata)
is read at once, each tensor only when asked for. `safe_open` memory-maps the file, and every page a read
touches stays mapped, counted in the process's resident memory until the handle closes (file pages the
kernel may drop, but counted: read tensor by tensor, a 2 GB file still peaks at 2 GB). So the handle is
opened anew after every `REOPEN_BYTES` read, which bounds that to a few tensors.

A pickle checkpoint (.ckpt, .pt, ...) has no such header: it is refused unless the caller allows pickles, and
then loaded whole with `torch.load(weights_only=True)` (models/detect.py `read_checkpoint`), which unpickles
tensors only, never code.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from types import TracebackType

import torch
from safetensors import safe_open

from lora_scripts.errors import UserError
from lora_scripts.export.atomic import write_atomic
from lora_scripts.export.safetensors_stream import TORCH_DTYPES, TensorSpec, write_streaming
from lora_scripts.models.detect import read_checkpoint

log = logging.getLogger(__name__)

REOPEN_BYTES = 64 * 2**20


class CheckpointFile:
    """An open single-file checkpoint: `specs` (key → TensorSpec, in the file's order), `metadata` (the
    safetensors `__metadata__`; {} for a pickle) and `get(key)`, one tensor on CPU in its stored dtype."""

    def __init__(self, path: Path, *, allow_pickle: bool = False, what: str = "--base"):
        self.path = Path(path)
        self._handle = None
        self._tensors: dict[str, torch.Tensor] | None = None
        self._read_since_open = 0
        if self.path.suffix.lower() == ".safetensors":
            try:
                self._handle = self._open()
                self.metadata: dict[str, str] = dict(self._handle.metadata() or {})
                self.specs = {key: self._spec(key) for key in self._handle.keys()}
            except Exception as err:  # noqa: BLE001 - safetensors raises its own error types for damage
                raise UserError(
                    f"{what} {self.path}: not a readable .safetensors file ({err}); it may be truncated, so "
                    "download it again."
                ) from err
            return
        if not allow_pickle:
            raise UserError(
                f"{what} {self.path}: a pickle checkpoint is refused, because unpickling a file can run code "
                "in it; use the model's .safetensors release, or allow pickles (--allow-pickle) to load it "
                "with torch.load(weights_only=True), which reads the whole file into memory."
            )
        log.warning("%s is a pickle checkpoint: reading all of it into memory (it has no index).", self.path)
        self._tensors = read_checkpoint(self.path, key=what)
        self.metadata = {}
        self.specs = {
            key: TensorSpec(key, value.dtype, tuple(value.shape)) for key, value in self._tensors.items()
        }

    def _open(self):  # noqa: ANN202 - safetensors' handle type is not importable
        return safe_open(str(self.path), framework="pt", device="cpu")

    def _spec(self, key: str) -> TensorSpec:
        stored = self._handle.get_slice(key)
        return TensorSpec(key, TORCH_DTYPES[stored.get_dtype()], tuple(stored.get_shape()))

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {key: spec.shape for key, spec in self.specs.items()}

    def get(self, key: str) -> torch.Tensor:
        """The tensor `key`, read now (safetensors) or from the loaded pickle, on CPU as stored."""
        if self._tensors is not None:
            return self._tensors[key]
        if self._read_since_open >= REOPEN_BYTES:
            self._handle, self._read_since_open = self._open(), 0  # unmaps the pages read so far
        self._read_since_open += self.specs[key].nbytes
        return self._handle.get_tensor(key)

    def close(self) -> None:
        self._handle = None
        self._tensors = None

    def __enter__(self) -> CheckpointFile:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.close()


def write_checkpoint(
    path: Path,
    specs: list[TensorSpec],
    produce: Callable[[TensorSpec], torch.Tensor],
    metadata: Mapping[str, str],
    *,
    desc: str | None = None,
) -> None:
    """Write a .safetensors checkpoint at `path` atomically, one tensor at a time (`produce(spec)` gives
    each in turn; see export/safetensors_stream.py), with a progress bar labelled `desc`, and sd-scripts'
    `sshs_model_hash` / `sshs_legacy_hash` of the file in its metadata."""
    write_atomic(
        Path(path),
        lambda tmp: write_streaming(tmp, specs, produce, metadata, desc=desc, stamp_hashes=True),
    )
