"""Fixtures for the post-training tools: tiny SD and SDXL diffusers folders (their configs name and size a
LoRA's layers, their weights take the diffusers reference loads)."""

from __future__ import annotations

from pathlib import Path

import pytest

from lora_scripts.models.tiny import build_tiny_sd, build_tiny_sdxl


@pytest.fixture(scope="session")
def tiny_sd_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_sd(tmp_path_factory.mktemp("tiny") / "tiny-sd")


@pytest.fixture(scope="session")
def tiny_sdxl_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_sdxl(tmp_path_factory.mktemp("tiny") / "tiny-sdxl")
