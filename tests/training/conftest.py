"""Fixtures for end-to-end training runs on the tiny model (each run takes a few seconds on CPU)."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
import yaml

from lora_scripts.demo import draw_ink_image
from lora_scripts.models.tiny import build_tiny_sd


@pytest.fixture
def one_torch_thread():
    """Tiny models: on a shared 2-core machine torch's threads cost more than they give (5-20x slower steps).
    Opt in per module (`pytestmark = pytest.mark.usefixtures("one_torch_thread")`): runs compared bit for bit
    with a subprocess (resume, interrupt) must keep torch's default threads, since another thread count sums
    in another order."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_run_settings(data: Path, model: Path, **overrides) -> dict:
    """Config values of a short tiny-model run on `data` (a folder with metadata.csv); `overrides` win."""
    settings = dict(
        train_data_dir=str(data),
        metadata_path=str(data / "metadata.csv"),
        base_model=str(model),
        resolution=64,
        batch_size=2,
        max_train_steps=2,
        learning_rate=1e-3,
    )
    return settings | overrides


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return build_tiny_sd(tmp_path_factory.mktemp("models") / "tiny-sd")


def make_dataset(folder: Path, n: int = 6) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "metadata.csv", "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["file_name", "text"])
        for i in range(n):
            draw_ink_image(i, seed=i, size=72).save(folder / f"img_{i}.png")
            writer.writerow([f"img_{i}.png", f'ink wash painting, subject {i}, "quoted", monochrome'])
    return folder / "metadata.csv"


def write_config(path: Path, **values) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(values, sort_keys=False), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def dataset_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("data") / "ink_painting"
    make_dataset(folder)
    return folder
