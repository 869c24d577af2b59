"""The exactly-once sampler: every sample once per epoch across processes, equal shares, seeded order."""

from __future__ import annotations

import numpy as np
import pytest

from datamodules.sampling import ExactlyOnceSampler, epoch_order


@pytest.mark.parametrize(("num_samples", "world_size"), [(10, 1), (10, 3), (11, 2), (7, 4), (2, 3)])
def test_every_sample_is_counted_exactly_once_and_shares_are_equal(num_samples, world_size):
    draws = [list(ExactlyOnceSampler(num_samples, world_size, rank, seed=3)) for rank in range(world_size)]
    counted = sorted(draw.index for share in draws for draw in share if draw.counted)
    assert counted == list(range(num_samples))
    assert {len(share) for share in draws} == {-(-num_samples // world_size)}
    uncounted = sum(not draw.counted for share in draws for draw in share)
    assert uncounted == world_size * -(-num_samples // world_size) - num_samples


def test_order_depends_on_seed_and_epoch_only():
    sampler = ExactlyOnceSampler(50, seed=1)
    first = [draw.index for draw in sampler]
    assert [draw.index for draw in ExactlyOnceSampler(50, seed=1)] == first
    sampler.set_epoch(1)
    assert [draw.index for draw in sampler] != first
    assert [draw.index for draw in ExactlyOnceSampler(50, seed=2)] != first


@pytest.mark.parametrize("per_window", [1, 2])
def test_shard_local_shuffling_mixes_each_shard_with_its_window_only(per_window):
    sizes = [5, 7, 6, 4, 8]
    shard_of = np.repeat(np.arange(len(sizes)), sizes)
    order = epoch_order(sizes, seed=0, epoch=0, blocks_per_window=per_window)
    assert sorted(order) == list(range(sum(sizes)))
    read_shards = shard_of[order]
    for shard in range(len(sizes)):
        positions = np.flatnonzero(read_shards == shard)
        assert len(set(read_shards[positions.min() : positions.max() + 1])) <= per_window
    assert not np.array_equal(order, np.sort(order))


def test_a_rank_outside_the_world_is_refused():
    with pytest.raises(ValueError, match="rank 2"):
        ExactlyOnceSampler(10, num_replicas=2, rank=2)
