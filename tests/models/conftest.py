"""Fixtures for model-loading tests: tiny SD models (built in well under a second) and their single files."""

from __future__ import annotations

from pathlib import Path

import pytest

from lora_scripts.models.tiny import TinySD, build_tiny_sd, build_tiny_sd_components
from tests.helpers.compvis import write_compvis_checkpoint


@pytest.fixture(scope="session")
def tiny_sd_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny SD 1.x-shaped diffusers folder (seed 0)."""
    return build_tiny_sd(tmp_path_factory.mktemp("tiny") / "tiny-sd")


@pytest.fixture(scope="session")
def tiny_sd() -> TinySD:
    """The same tiny model in memory: the reference every loaded tensor is compared with."""
    return build_tiny_sd_components()


@pytest.fixture(scope="session")
def tiny_sd_file(tmp_path_factory: pytest.TempPathFactory, tiny_sd: TinySD) -> Path:
    """The tiny model as a CompVis single-file .safetensors (what WebUI users have)."""
    path = tmp_path_factory.mktemp("tiny_file") / "tiny.safetensors"
    return write_compvis_checkpoint(path, tiny_sd.unet, tiny_sd.vae, tiny_sd.text_encoder)


@pytest.fixture(autouse=True)
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Loading must work offline: any attempt to open a connection fails the test."""
    import socket

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("model loading tried to use the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
