"""CaptionDataset items and collate batches, through a real DataLoader."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from lora_scripts.data import CaptionDataset, collate, collect_dataset
from tests.data.imagefiles import BLUE, RED, WHITE, split_image, write_image


@pytest.fixture
def dataset_dir(tmp_path: Path) -> Path:
    split_image((200, 100), RED, BLUE).save(tmp_path / "wide.png")
    (tmp_path / "wide.txt").write_text("red and blue")
    write_image(tmp_path / "small.jpg", size=(10, 30), color=WHITE)
    (tmp_path / "small.txt").write_text("white")
    write_image(tmp_path / "sub" / "square.webp", size=(64, 64))
    (tmp_path / "sub" / "square.txt").write_text("red square")
    return tmp_path


def test_items_are_square_float_tensors_in_range(dataset_dir: Path) -> None:
    dataset = CaptionDataset(collect_dataset(dataset_dir, None), resolution=32)
    assert len(dataset) == 3
    captions = []
    for example in dataset:
        pixels = example["pixel_values"]
        assert isinstance(pixels, torch.Tensor)
        assert pixels.shape == (3, 32, 32) and pixels.dtype == torch.float32
        assert pixels.min() >= -1.0 and pixels.max() <= 1.0
        captions.append(example["caption"])
    assert captions == ["white", "red square", "red and blue"]  # small.jpg, sub/square.webp, wide.png


def test_wide_image_is_center_cropped(dataset_dir: Path) -> None:
    items = collect_dataset(dataset_dir, None)
    wide = CaptionDataset([i for i in items if i.file_name == "wide.png"], resolution=32)[0]["pixel_values"]
    assert isinstance(wide, torch.Tensor)
    # Red is (1, -1, -1) in [-1, 1], blue is (-1, -1, 1); the edge is in the middle of the crop.
    assert torch.equal(wide[:, 16, 2], torch.tensor([1.0, -1.0, -1.0]))
    assert torch.equal(wide[:, 16, 29], torch.tensor([-1.0, -1.0, 1.0]))


def test_collate_through_a_dataloader(dataset_dir: Path) -> None:
    dataset = CaptionDataset(collect_dataset(dataset_dir, None), resolution=16)
    batches = list(DataLoader(dataset, batch_size=2, collate_fn=collate))
    assert [b["pixel_values"].shape for b in batches] == [(2, 3, 16, 16), (1, 3, 16, 16)]
    assert batches[0]["pixel_values"].dtype == torch.float32
    assert batches[0]["captions"] == ["white", "red square"]
    assert batches[1]["captions"] == ["red and blue"]


def test_resolution_must_be_positive() -> None:
    with pytest.raises(ValueError, match="resolution"):
        CaptionDataset([], resolution=0)
