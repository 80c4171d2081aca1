"""The size of the LoRA file a run writes, worked out on the meta device from training's own saver.

`kohya_state_dict` (export/kohya.py) is what training writes; run on the meta network that `check` builds,
it gives every key, shape and dtype of the file without a weight in memory (its copies to the CPU stay on the
meta device, see `_KeepOnMeta`), so the size cannot drift from what training saves, whatever the network
type.

A .safetensors file is an 8-byte header length, a JSON header (padded with spaces to a multiple of 8 bytes)
and the tensors' bytes. The header lists, per tensor, its dtype, shape and byte offsets, and the metadata
(`__metadata__`, training's ss_* keys); `file_bytes` reproduces safetensors' serialisation, exact for a given
metadata (tests compare it with real files).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from lora_scripts.export.kohya import LoraNetwork, kohya_state_dict

# safetensors' dtype names, in the order of its Rust `Dtype` enum (the header lists larger dtypes first).
_DTYPE_NAMES = {
    torch.bool: "BOOL",
    torch.uint8: "U8",
    torch.int8: "I8",
    torch.int16: "I16",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int32: "I32",
    torch.float32: "F32",
    torch.float64: "F64",
    torch.int64: "I64",
}
_DTYPE_ORDER = {dtype: index for index, dtype in enumerate(_DTYPE_NAMES)}
_LENGTH_BYTES = 8  # the header's length, a little-endian u64
ALPHA_SUFFIX = ".alpha"  # every module of a kohya file has one (export/kohya.py count_modules)


@dataclass(frozen=True)
class TensorShape:
    """One tensor of a file: its shape and dtype, no data."""

    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        numel = 1
        for size in self.shape:
            numel *= size
        return numel * self.dtype.itemsize


@dataclass(frozen=True)
class LoraFileFacts:
    """The LoRA file training writes: `bytes` is its size without training's metadata (the ss_* keys, a
    few KiB, which hold run facts such as timestamps and hashes that exist only once training saves);
    `tensor_bytes` the tensors' share."""

    modules: int
    tensors: int
    tensor_bytes: int
    bytes: int
    dtype: torch.dtype


class _KeepOnMeta(TorchDispatchMode):
    """kohya_state_dict on meta tensors: every tensor it makes or copies (`.to("cpu", dtype)`, FLUX.1's fused
    layers' `torch.zeros`) is made on the meta device (the dtype as asked, no memory, nothing read), and
    `torch.equal` of meta tensors is False: trained parts of a fused layer have downs of their own
    (initialised apart), so export/fused.py writes them side by side, as training's saver does."""

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:  # noqa: ANN401
        kwargs = dict(kwargs or {})
        if func is torch.ops.aten.equal.default and any(getattr(a, "is_meta", False) for a in args):
            return False
        if any(argument.name == "device" for argument in func._schema.arguments):
            kwargs["device"] = torch.device("meta")
        return func(*args, **kwargs)


def state_dict_shapes(networks: list[LoraNetwork], dtype: torch.dtype) -> dict[str, TensorShape]:
    """The keys, shapes and dtypes of `kohya_state_dict(networks, dtype)`, for networks on the meta device."""
    with _KeepOnMeta():
        tensors = kohya_state_dict(networks, dtype)
    return {key: TensorShape(tuple(tensor.shape), tensor.dtype) for key, tensor in tensors.items()}


def file_bytes(tensors: Mapping[str, TensorShape], metadata: Mapping[str, str] | None = None) -> int:
    """The size of the .safetensors file `safetensors.torch.save_file` writes for these tensors and
    `metadata`: 8 bytes, the JSON header padded to a multiple of 8, and the data."""
    # safetensors orders tensors by dtype (larger enum value first), then by name; offsets follow that order.
    order = sorted(tensors.items(), key=lambda item: (-_DTYPE_ORDER[item[1].dtype], item[0]))
    header: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name, tensor in order:
        end = offset + tensor.nbytes
        header[name] = {
            "dtype": _DTYPE_NAMES[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [offset, end],
        }
        offset = end
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    padded = -(-len(text) // 8) * 8
    return _LENGTH_BYTES + padded + offset


def lora_file_facts(networks: list[LoraNetwork], dtype: torch.dtype) -> LoraFileFacts:
    """What training's saver writes for these (meta-device) networks in `dtype`, metadata aside."""
    shapes = state_dict_shapes(networks, dtype)
    return LoraFileFacts(
        modules=sum(1 for key in shapes if key.endswith(ALPHA_SUFFIX)),  # one alpha per module
        tensors=len(shapes),
        tensor_bytes=sum(tensor.nbytes for tensor in shapes.values()),
        bytes=file_bytes(shapes),
        dtype=dtype,
    )
