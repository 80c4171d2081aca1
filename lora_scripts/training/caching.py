"""Before the first step: encode what can be encoded once (latents, captions) and move the encoders off the
GPU. The caches themselves live in `lora_scripts.data`; this decides what to cache and where."""

from __future__ import annotations

import logging
import random
from collections import defaultdict
from pathlib import Path

import torch
from accelerate import Accelerator

from lora_scripts.config.datasets import DatasetSettings
from lora_scripts.data.caption_ops import process_caption
from lora_scripts.data.dataset import load_pixels
from lora_scripts.data.latent_cache import LatentCache, LatentRequest, fill_latent_cache, module_fingerprint
from lora_scripts.data.text_cache import TextEncoderCache
from lora_scripts.data.training_set import TrainingSet
from lora_scripts.models.family import ModelFamily

log = logging.getLogger(__name__)

CACHE_FOLDER_NAME = ".lora_scripts_cache"  # hidden: find_images skips it, so it is never trained on


def latent_requests(training_set: TrainingSet) -> list[LatentRequest]:
    """Every (image, bucket, flip) a run can draw: both flips of images whose dataset has flip_aug."""
    flips = [d.flip_aug for d in training_set.datasets]
    requests = {
        LatentRequest(s.image.path, s.bucket, flip)
        for s in training_set.samples
        for flip in ((False, True) if flips[s.image.subset] else (False,))
    }
    return sorted(requests, key=lambda r: (str(r.path), r.bucket, r.flip))


def cache_folder(dataset: DatasetSettings, cache_dir: Path | None) -> Path:
    return cache_dir if cache_dir is not None else dataset.train_data_dir / CACHE_FOLDER_NAME


def cache_latents(
    family: ModelFamily,
    training_set: TrainingSet,
    accelerator: Accelerator,
    *,
    to_disk: bool,
    cache_dir: Path | None,
    batch_size: int,
    offload: bool = True,
) -> dict[LatentRequest, torch.Tensor]:
    """The VAE moments of every request, from the cache or encoded now; then, with `offload`, the VAE leaves
    the GPU (keep it when sample images will be drawn during training).

    With `to_disk`, the main process encodes and writes first and the others then read its files (one
    encoding per image however many GPUs); in memory, every process encodes what it needs.
    """
    vae = family.image_encoder
    vae_id = module_fingerprint(vae)
    by_folder: dict[Path | None, list[LatentRequest]] = defaultdict(list)
    folder_of = {
        s.image.path: cache_folder(training_set.datasets[s.image.subset], cache_dir) if to_disk else None
        for s in training_set.samples
    }
    for request in latent_requests(training_set):
        by_folder[folder_of[request.path]].append(request)

    def fill() -> dict[LatentRequest, torch.Tensor]:
        out: dict[LatentRequest, torch.Tensor] = {}
        for folder, requests in by_folder.items():
            moments, stats = fill_latent_cache(
                requests,
                load_pixels=load_pixels,
                encode=family.encode_images,
                cache=LatentCache(folder),
                vae_id=vae_id,
                batch_size=batch_size,
                disable_progress=not accelerator.is_main_process,
            )
            out.update(moments)
            if folder is not None:
                log.info("Latent cache %s: %d reused, %d encoded", folder, stats.hits, stats.misses)
        return out

    if to_disk:
        with accelerator.main_process_first():
            latents = fill()
    else:
        latents = fill()
    if offload:
        vae.to("cpu")  # not needed again: free its GPU memory for larger batches
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return latents


def cache_text_encoder_outputs(
    family: ModelFamily,
    training_set: TrainingSet,
    device: torch.device,
    batch_size: int,
    offload: bool = True,
) -> TextEncoderCache:
    """Conditioning of every caption a run can draw (static captions only: the config refuses the rest);
    then, with `offload`, the text encoders leave the GPU."""
    options = training_set.caption_options()
    rng = random.Random(0)  # static options never draw from it
    captions = sorted(
        {process_caption(s.image.caption, options[s.image.subset], rng) for s in training_set.samples}
    )
    with torch.no_grad():
        cache = TextEncoderCache.build(
            captions, lambda batch: family.encode_prompts(batch, device), batch_size=batch_size
        )
    if offload:
        for encoder in family.text_encoders:
            encoder.to("cpu")
    return cache
