"""The streaming .safetensors writer: the file safetensors' save_file writes, one tensor at a time."""

from __future__ import annotations

import json

import pytest
import safetensors.torch
import torch
from safetensors import safe_open

from lora_scripts.export.safetensors_stream import TensorSpec, save_order, write_streaming
from lora_scripts.models.checkpoint_file import write_checkpoint


def _tensors() -> dict[str, torch.Tensor]:
    """Every dtype a checkpoint holds, names out of order, a scalar, an empty tensor, a 1x1 conv."""
    generator = torch.Generator().manual_seed(0)
    return {
        "model.b.weight": torch.randn(5, 3, generator=generator).half(),
        "model.a.weight": torch.randn(4, 2, 1, 1, generator=generator),
        "model.a.bias": torch.randn(7, generator=generator).bfloat16(),
        "position_ids": torch.arange(77)[None],
        "logit_scale": torch.tensor(4.6052),
        "v_pred": torch.tensor([]),
        "mask": torch.tensor([True, False, True]),
        "count": torch.tensor([3], dtype=torch.int32),
        "bytes": torch.tensor([1, 2, 255], dtype=torch.uint8),
        "double": torch.randn(2, generator=generator).double(),
    }


def _stream(path, tensors, metadata=None):
    specs = [TensorSpec(name, value.dtype, tuple(value.shape)) for name, value in tensors.items()]
    write_streaming(path, specs, lambda spec: tensors[spec.name], metadata)
    return path


def _header(path) -> dict:
    data = path.read_bytes()
    return json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])


@pytest.mark.parametrize("metadata", [None, {}, {"format": "pt"}], ids=["none", "empty", "one"])
def test_file_is_byte_for_byte_what_save_file_writes(tmp_path, metadata):
    tensors = _tensors()
    safetensors.torch.save_file(tensors, str(tmp_path / "theirs.safetensors"), metadata=metadata)
    _stream(tmp_path / "ours.safetensors", tensors, metadata)
    assert (tmp_path / "ours.safetensors").read_bytes() == (tmp_path / "theirs.safetensors").read_bytes()


def test_many_metadata_entries_give_the_same_header_and_data(tmp_path):
    """safetensors keeps metadata in a hash map (its order varies); everything else is identical."""
    tensors, metadata = _tensors(), {f"key{i}": f'välue "{i}" \\ {i}' for i in range(20)}
    safetensors.torch.save_file(tensors, str(tmp_path / "theirs.safetensors"), metadata=metadata)
    ours = _stream(tmp_path / "ours.safetensors", tensors, metadata)
    theirs = tmp_path / "theirs.safetensors"
    assert _header(ours) == _header(theirs)
    assert ours.stat().st_size == theirs.stat().st_size
    size = int.from_bytes(ours.read_bytes()[:8], "little")
    assert ours.read_bytes()[8 + size :] == theirs.read_bytes()[8 + size :]
    with safe_open(str(ours), framework="pt") as fh:
        assert fh.metadata() == metadata
        for name, value in tensors.items():
            read = fh.get_tensor(name)
            assert read.dtype == value.dtype and torch.equal(read, value), name


def test_tensors_are_asked_for_one_at_a_time_in_save_order(tmp_path):
    tensors, asked = _tensors(), []

    def produce(spec):
        asked.append(spec.name)
        return tensors[spec.name]

    specs = [TensorSpec(name, value.dtype, tuple(value.shape)) for name, value in tensors.items()]
    write_streaming(tmp_path / "x.safetensors", specs, produce)
    assert asked == [spec.name for spec in save_order(specs)]
    assert asked[:3] == ["position_ids", "double", "logit_scale"]  # I64, F64, then F32 by name
    assert list(_header(tmp_path / "x.safetensors")) == asked


def test_a_tensor_of_another_shape_or_dtype_is_refused(tmp_path):
    spec = TensorSpec("w", torch.float16, (2, 2))
    with pytest.raises(ValueError, match="'w': produced torch.float32"):
        write_streaming(tmp_path / "x.safetensors", [spec], lambda _: torch.zeros(2, 2))
    with pytest.raises(ValueError, match=r"the header says torch.float16 \(2, 2\)"):
        write_streaming(tmp_path / "x.safetensors", [spec], lambda _: torch.zeros(2, 3).half())


def test_write_checkpoint_is_atomic(tmp_path):
    """A failure halfway leaves the old file as it was and no temporary file."""
    target = tmp_path / "model.safetensors"
    _stream(target, {"w": torch.ones(2)})
    before = target.read_bytes()
    specs = [TensorSpec(f"w{i}", torch.float32, (2,)) for i in range(3)]

    def produce(spec):
        if spec.name == "w2":
            raise RuntimeError("disk gone")
        return torch.zeros(2)

    with pytest.raises(RuntimeError, match="disk gone"):
        write_checkpoint(target, specs, produce, {})
    assert target.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]


def test_stamped_hashes_are_the_written_files(tmp_path):
    """sshs_model_hash (sha256 after the header) and sshs_legacy_hash (64 KiB at 1 MiB) of the file itself,
    filled into the header after the data is written: the file still reads, and nothing else moved."""
    from lora_scripts.export.hashes import addnet_hash_legacy, file_model_hash
    from lora_scripts.export.safetensors_stream import TensorSpec, write_streaming

    tensors = {
        "a": torch.randn(700, 500),
        "b": torch.arange(10, dtype=torch.int64),
        "c": torch.ones(3, 3).half(),
    }
    specs = [TensorSpec(name, value.dtype, tuple(value.shape)) for name, value in tensors.items()]
    path = tmp_path / "stamped.safetensors"
    write_streaming(path, specs, lambda spec: tensors[spec.name], {"note": "x"}, stamp_hashes=True)
    with safe_open(str(path), framework="pt") as fh:
        meta = fh.metadata()
        assert all(torch.equal(fh.get_tensor(name), value) for name, value in tensors.items())
    assert meta["note"] == "x"
    assert meta["sshs_model_hash"] == file_model_hash(path)
    with open(path, "rb") as fh:
        assert meta["sshs_legacy_hash"] == addnet_hash_legacy(fh) and len(meta["sshs_legacy_hash"]) == 8
