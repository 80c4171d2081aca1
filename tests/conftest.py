"""Fixtures shared by every test folder: the tiny FLUX.1 model, written once per test module."""

from __future__ import annotations

from pathlib import Path

import pytest

from lora_scripts.models.tiny import build_tiny_flux, build_tiny_flux_components
from tests.helpers.flux_files import write_flux_files


@pytest.fixture(scope="module")
def flux_dir(tmp_path_factory) -> Path:
    """The tiny FLUX.1-dev as a diffusers folder."""
    return build_tiny_flux(tmp_path_factory.mktemp("flux") / "tiny-flux")


@pytest.fixture(scope="module")
def flux_files(tmp_path_factory) -> dict[str, Path]:
    """The same model as the files ComfyUI users keep: BFL transformer, ae, clip_l, t5xxl (and all-in-one)."""
    return write_flux_files(build_tiny_flux_components(), tmp_path_factory.mktemp("comfy"))
