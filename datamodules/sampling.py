"""Which sample each process draws, and in which order: every sample exactly once per epoch, across all processes.

torch's DistributedSampler evens out an uneven split by repeating samples that then train like any other. Here
the repeats that give every process the same number of batches (so DDP never waits on a step another process
lacks) are drawn with ``counted=False`` and carry zero loss weight, so each sample contributes exactly once.
The order depends on (seed, epoch) alone: torchdata's StatefulDataLoader resumes mid-epoch by replaying the
sampler up to its saved position, which is exact only for such a sampler.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

import numpy as np
from torch.utils.data import Dataset, Sampler


class Draw(NamedTuple):
    """One sampled position: the dataset index, and whether it counts (False for an evening-out repeat)."""

    index: int
    counted: bool


def epoch_order(block_sizes: Sequence[int], seed: int, epoch: int, blocks_per_window: int = 1) -> np.ndarray:
    """All indices of an epoch: blocks (shards) in a seeded random order, shuffled within windows of blocks.

    Index i belongs to the block containing it when blocks are laid end to end. Shuffling inside a window of a
    few consecutive blocks, rather than globally, keeps reads local to the shards being streamed.
    """
    rng = np.random.default_rng([seed, epoch])
    starts = np.concatenate([[0], np.cumsum(block_sizes)[:-1]]).astype(np.int64)
    block_order = rng.permutation(len(block_sizes))
    order = []
    for first in range(0, len(block_order), blocks_per_window):
        window = block_order[first : first + blocks_per_window]
        indices = np.concatenate([np.arange(starts[b], starts[b] + block_sizes[b]) for b in window])
        order.append(rng.permutation(indices))
    return np.concatenate(order) if order else np.zeros(0, dtype=np.int64)


class ExactlyOnceSampler(Sampler[Draw]):
    """This process's contiguous slice of the epoch order, evened out to ceil(N / num_replicas) draws.

    Lightning calls ``set_epoch`` at the start of every epoch. With ``shuffle=False`` the order is the
    dataset order (evaluation). ``block_sizes`` are the shard sizes for shard-local shuffling; a single block
    (the default) shuffles globally.
    """

    def __init__(
        self,
        num_samples: int,
        num_replicas: int = 1,
        rank: int = 0,
        seed: int = 0,
        shuffle: bool = True,
        block_sizes: Sequence[int] | None = None,
        blocks_per_window: int = 1,
    ) -> None:
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is outside [0, {num_replicas})")
        if num_samples <= 0:
            raise ValueError("the dataset is empty: nothing to sample")
        self.block_sizes = list(block_sizes) if block_sizes is not None else [num_samples]
        if sum(self.block_sizes) != num_samples:
            raise ValueError(f"block sizes sum to {sum(self.block_sizes)}, but the dataset has {num_samples}")
        self.num_samples, self.num_replicas, self.rank = num_samples, num_replicas, rank
        self.seed, self.shuffle, self.blocks_per_window = seed, shuffle, blocks_per_window
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return math.ceil(self.num_samples / self.num_replicas)

    def __iter__(self) -> Iterator[Draw]:
        if self.shuffle:
            order = epoch_order(self.block_sizes, self.seed, self.epoch, self.blocks_per_window)
        else:
            order = np.arange(self.num_samples)
        per_replica = len(self)
        mine = order[self.rank * per_replica : (self.rank + 1) * per_replica]
        for index in mine:
            yield Draw(int(index), True)
        # Evening out: repeat this slice (or, if empty, the epoch's first samples) without counting them.
        filler = mine if len(mine) else order
        for position in range(per_replica - len(mine)):
            yield Draw(int(filler[position % len(filler)]), False)


class DrawnDataset(Dataset):
    """Wraps a map-style dataset for an ExactlyOnceSampler: looks up ``draw.index`` and adds its loss weight."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, draw: Draw) -> Any:
        sample = self.dataset[draw.index]
        if isinstance(sample, dict):  # else the dataset's SkippedSample, passed on to be counted
            sample["loss_weight"] = 1.0 if draw.counted else 0.0
        return sample
