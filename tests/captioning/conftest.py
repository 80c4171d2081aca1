"""Fixtures of the captioning tests: the tiny BLIP model (built once per session)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.captioning.blip_fixture import write_tiny_blip


@pytest.fixture(scope="session")
def tiny_blip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Folder of a tiny random-weight BLIP captioning model, loadable with `--model <folder>`."""
    return write_tiny_blip(tmp_path_factory.mktemp("tiny_blip"))
