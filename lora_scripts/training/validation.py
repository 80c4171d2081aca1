"""The validation loss: the training objective on held-out images, with everything random fixed once, so two
measurements differ only because the LoRA weights did; the best step, and early stopping.

What is fixed, and why:
- latents are the VAE posterior's mean (no sampling noise), each image fitted to its bucket (center crop, no
  flip) and encoded once when the Validator is built; captions are used as written (no shuffle/dropout);
- every image is noised at `timesteps_per_image` timesteps, one drawn in each equal stratum of [0, T) so the
  whole noise range is covered, with its own Gaussian noise; timesteps and noise come from a private
  `torch.Generator` seeded with VALIDATION_SEED, never from the global RNG, so validating does not change
  the training run's random numbers and the same validation images give comparable losses across runs of
  any `seed`;
- the noise is plain Gaussian: noise_offset and multi-resolution noise are training augmentations, and
  their random parts would make the target move between measurements (the loss type and Min-SNR weighting
  of `LossSettings` do apply, so the number is the training objective);
- the denoiser and text encoders run in eval() (LoRA dropout off), then get their own modes back.

The prepared tensors stay on the CPU and move to the device one batch at a time.
"""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from lora_scripts.config import TrainConfig
from lora_scripts.data.buckets import BucketSettings, Size, assign_bucket, image_size
from lora_scripts.data.captions import CaptionedImage
from lora_scripts.data.dataset import load_pixels
from lora_scripts.data.latent_cache import LatentRequest
from lora_scripts.data.size_conditioning import center_size_conditioning
from lora_scripts.data.training_set import TrainingSet, bucket_options, bucket_settings
from lora_scripts.models.family import ModelFamily
from lora_scripts.training.losses import LossSettings
from lora_scripts.training.setup import loss_settings
from lora_scripts.training.step import denoising_loss

log = logging.getLogger(__name__)

# Fixed rather than the run's `seed`: runs with different seeds then measure on the very same noise.
VALIDATION_SEED = 20240601
TIMESTEPS_PER_IMAGE = 4


@dataclass(frozen=True)
class ValidationBatch:
    """Up to batch_size (image, timestep) pairs of one bucket, prepared once, on the CPU.

    latents: fp32 [B, C, h, w], scaled posterior means; captions: B strings, as written; cond: the
    conditioning of `captions` (CPU tensors), or None when it must be encoded at each measurement (trained
    text encoders); noise: fp32 [B, C, h, w]; timesteps: long [B] in [0, T).
    """

    latents: torch.Tensor
    captions: list[str]
    cond: dict[str, torch.Tensor] | None
    noise: torch.Tensor
    timesteps: torch.Tensor
    size_conditioning: torch.Tensor  # long [B, 6]: each image's center crop (data/size_conditioning.py)

    def __len__(self) -> int:
        return self.latents.shape[0]


@dataclass(frozen=True)
class ValidationOutcome:
    """One measurement, and where the run stands after it.

    improved: `loss` is the lowest so far (strictly; the loop saves `-best.safetensors` then);
    since_best: measurements in a row without improvement (0 when improved);
    should_stop: `patience` measurements in a row without improvement (early stopping).
    """

    step: int
    loss: float
    improved: bool
    best_step: int
    best_loss: float
    since_best: int
    should_stop: bool


class Validator:
    """The validation loss of a run (see the module docstring), when to measure it, and the best step.

    images: the validation images (`TrainingSet.validation`), not empty. buckets: the bucket options of
    every dataset (index = `CaptionedImage.subset`), or one for all images. every_n_steps: measure every
    this many steps (None: at the last step only). patience: early-stopping patience in measurements (None:
    never stop). Build it while the VAE and text encoders are still on `device` (before the caches offload
    them), after the LoRA is attached.
    """

    def __init__(
        self,
        family: ModelFamily,
        images: Sequence[CaptionedImage],
        *,
        buckets: BucketSettings | Sequence[BucketSettings],
        settings: LossSettings,
        every_n_steps: int | None,
        patience: int | None,
        device: torch.device | str,
        batch_size: int,
        timesteps_per_image: int = TIMESTEPS_PER_IMAGE,
        seed: int = VALIDATION_SEED,
    ):
        if not images:
            raise ValueError("Validator needs at least one validation image")
        if (every_n_steps is not None and every_n_steps < 1) or (patience is not None and patience < 1):
            raise ValueError(
                f"every_n_steps and patience must be >= 1 or None, got {every_n_steps}, {patience}"
            )
        self.settings = settings
        self.every_n_steps = every_n_steps
        self.patience = patience
        self.device = torch.device(device)
        per_subset = [buckets] if isinstance(buckets, BucketSettings) else list(buckets)
        self.batches = prepare_batches(
            family, images, per_subset, self.device, batch_size, timesteps_per_image, seed
        )
        self.best_step: int | None = None
        self.best_loss = math.inf
        self.since_best = 0
        log.info(
            "validation: %d images x %d timesteps in %d batches",
            len(images),
            timesteps_per_image,
            len(self.batches),
        )

    def due(self, step: int, is_last: bool) -> bool:
        """Whether to measure after optimizer step `step` (1-based): every `every_n_steps`, and the last."""
        return is_last or (self.every_n_steps is not None and step % self.every_n_steps == 0)

    def loss(self, family: ModelFamily) -> float:
        """The mean loss over every (image, timestep) pair, in fp32 summed in float64: the same number for the
        same weights at every call (on the CPU; GPU kernels may differ in the last bits). No gradients, no
        global RNG draw. Every process computes the same number (call it on all of them under DDP)."""
        encode_text = _trains_text_encoder(family)
        total, count = 0.0, 0
        with eval_mode([family.denoiser, *family.text_encoders]), torch.no_grad():
            for batch in self.batches:
                if encode_text or batch.cond is None:
                    cond = family.encode_prompts(batch.captions, self.device)
                else:
                    cond = {key: value.to(self.device) for key, value in batch.cond.items()}
                cond |= family.image_conditioning(batch.size_conditioning.to(self.device))
                loss = denoising_loss(
                    family,
                    batch.latents.to(self.device),
                    cond,
                    batch.noise.to(self.device),
                    batch.timesteps.to(self.device),
                    self.settings,
                )
                total += float(loss) * len(batch)
                count += len(batch)
        return total / count

    def record(self, step: int, loss: float) -> ValidationOutcome:
        """Note the loss measured at `step`: a new best when strictly below all earlier ones (NaN: never)."""
        improved = loss < self.best_loss
        if improved:
            self.best_step, self.best_loss, self.since_best = step, loss, 0
        else:
            self.since_best += 1
        return ValidationOutcome(
            step=step,
            loss=loss,
            improved=improved,
            best_step=step if self.best_step is None else self.best_step,
            best_loss=self.best_loss,
            since_best=self.since_best,
            should_stop=self.patience is not None and self.since_best >= self.patience,
        )

    def state_dict(self) -> dict[str, float | int | None]:
        """The best so far, for a resumed run to carry on from."""
        return {"best_step": self.best_step, "best_loss": self.best_loss, "since_best": self.since_best}

    def load_state_dict(self, state: dict[str, float | int | None]) -> None:
        self.best_step = state["best_step"]  # type: ignore[assignment]
        self.best_loss = float(state["best_loss"])  # type: ignore[arg-type]
        self.since_best = int(state["since_best"])  # type: ignore[arg-type]


def validator_for(
    config: TrainConfig, family: ModelFamily, training_set: TrainingSet, device: torch.device | str
) -> Validator | None:
    """The run's Validator, or None when validation is off (no validation images)."""
    if not training_set.validation:
        return None
    options = bucket_options(config)
    return Validator(
        family,
        training_set.validation,
        buckets=[bucket_settings(d, options) for d in training_set.datasets],
        settings=loss_settings(config),
        every_n_steps=config.validate_every_n_steps,
        patience=config.early_stopping_patience,
        device=device,
        batch_size=config.batch_size,
    )


def prepare_batches(
    family: ModelFamily,
    images: Sequence[CaptionedImage],
    buckets: Sequence[BucketSettings],
    device: torch.device,
    batch_size: int,
    timesteps_per_image: int,
    seed: int,
) -> list[ValidationBatch]:
    """Encode every image once and pair it with its fixed timesteps and noise; batches of one bucket each,
    buckets in (width, height) order, images in the given order."""
    by_bucket: dict[Size, list[CaptionedImage]] = defaultdict(list)
    for item in images:
        settings = buckets[item.subset] if item.subset < len(buckets) else buckets[0]
        by_bucket[assign_bucket(image_size(item.path), settings)].append(item)
    generator = torch.Generator().manual_seed(seed)
    cache_cond = not _trains_text_encoder(family)
    batches: list[ValidationBatch] = []
    for bucket, items in sorted(by_bucket.items()):
        latents = _mean_latents(family, items, bucket, batch_size)
        captions = [item.caption for item in items for _ in range(timesteps_per_image)]
        latents = latents.repeat_interleave(timesteps_per_image, dim=0)  # [n * K, C, h, w], image-major
        sizes = torch.stack([center_size_conditioning(image_size(item.path), bucket) for item in items])
        sizes = sizes.repeat_interleave(timesteps_per_image, dim=0)
        quantiles = stratified_quantiles(len(items), timesteps_per_image, generator)
        timesteps = family.timesteps_at(quantiles, tuple(latents.shape[-2:])).flatten()
        noise = torch.randn(latents.shape, generator=generator, dtype=torch.float32)
        for start in range(0, len(captions), batch_size):
            part = slice(start, start + batch_size)
            cond = None
            if cache_cond:
                with eval_mode(family.text_encoders), torch.no_grad():
                    encoded = family.encode_prompts(captions[part], device)
                cond = {key: value.cpu() for key, value in encoded.items()}
            batches.append(
                ValidationBatch(
                    latents[part], captions[part], cond, noise[part], timesteps[part], sizes[part]
                )
            )
    return batches


def stratified_quantiles(num_images: int, per_image: int, generator: torch.Generator) -> torch.Tensor:
    """float64 [num_images, per_image] in [0, 1): column k uniform in the k-th of `per_image` equal strata,
    e.g. [0, .25), [.25, .5), [.5, .75), [.75, 1) for 4; the family maps them to its timesteps (DDPM with
    T = 1000: [0, 250), [250, 500), …)."""
    u = torch.rand(num_images, per_image, generator=generator, dtype=torch.float64)
    strata = torch.arange(per_image, dtype=torch.float64)
    return (strata + u) / per_image


def _mean_latents(
    family: ModelFamily, items: Sequence[CaptionedImage], bucket: Size, batch_size: int
) -> torch.Tensor:
    """fp32 [n, C, h, w] on the CPU: each image center-cropped to `bucket`, encoded, at its posterior mean."""
    out = []
    for start in range(0, len(items), batch_size):
        pixels = torch.stack(
            [
                load_pixels(LatentRequest(item.path, bucket, False))
                for item in items[start : start + batch_size]
            ]
        )
        with torch.no_grad():
            out.append(family.mean_latents(family.encode_images(pixels)).cpu())
    return torch.cat(out)


@contextmanager
def eval_mode(modules: Sequence[nn.Module]) -> Iterator[None]:
    """Every module in eval() (LoRA's network_dropout and any other dropout off), then each submodule back in
    its own earlier mode (set one by one: `module.train(mode)` would give all of them the parent's)."""
    modes = [(m, m.training) for module in modules for m in module.modules()]
    try:
        for module in modules:
            module.eval()
        yield
    finally:
        for m, mode in modes:
            m.training = mode


def _trains_text_encoder(family: ModelFamily) -> bool:
    """Whether a text encoder has trainable (LoRA) weights, so its conditioning changes as training goes."""
    return any(p.requires_grad for encoder in family.text_encoders for p in encoder.parameters())
