"""Latent cache: content keys, hits without encoding, disk files, corruption, bucketed batches."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import numpy as np
import pytest
import safetensors
import torch
from diffusers import AutoencoderKL
from PIL import Image, ImageOps

from lora_scripts.data import latent_cache
from lora_scripts.data.images import load_rgb, to_tensor
from lora_scripts.data.latent_cache import (
    LatentCache,
    LatentRequest,
    file_sha256,
    fill_latent_cache,
    latent_cache_key,
    module_fingerprint,
)
from lora_scripts.errors import UserError

SQUARE = (16, 16)
WIDE = (24, 16)


def tiny_vae(seed: int = 0) -> AutoencoderKL:
    """A 10 k-parameter VAE (no downsampling: moments are [8, H, W]), in eval mode."""
    torch.manual_seed(seed)
    vae = AutoencoderKL(
        block_out_channels=(8,), latent_channels=4, norm_num_groups=8, sample_size=32, layers_per_block=1
    )
    return vae.eval()


def write_noise_image(path: Path, seed: int, size: tuple[int, int] = (20, 20)) -> Path:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels, mode="RGB").save(path)
    return path


def load_pixels(request: LatentRequest) -> torch.Tensor:
    """Resize to the bucket (tests only; the trainer uses its own bucket fitting), flip, to [-1, 1]."""
    img = load_rgb(request.path).resize(request.bucket)
    return to_tensor(ImageOps.mirror(img) if request.flip else img)


class Counting:
    """Wraps load_pixels and a VAE encoder, recording every call."""

    def __init__(self, vae: AutoencoderKL):
        self.vae = vae
        self.loaded: list[LatentRequest] = []
        self.encoded_shapes: list[tuple[int, ...]] = []

    def load(self, request: LatentRequest) -> torch.Tensor:
        self.loaded.append(request)
        return load_pixels(request)

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        assert not torch.is_grad_enabled()
        self.encoded_shapes.append(tuple(pixels.shape))
        return self.vae.encode(pixels).latent_dist.parameters


def fill(requests, counting: Counting, cache: LatentCache, batch_size: int = 4):
    return fill_latent_cache(
        requests,
        load_pixels=counting.load,
        encode=counting.encode,
        cache=cache,
        vae_id=module_fingerprint(counting.vae),
        batch_size=batch_size,
        disable_progress=True,
    )


@pytest.fixture
def images(tmp_path: Path) -> list[Path]:
    folder = tmp_path / "images"
    folder.mkdir()
    return [write_noise_image(folder / f"{i}.png", seed=i) for i in range(3)]


@pytest.fixture
def requests(images: list[Path]) -> list[LatentRequest]:
    return [LatentRequest(path, SQUARE, flip) for path in images for flip in (False, True)]


# ---- hashing and keys ------------------------------------------------------------------------------------


def test_file_sha256_matches_hashlib_across_chunks(tmp_path: Path) -> None:
    data = np.random.default_rng(0).integers(0, 256, 2 * 1024 * 1024 + 123, dtype=np.uint8).tobytes()
    (tmp_path / "big.bin").write_bytes(data)
    assert file_sha256(tmp_path / "big.bin") == hashlib.sha256(data).hexdigest()


def test_module_fingerprint_follows_weights_and_config() -> None:
    base = module_fingerprint(tiny_vae(0))
    assert module_fingerprint(tiny_vae(0)) == base  # same weights, another object
    changed = tiny_vae(0)
    with torch.no_grad():
        changed.encoder.conv_in.weight[0, 0, 0, 0] += 1e-3
    assert module_fingerprint(changed) != base
    assert module_fingerprint(tiny_vae(0).half()) != base  # an fp16 VAE encodes differently
    torch.manual_seed(0)
    other_config = AutoencoderKL(
        block_out_channels=(8,), latent_channels=4, norm_num_groups=8, sample_size=64, layers_per_block=1
    )
    assert module_fingerprint(other_config) != base  # same weights, different config


def test_key_changes_with_every_input(images: list[Path]) -> None:
    request = LatentRequest(images[0], SQUARE, False)
    key = latent_cache_key("aa", request, "center", "vae")
    # The path is not part of the key: identical bytes give identical moments.
    assert latent_cache_key("aa", LatentRequest(images[1], SQUARE, False), "center", "vae") == key
    variants = [
        latent_cache_key("ab", request, "center", "vae"),
        latent_cache_key("aa", LatentRequest(images[0], WIDE, False), "center", "vae"),
        latent_cache_key("aa", LatentRequest(images[0], SQUARE, True), "center", "vae"),
        latent_cache_key("aa", request, "none", "vae"),
        latent_cache_key("aa", request, "center", "vae2"),
    ]
    assert len({key, *variants}) == 6
    with pytest.raises(ValueError, match="random crops"):
        latent_cache_key("aa", request, "random", "vae")


# ---- filling -------------------------------------------------------------------------------------------


def test_first_fill_equals_direct_encoding(requests: list[LatentRequest]) -> None:
    counting = Counting(tiny_vae())
    moments, stats = fill(requests, counting, LatentCache(None), batch_size=4)
    assert (stats.hits, stats.misses) == (0, 6)
    assert counting.encoded_shapes == [(4, 3, 16, 16), (2, 3, 16, 16)]
    for request in requests:
        with torch.no_grad():
            direct = counting.vae.encode(load_pixels(request)[None]).latent_dist.parameters[0]
        assert moments[request].dtype == torch.float32 and moments[request].device.type == "cpu"
        torch.testing.assert_close(moments[request], direct, atol=1e-5, rtol=1e-5)
    # The flipped copy's moments are not the unflipped ones (the flag reached load_pixels).
    assert not torch.equal(moments[requests[0]], moments[requests[1]])


def test_second_fill_hits_in_memory_and_from_disk(tmp_path: Path, requests: list[LatentRequest]) -> None:
    vae = tiny_vae()
    first, _ = fill(requests, Counting(vae), LatentCache(tmp_path / "cache"))

    counting = Counting(vae)
    again, stats = fill(requests, counting, LatentCache(tmp_path / "cache"))  # new object: all from disk
    assert (stats.hits, stats.misses) == (6, 0)
    assert counting.loaded == [] and counting.encoded_shapes == []
    assert all(torch.equal(again[r], first[r]) for r in requests)

    memory = LatentCache(None)
    fill(requests, Counting(vae), memory)
    counting = Counting(vae)
    again, stats = fill(requests, counting, memory)
    assert (stats.hits, stats.misses) == (6, 0)
    assert counting.loaded == [] and counting.encoded_shapes == []
    assert all(torch.equal(again[r], first[r]) for r in requests)


def test_changed_image_bucket_or_flip_misses(
    tmp_path: Path, images: list[Path], requests: list[LatentRequest]
) -> None:
    vae = tiny_vae()
    cache = LatentCache(tmp_path / "cache")
    fill(requests, Counting(vae), cache)

    write_noise_image(images[1], seed=99)  # same name, new content
    counting = Counting(vae)
    _, stats = fill(requests, counting, cache)
    assert (stats.hits, stats.misses) == (4, 2)
    assert set(counting.loaded) == {
        LatentRequest(images[1], SQUARE, False),
        LatentRequest(images[1], SQUARE, True),
    }

    new_bucket = LatentRequest(images[0], WIDE, False)
    counting = Counting(vae)
    _, stats = fill([*requests, new_bucket], counting, cache)
    assert (stats.hits, stats.misses) == (6, 1) and counting.loaded == [new_bucket]


def test_only_new_flip_misses(tmp_path: Path, images: list[Path]) -> None:
    vae = tiny_vae()
    cache = LatentCache(None)
    plain = [LatentRequest(path, SQUARE, False) for path in images]
    fill(plain, Counting(vae), cache)
    flipped = LatentRequest(images[2], SQUARE, True)
    counting = Counting(vae)
    _, stats = fill([*plain, flipped], counting, cache)
    assert (stats.hits, stats.misses) == (3, 1) and counting.loaded == [flipped]


def test_changed_vae_weight_misses_everything(requests: list[LatentRequest]) -> None:
    cache = LatentCache(None)
    fill(requests, Counting(tiny_vae()), cache)
    changed = tiny_vae()
    with torch.no_grad():
        changed.quant_conv.bias[0] += 0.5
    counting = Counting(changed)
    _, stats = fill(requests, counting, cache)
    assert (stats.hits, stats.misses) == (0, 6)


def test_shared_files_are_hashed_once_and_duplicates_encoded_once(
    tmp_path: Path, images: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    copy = tmp_path / "images" / "copy.png"
    copy.write_bytes(images[0].read_bytes())
    hashed: list[Path] = []
    monkeypatch.setattr(latent_cache, "file_sha256", lambda path: hashed.append(path) or file_sha256(path))
    requests = [LatentRequest(images[0], SQUARE, False), LatentRequest(images[0], SQUARE, True)]
    requests += [LatentRequest(images[0], WIDE, False), LatentRequest(copy, SQUARE, False)]
    counting = Counting(tiny_vae())
    moments, stats = fill(requests + requests, counting, LatentCache(None))
    assert hashed == [images[0], copy]
    assert (stats.hits, stats.misses) == (1, 3)  # the copy is served by its twin's encoding
    assert len(counting.loaded) == 3
    assert torch.equal(moments[requests[3]], moments[requests[0]])


def test_two_buckets_are_encoded_in_separate_batches(images: list[Path]) -> None:
    requests = [LatentRequest(path, SQUARE, False) for path in images]
    requests.insert(1, LatentRequest(images[0], WIDE, False))
    requests.append(LatentRequest(images[1], WIDE, False))
    counting = Counting(tiny_vae())
    moments, _ = fill(requests, counting, LatentCache(None), batch_size=2)
    assert counting.encoded_shapes == [(2, 3, 16, 16), (1, 3, 16, 16), (2, 3, 16, 24)]
    assert moments[requests[1]].shape == (8, 16, 24)
    assert moments[requests[0]].shape == (8, 16, 16)


# ---- disk ----------------------------------------------------------------------------------------------


def test_memory_cache_writes_nothing(
    tmp_path: Path, requests: list[LatentRequest], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    before = sorted(tmp_path.rglob("*"))
    fill(requests, Counting(tiny_vae()), LatentCache(None))
    assert sorted(tmp_path.rglob("*")) == before


def test_disk_cache_writes_one_file_per_key_with_metadata(
    tmp_path: Path, requests: list[LatentRequest]
) -> None:
    vae = tiny_vae()
    folder = tmp_path / "cache"
    moments, _ = fill(requests, Counting(vae), LatentCache(folder))
    keys = {latent_cache_key(file_sha256(r.path), r, "center", module_fingerprint(vae)): r for r in requests}
    assert sorted(p.name for p in folder.iterdir()) == sorted(f"{key}.safetensors" for key in keys)
    for key, request in keys.items():
        with safetensors.safe_open(str(folder / f"{key}.safetensors"), framework="pt") as fh:
            metadata = fh.metadata()
            assert torch.equal(fh.get_tensor("moments"), moments[request])
        assert metadata == {
            "format_version": "1",
            "shape": "[8, 16, 16]",
            "image": str(request.path),
            "bucket": "[16, 16]",
            "flip": str(request.flip),
        }


def test_failed_write_leaves_no_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def half_write(tensors, path, metadata=None):
        Path(path).write_bytes(b"partial")
        raise RuntimeError("killed")

    cache = LatentCache(tmp_path / "cache")
    monkeypatch.setattr(latent_cache.safetensors.torch, "save_file", half_write)
    with pytest.raises(RuntimeError, match="killed"):
        cache.put("k", torch.zeros(8, 2, 2))
    assert list((tmp_path / "cache").iterdir()) == []


def test_truncated_file_is_a_miss_and_is_rewritten(
    tmp_path: Path, requests: list[LatentRequest], caplog: pytest.LogCaptureFixture
) -> None:
    vae = tiny_vae()
    folder = tmp_path / "cache"
    first, _ = fill(requests, Counting(vae), LatentCache(folder))
    victim = requests[2]
    key = latent_cache_key(file_sha256(victim.path), victim, "center", module_fingerprint(vae))
    path = folder / f"{key}.safetensors"
    path.write_bytes(path.read_bytes()[:-10])

    counting = Counting(vae)
    with caplog.at_level(logging.WARNING, logger=latent_cache.__name__):
        again, stats = fill(requests, counting, LatentCache(folder))
    assert (stats.hits, stats.misses) == (5, 1) and counting.loaded == [victim]
    assert str(path) in caplog.text
    torch.testing.assert_close(again[victim], first[victim])
    reread, stats = fill(requests, Counting(vae), LatentCache(folder))
    assert stats.misses == 0 and torch.equal(reread[victim], again[victim])
    assert not any(p.suffix == ".tmp" for p in folder.iterdir())


def test_garbage_file_is_a_miss(tmp_path: Path) -> None:
    (tmp_path / "k.safetensors").write_bytes(b"\xff" * 40)
    assert LatentCache(tmp_path).get("k") is None


def test_unwritable_folder_is_a_user_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(UserError, match="cache_dir") as info:
        LatentCache(blocker / "cache")
    assert str(blocker / "cache") in info.value.messages[0]

    # A folder that becomes unwritable after the up-front check (e.g. a full disk) fails the same way.
    cache = LatentCache(tmp_path / "cache")

    def disk_full(path, write):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(latent_cache, "write_atomic", disk_full)
    with pytest.raises(UserError, match="No space left on device.*cache_dir"):
        cache.put("k", torch.zeros(8, 2, 2))
