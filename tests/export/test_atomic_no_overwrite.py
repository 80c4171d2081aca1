"""write_atomic(..., overwrite=False): a new file appears whole, an existing one is never replaced."""

from __future__ import annotations

import os

import pytest

from lora_scripts.export.atomic import write_atomic


def test_a_new_file_is_written(tmp_path):
    write_atomic(tmp_path / "new.bin", lambda tmp: tmp.write_bytes(b"data"), overwrite=False)
    assert (tmp_path / "new.bin").read_bytes() == b"data"
    assert os.listdir(tmp_path) == ["new.bin"]


def test_an_existing_file_is_kept_even_when_it_appears_during_the_write(tmp_path):
    target = tmp_path / "taken.bin"
    target.write_bytes(b"old")
    with pytest.raises(FileExistsError):
        write_atomic(target, lambda tmp: tmp.write_bytes(b"new"), overwrite=False)
    assert target.read_bytes() == b"old"

    late = tmp_path / "late.bin"

    def write(tmp):
        tmp.write_bytes(b"new")
        late.write_bytes(b"another program's")

    with pytest.raises(FileExistsError):
        write_atomic(late, write, overwrite=False)
    assert late.read_bytes() == b"another program's"
    assert sorted(os.listdir(tmp_path)) == ["late.bin", "taken.bin"]  # no temporary file left


def test_without_hard_links_it_renames_after_a_check(tmp_path, monkeypatch):
    def no_links(src, dst):
        raise PermissionError(1, "Operation not permitted")  # FAT, exFAT, some network shares

    monkeypatch.setattr(os, "link", no_links)
    write_atomic(tmp_path / "a.bin", lambda tmp: tmp.write_bytes(b"a"), overwrite=False)
    assert (tmp_path / "a.bin").read_bytes() == b"a"
    with pytest.raises(FileExistsError):
        write_atomic(tmp_path / "a.bin", lambda tmp: tmp.write_bytes(b"b"), overwrite=False)
    assert (tmp_path / "a.bin").read_bytes() == b"a" and os.listdir(tmp_path) == ["a.bin"]
