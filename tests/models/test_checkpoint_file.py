"""Reading a single-file checkpoint tensor by tensor (models/checkpoint_file.py)."""

from __future__ import annotations

import pytest
import safetensors.torch
import torch

from lora_scripts.errors import UserError
from lora_scripts.models import checkpoint_file
from lora_scripts.models.checkpoint_file import CheckpointFile


def _tensors():
    generator = torch.Generator().manual_seed(0)
    return {
        "a.weight": torch.randn(8, 4, generator=generator).half(),
        "b.weight": torch.randn(3, 3, 1, 1, generator=generator),
        "position_ids": torch.arange(5)[None],
    }


def test_every_tensor_reads_back_as_stored_across_reopens(tmp_path, monkeypatch):
    monkeypatch.setattr(checkpoint_file, "REOPEN_BYTES", 1)  # a fresh handle before every read
    tensors = _tensors()
    path = tmp_path / "m.safetensors"
    safetensors.torch.save_file(tensors, str(path), metadata={"format": "pt"})
    with CheckpointFile(path) as ckpt:
        assert ckpt.metadata == {"format": "pt"}
        assert ckpt.shapes == {key: tuple(value.shape) for key, value in tensors.items()}
        assert {key: spec.dtype for key, spec in ckpt.specs.items()} == {
            k: v.dtype for k, v in tensors.items()
        }
        for _ in range(2):
            for key, value in tensors.items():
                assert torch.equal(ckpt.get(key), value), key


def test_a_pickle_is_read_whole_only_when_allowed(tmp_path):
    tensors = _tensors()
    path = tmp_path / "m.ckpt"
    torch.save({"state_dict": tensors, "global_step": 1}, path)
    with pytest.raises(UserError, match=r"--tuned .*m\.ckpt: a pickle checkpoint is refused"):
        CheckpointFile(path, what="--tuned")
    with CheckpointFile(path, allow_pickle=True) as ckpt:
        assert ckpt.metadata == {} and set(ckpt.specs) == set(tensors)
        assert all(torch.equal(ckpt.get(key), value) for key, value in tensors.items())


def test_a_damaged_file_is_named(tmp_path):
    path = tmp_path / "m.safetensors"
    safetensors.torch.save_file(_tensors(), str(path))
    path.write_bytes(path.read_bytes()[:20])
    with pytest.raises(UserError, match=r"--base .*m\.safetensors: not a readable \.safetensors file"):
        CheckpointFile(path)
