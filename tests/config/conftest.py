"""Fixtures for config tests: a temporary working directory laid out like a user's project."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BASE_MODEL = "./models/Stable-diffusion/v1-5-pruned.safetensors"


def make_project(root: Path, data_folders: tuple[str, ...] = ("style_train", "ink_painting")) -> None:
    """Create the folders and files the seed configs point at (the checkpoint is an empty file)."""
    for name in data_folders:
        folder = root / "data" / name
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "metadata.csv").write_text("file_name,text\n", encoding="utf-8")
    checkpoint = root / BASE_MODEL
    checkpoint.parent.mkdir(parents=True, exist_ok=True)
    checkpoint.touch()


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A tmp working directory (the cwd during the test) holding the seed configs' data and model."""
    make_project(tmp_path)
    (tmp_path / "configs").mkdir()
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture
def write(project: Path) -> Callable[[str], str]:
    """Write YAML text to configs/x.yaml in the project; returns the relative path used in messages."""

    def write(text: str) -> str:
        (project / "configs" / "x.yaml").write_text(text, encoding="utf-8")
        return "configs/x.yaml"

    return write
