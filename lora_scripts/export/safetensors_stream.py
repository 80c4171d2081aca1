"""A .safetensors file written one tensor at a time, so that a multi-GB checkpoint never sits in memory whole.

safetensors' own `save_file` takes every tensor at once. The format does not need that: an 8-byte
little-endian header length, a JSON header naming each tensor's dtype, shape and byte range (`data_offsets`,
relative to the end of the header) plus the string metadata under `__metadata__`, padded with spaces to a
multiple of 8 bytes, then the tensors' bytes back to back. Everything in the header is known from the
tensors' dtypes and shapes, so it is written first and each tensor's bytes follow as the caller produces
them.

The file is the one `save_file` writes for the same tensors: tensors in its order (dtype, widest first in
safetensors' own dtype order, then name), the same JSON spelling and padding. Only the order of the
metadata entries may differ (safetensors keeps them in a hash map; here they are sorted), which no reader
sees.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch
from tqdm.auto import tqdm

# safetensors' dtype names, in the order of its `Dtype` enum: save_file sorts by it, descending. (torch 2.1
# and 2.2 have no uint16/32/64: those are left out there.)
_DTYPE_NAMES = (
    ("bool", "BOOL"),
    ("uint8", "U8"),
    ("int8", "I8"),
    ("float8_e5m2", "F8_E5M2"),
    ("float8_e4m3fn", "F8_E4M3"),
    ("int16", "I16"),
    ("uint16", "U16"),
    ("float16", "F16"),
    ("bfloat16", "BF16"),
    ("int32", "I32"),
    ("uint32", "U32"),
    ("float32", "F32"),
    ("complex64", "C64"),
    ("float64", "F64"),
    ("int64", "I64"),
    ("uint64", "U64"),
)
_DTYPES: dict[torch.dtype, str] = {
    getattr(torch, attr): name for attr, name in _DTYPE_NAMES if hasattr(torch, attr)
}
_RANK = {name: rank for rank, name in enumerate(_DTYPES.values())}
TORCH_DTYPES: dict[str, torch.dtype] = {name: dtype for dtype, name in _DTYPES.items()}


@dataclass(frozen=True)
class TensorSpec:
    """What the header says of one tensor: its name, dtype and shape."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        count = 1
        for size in self.shape:
            count *= size
        return count * self.dtype.itemsize


def save_order(specs: Iterable[TensorSpec]) -> list[TensorSpec]:
    """`specs` in the order save_file lays tensors out: dtype (safetensors' enum order, descending), then
    name."""
    return sorted(specs, key=lambda spec: (-_RANK[dtype_name(spec.dtype)], spec.name))


def dtype_name(dtype: torch.dtype) -> str:
    """safetensors' name of `dtype` ("F16", "BF16", ...); ValueError for one it cannot store."""
    try:
        return _DTYPES[dtype]
    except KeyError:
        raise ValueError(f"safetensors cannot store {dtype}") from None


def header_bytes(specs: list[TensorSpec], metadata: Mapping[str, str] | None) -> bytes:
    """The length prefix and the padded JSON header for `specs` laid out in the given order."""
    header: dict[str, object] = {}
    if metadata is not None:
        bad = [
            key for key, value in metadata.items() if not isinstance(key, str) or not isinstance(value, str)
        ]
        if bad:
            raise ValueError(f"safetensors metadata must map str to str; '{bad[0]}' does not")
        header["__metadata__"] = dict(sorted(metadata.items()))
    offset = 0
    for spec in specs:
        if spec.name in header:
            raise ValueError(f"tensor '{spec.name}' is listed twice")
        header[spec.name] = {
            "dtype": dtype_name(spec.dtype),
            "shape": list(spec.shape),
            "data_offsets": [offset, offset + spec.nbytes],
        }
        offset += spec.nbytes
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    return len(text).to_bytes(8, "little") + text


def write_streaming(
    path: Path,
    specs: Iterable[TensorSpec],
    produce: Callable[[TensorSpec], torch.Tensor],
    metadata: Mapping[str, str] | None = None,
    *,
    desc: str | None = None,
    stamp_hashes: bool = False,
) -> None:
    """Write a .safetensors file at `path` holding `specs`, asking `produce(spec)` for each tensor in turn
    (in save_order, one at a time: only the tensor being written is alive here).

    A produced tensor must have the spec's dtype and shape (ValueError otherwise); it may live on any device.
    desc: show a progress bar over the tensors (rate and time left) with this label. Not atomic by itself:
    write to a temporary name and rename (export/atomic.py write_atomic). stamp_hashes: the metadata gets
    sd-scripts' `sshs_model_hash` and `sshs_legacy_hash` of the file written (computed as it is written)."""
    ordered = save_order(specs)
    if stamp_hashes:  # placeholders of the final length, filled in once the data is written
        metadata = {**(metadata or {}), **{key: "0" * length for key, length in _HASH_LENGTHS.items()}}
    header = header_bytes(ordered, metadata)
    digest = hashlib.sha256()
    with open(path, "wb+") as fh:
        fh.write(header)
        for spec in tqdm(ordered, desc=desc, unit="tensor", disable=desc is None, leave=False):
            tensor = produce(spec)
            if tensor.dtype != spec.dtype or tuple(tensor.shape) != spec.shape:
                raise ValueError(
                    f"'{spec.name}': produced {tensor.dtype} {tuple(tensor.shape)}, the header says "
                    f"{spec.dtype} {spec.shape}"
                )
            data = tensor_bytes(tensor)
            digest.update(data)
            fh.write(data)
        if stamp_hashes:
            _stamp(fh, header, digest.hexdigest())


# sd-scripts' hashes (export/hashes.py): sshs_model_hash is the sha256 of the bytes after the header, so it
# can be written into the header afterwards; sshs_legacy_hash reads 64 KiB at 1 MiB of the file.
_HASH_LENGTHS = {"sshs_model_hash": 64, "sshs_legacy_hash": 8}
LEGACY_OFFSET, LEGACY_LENGTH = 0x100000, 0x10000


def _stamp(fh: BinaryIO, header: bytes, model_hash: str) -> None:
    """Put the hashes into the header's placeholders: same lengths, so no byte moves. The legacy hash is
    left empty when its 64 KiB reach into the header (a header over 1 MiB), as it would hash itself."""
    legacy = ""
    if len(header) <= LEGACY_OFFSET:
        fh.seek(LEGACY_OFFSET)
        legacy = hashlib.sha256(fh.read(LEGACY_LENGTH)).hexdigest()[:8]
    stamped = header
    for key, value in (("sshs_model_hash", model_hash), ("sshs_legacy_hash", legacy)):
        placeholder = f'"{key}":"{"0" * _HASH_LENGTHS[key]}"'.encode()
        filled = f'"{key}":"{value.ljust(_HASH_LENGTHS[key])}"'.encode() if value else placeholder
        if stamped.count(placeholder) != 1:
            raise ValueError(f"the header does not hold one {key} placeholder")
        stamped = stamped.replace(placeholder, filled)
    fh.seek(0)
    fh.write(stamped)


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The tensor's bytes in memory order (little-endian, as safetensors stores them), without a copy when
    it is a contiguous CPU tensor."""
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy())
