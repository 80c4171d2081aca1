"""Model hashes exactly as sd-scripts computes them (`sshs_model_hash`, `sshs_legacy_hash`).

A1111 and Civitai identify a LoRA by these: the "new" hash is the sha256 of everything after the safetensors
header (so editing metadata does not change it); the "legacy" hash of sd-webui-additional-networks reads
64 KiB at offset 1 MiB of the serialized file.
"""

from __future__ import annotations

import hashlib
import io
from pathlib import Path
from typing import BinaryIO

import safetensors.torch
import torch

_BLOCK = 1024 * 1024


def addnet_hash_safetensors(stream: BinaryIO) -> str:
    """sha256 (hex) of the bytes after the 8-byte length prefix and the JSON header."""
    digest = hashlib.sha256()
    stream.seek(0)
    header_len = int.from_bytes(stream.read(8), "little")
    stream.seek(8 + header_len)
    for chunk in iter(lambda: stream.read(_BLOCK), b""):
        digest.update(chunk)
    return digest.hexdigest()


def addnet_hash_legacy(stream: BinaryIO) -> str:
    """First 8 hex chars of sha256 over 64 KiB at offset 1 MiB (empty for small files, as in sd-scripts)."""
    digest = hashlib.sha256()
    stream.seek(0x100000)
    digest.update(stream.read(0x10000))
    return digest.hexdigest()[0:8]


def precalculate_hashes(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> tuple[str, str]:
    """(sshs_model_hash, sshs_legacy_hash) for a file about to be written, as sd-scripts does it.

    sd-scripts serializes with only the `ss_*` metadata for this, so the legacy hash matches theirs.
    """
    training_metadata = {k: v for k, v in metadata.items() if k.startswith("ss_")}
    buffer = io.BytesIO(safetensors.torch.save(tensors, training_metadata))
    return addnet_hash_safetensors(buffer), addnet_hash_legacy(buffer)


def file_model_hash(path: Path) -> str:
    """The sshs_model_hash of a file on disk (what A1111 shows as the LoRA hash, first 12 chars)."""
    with open(path, "rb") as fh:
        return addnet_hash_safetensors(fh)
