"""Batches that never mix buckets: a batch sampler for aspect-ratio bucketing.

A batch stacks latents, so all its images must share one size. sd-scripts does this inside its dataset
(`BaseDataset.make_buckets` / `shuffle_buckets` in library/train_util.py, with the global `random`
module); here it is a torch batch sampler whose order depends only on (seed, epoch), so that every process
of a multi-GPU run computes the same batch list and accelerate can deal it out.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Sampler

from lora_scripts.data.buckets import Size, batches_per_epoch


class BucketBatchSampler(Sampler[list[int]]):
    """Batches of dataset indices, every batch within one bucket (batch_size, last batch per bucket partial).

    sample_buckets: `sample_buckets[i]` is the (width, height) bucket of dataset index i; each repeat of an
        image is its own index.
    batch_size: the most indices per batch. Each bucket ends in a partial batch unless its count divides
        evenly; nothing is dropped, so every index appears exactly once per epoch.
    seed, shuffle: each epoch the indices are shuffled within their bucket, cut into batches, and the order
        of all batches is shuffled, with a torch.Generator seeded from (seed, epoch) only. shuffle=False gives
        the buckets in sorted order and the indices in order (for `check` and tests).

    Epochs: each `__iter__` uses the current epoch and then advances it by one, so a plain loop over epochs
    gets a new order every time; `set_epoch(e)` makes the next `__iter__` use epoch e (a resumed run, or
    accelerate, which calls it on every pass of a single-process DataLoader).

    The batch size is deliberately not exposed as a `batch_size` attribute: accelerate's `BatchSamplerShard`
    treats a batch sampler that has one as fixed-size and holds back whole rounds that contain a short batch,
    which bucket batches are; without it, it deals out batches of any length.
    """

    def __init__(self, sample_buckets: Sequence[Size], batch_size: int, *, seed: int, shuffle: bool = True):
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if seed < 0:
            raise ValueError(f"seed must be non-negative, got {seed}")
        self.max_batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self._epoch = 0
        # Indices grouped by bucket, buckets in sorted (width, height) order, indices ascending.
        groups: dict[Size, list[int]] = {}
        for index, bucket in enumerate(sample_buckets):
            groups.setdefault((int(bucket[0]), int(bucket[1])), []).append(index)
        self._groups: list[list[int]] = [groups[bucket] for bucket in sorted(groups)]
        self._length = batches_per_epoch({bucket: len(group) for bucket, group in groups.items()}, batch_size)

    def __len__(self) -> int:
        """Batches per epoch: the sum over buckets of ceil(count / batch_size)."""
        return self._length

    def set_epoch(self, epoch: int) -> None:
        """Make the next `__iter__` yield the batches of `epoch` (later ones continue from there)."""
        if epoch < 0:
            raise ValueError(f"epoch must be non-negative, got {epoch}")
        self._epoch = epoch

    def __iter__(self) -> Iterator[list[int]]:
        epoch = self._epoch
        self._epoch = epoch + 1
        return iter(self.batches(epoch))

    def batches(self, epoch: int) -> list[list[int]]:
        """The whole batch list of `epoch`, without touching the epoch counter."""
        if not self.shuffle:
            return [batch for group in self._groups for batch in self._cut(group)]
        generator = torch.Generator().manual_seed(_epoch_seed(self.seed, epoch))
        batches: list[list[int]] = []
        for group in self._groups:
            order = torch.randperm(len(group), generator=generator).tolist()
            batches.extend(self._cut([group[i] for i in order]))
        order = torch.randperm(len(batches), generator=generator).tolist()
        return [batches[i] for i in order]

    def _cut(self, indices: list[int]) -> list[list[int]]:
        size = self.max_batch_size
        return [indices[start : start + size] for start in range(0, len(indices), size)]


def _epoch_seed(seed: int, epoch: int) -> int:
    """One 64-bit generator seed from (seed, epoch).

    numpy's SeedSequence mixes the pair with a documented hash that is the same on every platform and Python
    version, so neighbouring seeds or epochs give unrelated orders (seed + epoch would make seed 1 epoch 0
    repeat seed 0 epoch 1).
    """
    state = np.random.SeedSequence([seed, epoch]).generate_state(2, dtype=np.uint32)
    return int(state[0]) | (int(state[1]) << 32)
