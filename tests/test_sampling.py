"""The exactly-once sampler: every sample once per epoch across processes, equal shares, seeded order."""

from __future__ import annotations

import numpy as np
import pytest

from datamodules.sampling import EpochProgress, ExactlyOnceSampler, epoch_order


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


# ------------------------------------------------------------------------------ resuming mid-epoch
def resumed_samplers(num_samples: int, world_size: int, progress: EpochProgress | None) -> list[ExactlyOnceSampler]:
    samplers = [ExactlyOnceSampler(num_samples, world_size, rank, seed=3) for rank in range(world_size)]
    for sampler in samplers:
        if progress is None:
            sampler.set_epoch(2)
        else:
            sampler.resume(progress)
    return samplers


def run_stretches(num_samples: int, stretches: list[tuple[int, int | None]]) -> tuple[list[int], list[int]]:
    """Epoch 2 drawn in stretches of (world size, draws each process takes before the next checkpoint; None: to the
    end), resuming from rank 0's progress as a checkpoint would. Returns the counted sample indices, and the epoch's
    length (in draws per process) on each stretch's processes."""
    counted, lengths, progress, position = [], [], None, 0
    for world_size, stop in stretches:
        samplers = resumed_samplers(num_samples, world_size, progress)
        assert len({len(sampler) for sampler in samplers}) == 1  # every process takes the same steps
        lengths.append(len(samplers[0]))
        stop = len(samplers[0]) if stop is None else position + stop
        for sampler in samplers:
            draws = list(sampler)
            assert len(draws) == len(sampler)
            counted += [draw.index for draw in draws[position:stop] if draw.counted]  # the loader skips `position`
        progress, position = samplers[0].progress(stop), stop
        assert all(sampler.progress(stop) == progress for sampler in samplers)
    return counted, lengths


@pytest.mark.parametrize("num_samples", [34, 96, 7])
@pytest.mark.parametrize(("before", "after"), [(4, 2), (2, 4), (2, 1), (1, 2), (3, 4), (4, 3)])
@pytest.mark.parametrize("drawn", [0, 1, 4, 8, 100])
def test_a_resume_on_another_world_size_draws_every_sample_of_the_epoch_once(num_samples, before, after, drawn):
    drawn = min(drawn, -(-num_samples // before))
    counted, lengths = run_stretches(num_samples, [(before, drawn), (after, None)])
    assert sorted(counted) == list(range(num_samples))
    assert lengths[1] >= -(-num_samples // after)  # never shorter than a fresh epoch on `after` processes


def test_several_changes_of_world_size_within_one_epoch():
    counted, _ = run_stretches(96, [(4, 8), (2, 12), (3, 5), (3, 4), (1, 3), (2, None)])
    assert sorted(counted) == list(range(96))


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_a_resume_on_the_same_world_size_draws_exactly_what_the_epoch_would_have(world_size):
    straight = [list(sampler) for sampler in resumed_samplers(34, world_size, None)]
    progress = resumed_samplers(34, world_size, None)[0].progress(8)
    resumed = resumed_samplers(34, world_size, progress)
    assert [list(sampler) for sampler in resumed] == straight
    assert all(len(sampler) == len(draws) for sampler, draws in zip(resumed, straight, strict=True))


def test_a_resumed_sampler_draws_its_checkpoints_epoch_before_set_epoch():
    """The loader replays its saved position as soon as Lightning builds its iterator, before ``set_epoch``."""
    progress = resumed_samplers(34, 1, None)[0].progress(8)
    assert progress.epoch == 2
    fresh = ExactlyOnceSampler(34, seed=3)
    fresh.resume(EpochProgress.from_state_dict(progress.state_dict()))
    assert list(fresh) == list(resumed_samplers(34, 1, None)[0])
    fresh.set_epoch(3)  # the next epoch starts fresh
    assert [draw.index for draw in fresh] == list(epoch_order([34], 3, 3))


def test_a_checkpoint_of_other_data_is_refused():
    progress = resumed_samplers(34, 2, None)[0].progress(4)
    with pytest.raises(ValueError, match="drew from 34 training samples, but the data now has 35"):
        ExactlyOnceSampler(35, 2, 0).resume(progress)
