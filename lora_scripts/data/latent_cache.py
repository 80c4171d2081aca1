"""Cache of VAE posterior moments, in memory and optionally on disk, keyed by content.

Encoding every image through the VAE at every step is the biggest waste for small datasets; sd-scripts'
`cache_latents` / `cache_latents_to_disk` (train_util.py, `cache_batch_latents`) removes it. It differs from
sd-scripts in two ways, both deliberate:

- The key is a sha256 over the image *bytes*, the bucket, the flip, the crop and the VAE's fingerprint.
  sd-scripts names its `.npz` after the image file only, so an edited image, another bucket resolution or
  another VAE silently reuse stale latents (it only checks the stored size).
- We store the posterior moments (`vae.encode(x).latent_dist.parameters`: mean and logvar concatenated on the
  channel axis, unscaled), not a frozen sample, so the family samples fresh latents at each step and a cached
  run draws the same random numbers as an uncached one. sd-scripts caches `latent_dist.sample()` once.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import safetensors
import safetensors.torch
import torch
from tqdm.auto import tqdm

from lora_scripts.errors import UserError
from lora_scripts.export.atomic import write_atomic

logger = logging.getLogger(__name__)

Size = tuple[int, int]  # (width, height) in pixels

# Bump when anything that changes the cached values changes (key layout, resizing, file layout): old files
# then simply stop matching and are re-encoded.
CACHE_FORMAT_VERSION = 1
_TENSOR_NAME = "moments"
_HASH_CHUNK = 1024 * 1024
# Config entries that describe where/how a model was saved rather than what it computes: diffusers'
# `_use_default_values` differs between a constructed and a loaded model, transformers writes its version.
_CONFIG_METADATA_KEYS = frozenset({"transformers_version", "architectures"})


@dataclass(frozen=True)
class LatentRequest:
    """One image as the trainer will see it.

    path: the image file. bucket: the (width, height) it is resized and center-cropped to. flip: the
    horizontally mirrored copy (flip_aug caches both).
    """

    path: Path
    bucket: Size
    flip: bool


@dataclass(frozen=True)
class CacheStats:
    """hits: requests served without encoding; misses: images encoded (one per distinct key)."""

    hits: int
    misses: int


def file_sha256(path: Path) -> str:
    """Hex sha256 of the file's bytes, read in 1 MiB chunks (images can be large)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(_HASH_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def module_fingerprint(module: torch.nn.Module) -> str:
    """Hex sha256 identifying what `module` computes: its config and all its parameters.

    Hashes the config (if the module has `.config`, as JSON with sorted keys, save-time metadata such as
    `_name_or_path` left out) and every parameter's name, dtype, shape and values (converted to fp32 on CPU,
    so the same weights on any device hash alike; the dtype is hashed separately since an fp16 VAE encodes
    differently). The same weights always give the same string, one changed weight a different one.
    Cost: one pass over the weights (~0.3 s for SD's 84 M-parameter VAE).
    """
    digest = hashlib.sha256()
    config = getattr(module, "config", None)
    if config is not None:
        digest.update(_config_json(config).encode("utf-8"))
    for name, param in module.named_parameters():
        digest.update(f"\n{name}|{param.dtype}|{tuple(param.shape)}\n".encode())
        values = param.detach().to(device="cpu", dtype=torch.float32).contiguous()
        digest.update(memoryview(values.numpy()).cast("B"))
    return digest.hexdigest()


def _config_json(config: object) -> str:
    """A diffusers FrozenDict or transformers PretrainedConfig as canonical JSON."""
    items = config.to_dict() if hasattr(config, "to_dict") else dict(config)  # type: ignore[call-overload]
    kept = {k: v for k, v in items.items() if not k.startswith("_") and k not in _CONFIG_METADATA_KEYS}
    return json.dumps(kept, sort_keys=True, default=str)


def latent_cache_key(image_sha256: str, request: LatentRequest, crop: str, vae_id: str) -> str:
    """Hex sha256 of a versioned description of everything the moments depend on.

    The path is not part of the key: two files with the same bytes give the same moments. `crop` is
    "center"; random crops change every epoch, so they are never cached (ValueError).
    """
    if crop == "random":
        raise ValueError("random crops change every epoch and cannot be cached; use crop='center'")
    description = {
        "format": CACHE_FORMAT_VERSION,
        "image_sha256": image_sha256,
        "bucket": list(request.bucket),
        "flip": request.flip,
        "crop": crop,
        "vae": vae_id,
    }
    return hashlib.sha256(json.dumps(description, sort_keys=True).encode("utf-8")).hexdigest()


class LatentCache:
    """Moments by key, in memory, and in `folder` as `<key>.safetensors` when folder is not None.

    Each entry is float32 [2*C, h, w] on CPU (one image, no batch axis). The folder is created and checked
    for writing up front, so an unwritable `cache_dir` fails before any encoding.
    """

    def __init__(self, folder: Path | None):
        self.folder = Path(folder) if folder is not None else None
        self._memory: dict[str, torch.Tensor] = {}
        if self.folder is not None:
            self._check_writable(self.folder)

    def __len__(self) -> int:
        return len(self._memory)

    def path_for(self, key: str) -> Path | None:
        """The disk file of `key` (None for a memory-only cache)."""
        return None if self.folder is None else self.folder / f"{key}.safetensors"

    def get(self, key: str) -> torch.Tensor | None:
        """The moments of `key`, from memory, else from disk (then kept in memory), else None.

        A disk file that cannot be read (truncated, corrupt, old format) counts as missing: a warning is
        logged and the next `put` overwrites it.
        """
        if key in self._memory:
            return self._memory[key]
        path = self.path_for(key)
        if path is None or not path.is_file():
            return None
        moments = _read_moments(path)
        if moments is not None:
            self._memory[key] = moments
        return moments

    def put(self, key: str, moments: torch.Tensor, *, request: LatentRequest | None = None) -> None:
        """Store a CPU fp32 copy of `moments` ([2*C, h, w]); on disk too, written atomically.

        `request`, when given, is recorded in the file's metadata for humans reading the cache folder.
        """
        # copy=True: a slice of an encoder batch must not keep the whole batch alive.
        stored = moments.detach().to(device="cpu", dtype=torch.float32, copy=True).contiguous()
        self._memory[key] = stored
        path = self.path_for(key)
        if path is None:
            return
        metadata = {"format_version": str(CACHE_FORMAT_VERSION), "shape": json.dumps(list(stored.shape))}
        if request is not None:
            metadata["image"] = str(request.path)
            metadata["bucket"] = json.dumps(list(request.bucket))
            metadata["flip"] = str(request.flip)
        try:
            write_atomic(
                path, lambda tmp: safetensors.torch.save_file({_TENSOR_NAME: stored}, tmp, metadata=metadata)
            )
        except OSError as err:
            raise UserError(_unwritable_message(path.parent, err)) from err

    @staticmethod
    def _check_writable(folder: Path) -> None:
        try:
            folder.mkdir(parents=True, exist_ok=True)
            # Probe with a real file: os.access is wrong on read-only mounts, ACLs and for root.
            with tempfile.TemporaryFile(dir=folder):
                pass
        except OSError as err:
            raise UserError(_unwritable_message(folder, err)) from err


def _unwritable_message(folder: Path, err: OSError) -> str:
    reason = err.strerror or type(err).__name__
    return f"latent cache folder {folder} cannot be written ({reason}); set cache_dir to a writable folder."


def _read_moments(path: Path) -> torch.Tensor | None:
    """The moments stored in `path`, or None (with a warning) when the file is unusable."""
    try:
        with safetensors.safe_open(str(path), framework="pt", device="cpu") as fh:
            metadata = fh.metadata() or {}
            moments = fh.get_tensor(_TENSOR_NAME)
    except Exception as err:  # safetensors raises its own error type, OSError or KeyError here
        logger.warning("latent cache file %s is unreadable (%s); encoding the image again", path, err)
        return None
    expected = {"format_version": str(CACHE_FORMAT_VERSION), "shape": json.dumps(list(moments.shape))}
    if any(metadata.get(name) != value for name, value in expected.items()):
        logger.warning("latent cache file %s has another format or shape; encoding the image again", path)
        return None
    return moments


def fill_latent_cache(
    requests: Sequence[LatentRequest],
    *,
    load_pixels: Callable[[LatentRequest], torch.Tensor],
    encode: Callable[[torch.Tensor], torch.Tensor],
    cache: LatentCache,
    vae_id: str,
    crop: str = "center",
    batch_size: int = 4,
    disable_progress: bool = False,
) -> tuple[dict[LatentRequest, torch.Tensor], CacheStats]:
    """Make sure every request's moments are cached, encoding only the missing ones.

    load_pixels: request -> float32 [3, H, W] in [-1, 1], (W, H) == request.bucket.
    encode: float32 [B, 3, H, W] -> moments [B, 2*C, H/8, W/8]; called under torch.no_grad(), on batches
    of at most `batch_size` images of one bucket (a batch needs one shape).
    vae_id: `module_fingerprint(vae)` (plus anything else that changes the encoding).

    Returns ({request: float32 [2*C, h, w] on CPU}, stats). Identical files are encoded once.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    unique = list(dict.fromkeys(requests))
    keys = _request_keys(unique, crop, vae_id)

    found: dict[str, torch.Tensor] = {}
    missing: dict[str, LatentRequest] = {}  # key -> the first request needing it
    for request in unique:
        key = keys[request]
        if key in found or key in missing:
            continue
        moments = cache.get(key)
        if moments is None:
            missing[key] = request
        else:
            found[key] = moments

    if missing:
        found.update(_encode_missing(missing, load_pixels, encode, cache, batch_size, disable_progress))
    stats = CacheStats(hits=len(unique) - len(missing), misses=len(missing))
    logger.info("latent cache: %d hits, %d misses (encoded)", stats.hits, stats.misses)
    return {request: found[keys[request]] for request in unique}, stats


def _request_keys(requests: Sequence[LatentRequest], crop: str, vae_id: str) -> dict[LatentRequest, str]:
    """Cache key of each request, hashing each distinct image file once."""
    file_hashes: dict[Path, str] = {}
    keys: dict[LatentRequest, str] = {}
    for request in requests:
        if request.path not in file_hashes:
            try:
                file_hashes[request.path] = file_sha256(request.path)
            except OSError as err:
                raise UserError(
                    f"image {request.path} cannot be read ({err.strerror or err}); restore it or remove it "
                    "from the dataset."
                ) from err
        keys[request] = latent_cache_key(file_hashes[request.path], request, crop, vae_id)
    return keys


def _encode_missing(
    missing: dict[str, LatentRequest],
    load_pixels: Callable[[LatentRequest], torch.Tensor],
    encode: Callable[[torch.Tensor], torch.Tensor],
    cache: LatentCache,
    batch_size: int,
    disable_progress: bool,
) -> dict[str, torch.Tensor]:
    """Encode the missing keys bucket by bucket, `batch_size` images at a time, and put them in `cache`.

    Returns {key: the stored CPU fp32 moments}.
    """
    encoded: dict[str, torch.Tensor] = {}
    by_bucket: dict[Size, list[tuple[str, LatentRequest]]] = {}
    for key, request in missing.items():
        by_bucket.setdefault(request.bucket, []).append((key, request))
    with tqdm(total=len(missing), desc="caching latents", unit="image", disable=disable_progress) as bar:
        for entries in by_bucket.values():
            for start in range(0, len(entries), batch_size):
                batch = entries[start : start + batch_size]
                pixels = torch.stack([_checked_pixels(load_pixels(request), request) for _, request in batch])
                with torch.no_grad():
                    moments = encode(pixels)
                if moments.shape[0] != len(batch):
                    raise ValueError(f"encode returned {moments.shape[0]} moments for {len(batch)} images")
                for (key, request), one in zip(batch, moments, strict=True):
                    cache.put(key, one, request=request)
                    encoded[key] = cache.get(key)  # the stored copy (never None right after put)
                bar.update(len(batch))
    return encoded


def _checked_pixels(pixels: torch.Tensor, request: LatentRequest) -> torch.Tensor:
    """`pixels` if it is [3, H, W] with (W, H) == request.bucket; a ValueError names the mismatch."""
    width, height = request.bucket
    if tuple(pixels.shape) != (3, height, width):
        raise ValueError(
            f"load_pixels returned shape {tuple(pixels.shape)} for {request.path}, "
            f"expected (3, {height}, {width})"
        )
    return pixels
