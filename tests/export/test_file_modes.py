"""Every file lora-scripts writes gets the user's umask, like any file they create: 0644 under umask 022, so a
WebUI or ComfyUI running as another user (or in a container) can read the LoRA. safetensors 0.8's `save_file`
recreates its file with mode 0600; the atomic writer must not let that through."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
import safetensors.torch
import torch

from lora_scripts.captioning.metadata_csv import backup_file, write_bytes_atomic
from lora_scripts.export.atomic import write_atomic, write_text_atomic


@pytest.fixture(params=[0o022, 0o002, 0o077], ids=lambda mask: f"umask{mask:03o}")
def umask(request: pytest.FixtureRequest) -> Iterator[int]:
    """Run the test under this umask; the old one is restored after."""
    old = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_safetensors_file_gets_the_umask_mode(tmp_path: Path, umask: int) -> None:
    target = tmp_path / "lora.safetensors"
    write_atomic(target, lambda tmp: safetensors.torch.save_file({"a": torch.zeros(2)}, str(tmp)))
    assert _mode(target) == 0o666 & ~umask
    assert safetensors.torch.load_file(target)["a"].shape == (2,)


def test_a_writer_that_narrows_the_mode_is_overruled(tmp_path: Path, umask: int) -> None:
    def private_writer(tmp: Path) -> None:  # as safetensors 0.8 (or any mkstemp-based writer) does
        tmp.write_bytes(b"x")
        os.chmod(tmp, 0o600)

    write_atomic(tmp_path / "a.bin", private_writer)
    assert _mode(tmp_path / "a.bin") == 0o666 & ~umask


def test_replacing_a_0600_file_gives_the_umask_mode(tmp_path: Path, umask: int) -> None:
    """A LoRA left at 0600 by an older version becomes readable when it is saved again."""
    target = tmp_path / "lora.safetensors"
    target.write_bytes(b"old")
    os.chmod(target, 0o600)
    write_atomic(target, lambda tmp: safetensors.torch.save_file({"a": torch.ones(1)}, str(tmp)))
    assert _mode(target) == 0o666 & ~umask


def test_text_csv_and_backup_writers(tmp_path: Path, umask: int) -> None:
    write_text_atomic(tmp_path / "config.yaml", "a: 1\n")
    write_bytes_atomic(tmp_path / "metadata.csv", "file_name,text\n")
    backup = backup_file(tmp_path / "metadata.csv")
    for path in (tmp_path / "config.yaml", tmp_path / "metadata.csv", backup):
        assert _mode(path) == 0o666 & ~umask, path.name


def test_folders_created_for_a_file_get_the_umask_mode(tmp_path: Path, umask: int) -> None:
    write_text_atomic(tmp_path / "a" / "b" / "c.txt", "x")
    assert [_mode(tmp_path / "a"), _mode(tmp_path / "a" / "b")] == [0o777 & ~umask] * 2


def test_the_umask_is_left_as_it_was(tmp_path: Path, umask: int) -> None:
    write_atomic(
        tmp_path / "x.safetensors", lambda tmp: safetensors.torch.save_file({"a": torch.zeros(1)}, str(tmp))
    )
    assert os.umask(umask) == umask
