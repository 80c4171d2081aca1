"""The size of the LoRA file a run writes, worked out on the meta device from training's own saver.

`kohya_state_dict` (export/kohya.py) is what training writes; run on the meta network that `check` builds,
it gives every key, shape and dtype of the file without a weight in memory (its copies to the CPU stay on the
meta device, see `_KeepOnMeta`), so the size cannot drift from what training saves, whatever the network
type.

A .safetensors file is an 8-byte header length, a JSON header (padded with spaces to a multiple of 8 bytes)
and the tensors' bytes; export/safetensors_stream.py writes that header byte for byte as safetensors does, so
`file_bytes` is exact for a given metadata (tests compare it with real files).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from lora_scripts.export.kohya import LoraNetwork, kohya_state_dict
from lora_scripts.export.safetensors_stream import TensorSpec, header_bytes, save_order

ALPHA_SUFFIX = ".alpha"  # every module of a kohya file has one (export/kohya.py count_modules)


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


def state_dict_specs(networks: list[LoraNetwork], dtype: torch.dtype) -> list[TensorSpec]:
    """The names, shapes and dtypes of `kohya_state_dict(networks, dtype)` for networks on the meta device."""
    with _KeepOnMeta():
        tensors = kohya_state_dict(networks, dtype)
    return [TensorSpec(key, tensor.dtype, tuple(tensor.shape)) for key, tensor in tensors.items()]


def file_bytes(specs: list[TensorSpec], metadata: Mapping[str, str] | None = None) -> int:
    """The size of the .safetensors file `safetensors.torch.save_file` writes for these tensors and
    `metadata`: its header as export/safetensors_stream.py writes it (the same bytes) and the data."""
    return len(header_bytes(save_order(specs), metadata)) + sum(spec.nbytes for spec in specs)


def lora_file_facts(networks: list[LoraNetwork], dtype: torch.dtype) -> LoraFileFacts:
    """What training's saver writes for these (meta-device) networks in `dtype`, metadata aside."""
    specs = state_dict_specs(networks, dtype)
    return LoraFileFacts(
        modules=sum(1 for spec in specs if spec.name.endswith(ALPHA_SUFFIX)),  # one alpha per module
        tensors=len(specs),
        tensor_bytes=sum(spec.nbytes for spec in specs),
        bytes=file_bytes(specs),
        dtype=dtype,
    )
