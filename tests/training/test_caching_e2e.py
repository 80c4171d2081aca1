"""Latent and text-encoder caches through `train()`: what is encoded, what is written, and that caching
changes nothing but speed (a cached run saves the same LoRA tensors as an uncached one)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import safetensors
import safetensors.torch
import torch
from PIL import Image
from transformers import CLIPTextModel

from lora_scripts.config import load_config
from lora_scripts.demo import draw_ink_image
from lora_scripts.models.stable_diffusion import StableDiffusionFamily
from lora_scripts.training.caching import CACHE_FOLDER_NAME
from lora_scripts.training.loop import train
from tests.training.conftest import make_dataset, tiny_run_settings, write_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")

NUM_IMAGES = 4


@pytest.fixture
def encoded(monkeypatch) -> list[int]:
    """Batch sizes of every `encode_images` call (the VAE encoder), in order."""
    calls: list[int] = []
    original = StableDiffusionFamily.encode_images

    def counting(self, pixel_values: torch.Tensor) -> torch.Tensor:
        calls.append(pixel_values.shape[0])
        return original(self, pixel_values)

    monkeypatch.setattr(StableDiffusionFamily, "encode_images", counting)
    return calls


@pytest.fixture
def data(tmp_path) -> Path:
    """A fresh dataset folder per test: the disk cache lives inside it."""
    return make_dataset(tmp_path / "data", n=NUM_IMAGES).parent


def _settings(data: Path, model: Path, **overrides) -> dict:
    # fp32 files: compare the trained weights themselves, not their fp16 rounding. Both caches are on by
    # default where valid: a run here caches only what it names.
    uncached = {"cache_latents": False, "cache_text_encoder_outputs": False}
    return tiny_run_settings(data, model, save_precision="fp32", **(uncached | overrides))


def _train(tmp_path: Path, name: str, settings: dict) -> dict[str, torch.Tensor]:
    """Train with `settings` into tmp_path/name; the saved LoRA tensors."""
    cfg = write_config(tmp_path / f"{name}.yaml", **settings, output_dir=str(tmp_path / name))
    train(load_config(cfg))
    return safetensors.torch.load_file(tmp_path / name / "pytorch_lora_weights.safetensors")


def _assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert any(v.abs().max() > 0 for k, v in a.items() if k.endswith("lora_up.weight"))  # it trained


def _cache_files(data: Path) -> list[dict[str, str]]:
    """The metadata of each file of the dataset's disk cache."""
    metadata = []
    for path in sorted((data / CACHE_FOLDER_NAME).glob("*.safetensors")):
        with safetensors.safe_open(str(path), framework="pt") as fh:
            metadata.append(fh.metadata())
    return metadata


def test_disk_cache_is_written_once_then_reused_with_the_same_result(tmp_path, tiny_model_dir, data, encoded):
    settings = _settings(data, tiny_model_dir, cache_latents_to_disk=True)
    first = _train(tmp_path, "run1", settings)
    assert sum(encoded) == NUM_IMAGES
    files = _cache_files(data)
    # one file per (image, bucket, flip): 4 images, one 64x64 bucket, no flip_aug
    assert sorted(Path(m["image"]).name for m in files) == [f"img_{i}.png" for i in range(NUM_IMAGES)]
    assert all(json.loads(m["bucket"]) == [64, 64] and m["flip"] == "False" for m in files)

    encoded.clear()
    second = _train(tmp_path, "run2", settings)
    assert encoded == []  # the VAE encoder never ran
    assert len(_cache_files(data)) == NUM_IMAGES
    # moments are cached, not samples: run 2 draws the same latents from the same seed
    _assert_same_tensors(first, second)


def test_only_changed_images_and_sizes_are_encoded_again(tmp_path, tiny_model_dir, data, encoded):
    settings = _settings(data, tiny_model_dir, cache_latents_to_disk=True, max_train_steps=1)
    _train(tmp_path, "fill", settings)
    assert sum(encoded) == NUM_IMAGES

    image = Image.open(data / "img_1.png").convert("RGB")
    red, green, blue = image.getpixel((0, 0))
    image.putpixel((0, 0), ((red + 1) % 256, green, blue))  # one pixel of one image
    image.save(data / "img_1.png")
    encoded.clear()
    _train(tmp_path, "touched", settings)
    assert encoded == [1]
    assert len(_cache_files(data)) == NUM_IMAGES + 1  # the old entry stays; it simply no longer matches

    encoded.clear()
    _train(tmp_path, "resized", settings | {"resolution": 128})
    assert sum(encoded) == NUM_IMAGES  # another bucket: every key misses
    sizes = sorted(json.loads(m["bucket"])[0] for m in _cache_files(data))
    assert sizes == [64] * (NUM_IMAGES + 1) + [128] * NUM_IMAGES


def test_memory_cache_trains_exactly_like_no_cache(tmp_path, tiny_model_dir, data, encoded):
    steps = dict(max_train_steps=3)  # 2 epochs: uncached runs encode the images they draw at every step
    uncached = _train(tmp_path, "uncached", _settings(data, tiny_model_dir, **steps))
    assert sum(encoded) == 3 * 2
    encoded.clear()
    cached = _train(tmp_path, "cached", _settings(data, tiny_model_dir, cache_latents=True, **steps))
    assert sum(encoded) == NUM_IMAGES  # each image once, before the first step
    assert not (data / CACHE_FOLDER_NAME).exists()  # in memory only
    _assert_same_tensors(uncached, cached)


def test_flip_aug_caches_both_flips_and_trains_like_no_cache(tmp_path, tiny_model_dir, data, encoded):
    settings = _settings(data, tiny_model_dir, flip_aug=True, max_train_steps=4)
    cached = _train(tmp_path, "cached", settings | {"cache_latents_to_disk": True})
    assert sum(encoded) == 2 * NUM_IMAGES
    flips = sorted((Path(m["image"]).name, m["flip"]) for m in _cache_files(data))
    assert flips == sorted((f"img_{i}.png", f) for i in range(NUM_IMAGES) for f in ("False", "True"))
    # the uncached run flips the same samples (the dataset's RNG decides), so a swapped flip would show
    uncached = _train(tmp_path, "uncached", settings)
    _assert_same_tensors(cached, uncached)


def _dataset_with_shared_captions(folder: Path) -> Path:
    """4 images, 2 distinct captions (each used twice)."""
    folder.mkdir(parents=True)
    with open(folder / "metadata.csv", "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["file_name", "text"])
        for i in range(NUM_IMAGES):
            draw_ink_image(i, seed=i, size=72).save(folder / f"img_{i}.png")
            writer.writerow([f"img_{i}.png", f"ink wash painting, {'cat' if i % 2 else 'bird'}"])
    return folder


def test_text_encoder_cache_encodes_each_caption_once(tmp_path, tiny_model_dir, monkeypatch):
    data = _dataset_with_shared_captions(tmp_path / "shared")
    rows: list[int] = []  # prompts per text-encoder forward
    forward = CLIPTextModel.forward

    def counting(self, input_ids=None, *args, **kwargs):
        rows.append(input_ids.shape[0])
        return forward(self, input_ids, *args, **kwargs)

    monkeypatch.setattr(CLIPTextModel, "forward", counting)
    settings = _settings(data, tiny_model_dir, max_train_steps=4)  # 2 epochs of 2 batches
    cached = _train(tmp_path, "cached", settings | {"cache_text_encoder_outputs": True})
    assert rows == [2]  # the 2 distinct captions, in one batch, before the first step
    rows.clear()
    uncached = _train(tmp_path, "uncached", settings)
    assert rows == [2, 2, 2, 2]  # every step encodes its batch's captions
    _assert_same_tensors(cached, uncached)
