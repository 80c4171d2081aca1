"""`<lora:NAME>` resolves to a file stem, an ss_output_name or a path; unknown names list what was found."""

from __future__ import annotations

import shutil

import pytest
import safetensors.torch
import torch

from lora_scripts.errors import UserError
from lora_scripts.export.hashes import file_model_hash
from lora_scripts.generation.lora_library import LoraLibrary


def test_names_are_stems_and_output_names(lora_dir):
    library = LoraLibrary.scan([lora_dir])
    assert library.names() == ["ink_painting_v1", "ink_style", "locon", "unet-only.v2"]
    assert library.resolve("ink_style").path == lora_dir / "ink_style.safetensors"
    assert library.resolve("ink_painting_v1").path == lora_dir / "ink_style.safetensors"  # ss_output_name
    assert library.resolve("locon").path == lora_dir / "styles" / "locon.safetensors"  # found recursively
    assert library.resolve("unet-only.v2").path == lora_dir / "unet-only.v2.safetensors"


def test_a_path_works_without_lora_dir(lora_dir):
    path = lora_dir / "styles" / "locon.safetensors"
    assert LoraLibrary(folders=[], files=[]).resolve(str(path)).path == path
    with pytest.raises(UserError, match="does not exist"):
        LoraLibrary(folders=[], files=[]).resolve(str(lora_dir / "nope.safetensors"))


def test_unknown_name_lists_the_loras_found(lora_dir):
    with pytest.raises(UserError) as info:
        LoraLibrary.scan([lora_dir]).resolve("ink_paintng_v1")
    message = info.value.messages[0]
    assert message.startswith("<lora:ink_paintng_v1>: no LoRA named 'ink_paintng_v1' in ")
    assert "Did you mean 'ink_painting_v1'?" in message
    assert message.endswith("LoRAs found: ink_painting_v1, ink_style, locon, unet-only.v2.")


def test_empty_or_missing_folders(tmp_path):
    with pytest.raises(UserError, match="there are no LoRA .safetensors files"):
        LoraLibrary.scan([tmp_path]).resolve("x")
    with pytest.raises(UserError, match="no --lora-dir was given"):
        LoraLibrary.scan([]).resolve("x")
    with pytest.raises(UserError, match="is not a folder"):
        LoraLibrary.scan([tmp_path / "missing"])


def test_base_checkpoints_in_the_folder_are_not_loras(tmp_path, lora_dir):
    shutil.copy(lora_dir / "ink_style.safetensors", tmp_path / "ink_style.safetensors")
    safetensors.torch.save_file(
        {"model.diffusion_model.out.2.weight": torch.zeros(2)}, tmp_path / "sd15.safetensors"
    )
    assert LoraLibrary.scan([tmp_path]).names() == ["ink_painting_v1", "ink_style"]


def test_copies_of_one_file_are_fine_different_files_are_ambiguous(tmp_path, lora_dir):
    run = tmp_path / "run"
    run.mkdir()
    # A training run's two final files: same tensors, same ss_output_name.
    shutil.copy(lora_dir / "ink_style.safetensors", run / "pytorch_lora_weights.safetensors")
    shutil.copy(lora_dir / "ink_style.safetensors", tmp_path / "copy.safetensors")
    library = LoraLibrary.scan([tmp_path])
    assert library.resolve("ink_painting_v1").path in (
        run / "pytorch_lora_weights.safetensors",
        tmp_path / "copy.safetensors",
    )

    other = tmp_path / "other"
    other.mkdir()
    shutil.copy(lora_dir / "unet-only.v2.safetensors", other / "pytorch_lora_weights.safetensors")
    with pytest.raises(UserError, match="several different LoRA files answer to 'pytorch_lora_weights'"):
        LoraLibrary.scan([tmp_path]).resolve("pytorch_lora_weights")


def test_short_hash_is_webuis(lora_dir):
    lora = LoraLibrary.scan([lora_dir]).resolve("ink_style")
    assert lora.short_hash() == file_model_hash(lora.path)[:12]  # metadata's sshs_model_hash, checked
    # A hash in metadata that is not a sha256 is not trusted (it would end up in the infotext).
    tensors = safetensors.torch.load_file(lora.path)
    forged = lora_dir.parent / "forged.safetensors"
    safetensors.torch.save_file(tensors, forged, metadata={"sshs_model_hash": 'x", Seed: 1'})
    assert LoraLibrary(folders=[], files=[]).resolve(str(forged)).short_hash() == file_model_hash(forged)[:12]
