"""BucketBatchSampler: coverage, single-bucket batches, length, seeding, epochs, sharding by accelerate."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from accelerate.data_loader import BatchSamplerShard

from lora_scripts.data.batching import BucketBatchSampler

A, B, C = (512, 512), (576, 448), (448, 576)
# 5 in A, 3 in B, 1 in C, interleaved as a dataset would list them.
BUCKETS = [A, B, A, A, C, B, A, B, A]


def assert_valid_epoch(batches: list[list[int]], buckets: list[tuple[int, int]], batch_size: int) -> None:
    flat = [index for batch in batches for index in batch]
    assert sorted(flat) == list(range(len(buckets)))  # every index exactly once
    for batch in batches:
        assert 1 <= len(batch) <= batch_size
        assert len({buckets[i] for i in batch}) == 1, batch  # one bucket per batch
    # Only the last batch of a bucket may be short: at most one short batch per bucket.
    short = Counter(buckets[batch[0]] for batch in batches if len(batch) < batch_size)
    assert all(count == 1 for count in short.values())


def test_unshuffled_order_is_sorted_buckets_then_indices() -> None:
    sampler = BucketBatchSampler(BUCKETS, 2, seed=0, shuffle=False)
    # Sorted buckets: (448, 576) < (512, 512) < (576, 448).
    assert list(sampler) == [[4], [0, 2], [3, 6], [8], [1, 5], [7]]
    assert len(sampler) == 1 + 3 + 2


def test_len_is_sum_of_ceil_per_bucket() -> None:
    assert len(BucketBatchSampler([A] * 5 + [B] * 3, 2, seed=0)) == 3 + 2
    assert len(BucketBatchSampler(BUCKETS, 4, seed=0)) == 2 + 1 + 1
    assert len(BucketBatchSampler(BUCKETS, 1, seed=0)) == 9
    assert len(BucketBatchSampler([], 3, seed=0)) == 0


@pytest.mark.parametrize("batch_size", [1, 2, 3, 4, 16])
def test_every_epoch_covers_each_index_once_in_single_bucket_batches(batch_size: int) -> None:
    buckets = [A] * 17 + [B] * 6 + [C] * 2 + [A] * 3
    sampler = BucketBatchSampler(buckets, batch_size, seed=5)
    for _ in range(4):
        batches = list(sampler)
        assert len(batches) == len(sampler)
        assert_valid_epoch(batches, buckets, batch_size)


def test_same_seed_agrees_epochs_differ_and_seeds_differ() -> None:
    buckets = [A] * 20 + [B] * 20
    first, second = BucketBatchSampler(buckets, 3, seed=42), BucketBatchSampler(buckets, 3, seed=42)
    epochs_first = [list(first) for _ in range(3)]
    epochs_second = [list(second) for _ in range(3)]
    assert epochs_first == epochs_second  # what every process of a multi-GPU run computes
    assert epochs_first[0] != epochs_first[1] != epochs_first[2] != epochs_first[0]
    assert list(BucketBatchSampler(buckets, 3, seed=43)) != epochs_first[0]
    # Shuffled within buckets and across batches, not just the batch order.
    assert sorted(map(sorted, epochs_first[0])) != sorted(map(sorted, epochs_first[1]))


def test_set_epoch_reproduces_and_continues() -> None:
    buckets = [A] * 10 + [B] * 7
    plain = BucketBatchSampler(buckets, 2, seed=7)
    epochs = [list(plain) for _ in range(4)]

    resumed = BucketBatchSampler(buckets, 2, seed=7)
    resumed.set_epoch(2)
    assert list(resumed) == epochs[2]
    assert list(resumed) == epochs[3]  # advances from the set epoch
    resumed.set_epoch(0)
    assert list(resumed) == epochs[0]
    assert resumed.batches(1) == epochs[1]


def test_dataloader_uses_it_as_batch_sampler() -> None:
    dataset = torch.arange(len(BUCKETS)) * 10
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=BucketBatchSampler(BUCKETS, 2, seed=0))
    batches = [batch.tolist() for batch in loader]
    assert len(loader) == 6 == len(batches)
    assert sorted(value for batch in batches for value in batch) == [i * 10 for i in range(len(BUCKETS))]


def test_accelerate_shards_cover_the_epoch_with_short_batches() -> None:
    # accelerate deals batches round-robin to processes; a `batch_size` attribute would make it hold back
    # rounds containing a short batch, and bucket batches have several.
    buckets = [A] * 7 + [B] * 5 + [C] * 3
    num_processes = 2
    shards = [
        list(BatchSamplerShard(BucketBatchSampler(buckets, 2, seed=3), num_processes, rank))
        for rank in range(num_processes)
    ]
    expected = BucketBatchSampler(buckets, 2, seed=3).batches(0)  # 4 + 3 + 2 = 9 batches
    assert len(shards[0]) == len(shards[1]) == 5  # 9 batches, padded to 10 by repeating the first
    dealt = [shards[rank][i] for i in range(5) for rank in range(num_processes)]
    assert dealt[:9] == expected
    assert dealt[9] == expected[0]
    for batch in dealt:
        assert len({buckets[i] for i in batch}) == 1


def test_bad_arguments_raise() -> None:
    with pytest.raises(ValueError, match="batch_size"):
        BucketBatchSampler(BUCKETS, 0, seed=0)
    with pytest.raises(ValueError, match="seed"):
        BucketBatchSampler(BUCKETS, 2, seed=-1)
    with pytest.raises(ValueError, match="epoch"):
        BucketBatchSampler(BUCKETS, 2, seed=0).set_epoch(-1)
