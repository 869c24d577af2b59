"""Which sample each process draws, and in which order: every sample exactly once per epoch, across all processes.

torch's DistributedSampler evens out an uneven split by repeating samples that then train like any other. Here
the repeats that give every process the same number of batches (so DDP never waits on a step another process
lacks) are drawn with ``counted=False`` and carry zero loss weight, so each sample contributes exactly once.
The order depends on (seed, epoch) alone: torchdata's StatefulDataLoader resumes mid-epoch by replaying the
sampler up to its saved position, which is exact only for such a sampler.

That position is rank 0's count of draws, which means nothing to a process whose share of the epoch changed. So a
run resumed mid-epoch on another number of processes continues from an ``EpochProgress`` (kept in the datamodule's
checkpoint state): the samples every process of each earlier stretch of the epoch had not drawn yet are split anew,
and each sample still trains exactly once per epoch. On the same number of processes nothing changes.
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


class EpochProgress(NamedTuple):
    """How far one epoch's draws got: per stretch with a fixed number of processes, oldest first, that number and
    the draws each of them took (evening-out repeats included). The last stretch is the one a checkpoint cut."""

    epoch: int
    num_samples: int
    stretches: tuple[tuple[int, int], ...]

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "num_samples": self.num_samples, "stretches": [list(s) for s in self.stretches]}

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> EpochProgress:
        stretches = tuple((int(replicas), int(drawn)) for replicas, drawn in state["stretches"])
        return cls(int(state["epoch"]), int(state["num_samples"]), stretches)


def undrawn(order: np.ndarray, num_replicas: int, drawn: int) -> np.ndarray:
    """What is left of ``order`` once each of ``num_replicas`` processes drew the first ``drawn`` positions of its
    contiguous share (positions past a share's end are evening-out repeats and take nothing), in order."""
    share = math.ceil(len(order) / num_replicas)
    starts = [rank * share + min(drawn, share) for rank in range(num_replicas)]
    return np.concatenate([order[start : (rank + 1) * share] for rank, start in enumerate(starts)])


class EpochLayout(NamedTuple):
    """One process's draws of an epoch: ``replayed`` positions drawn before the current stretch (the loader's saved
    position skips them), then its contiguous share of the samples left, evened out to ``length`` draws."""

    replayed: int
    share: np.ndarray
    length: int
    order: np.ndarray


class ExactlyOnceSampler(Sampler[Draw]):
    """This process's contiguous slice of the epoch order, evened out to ceil(N / num_replicas) draws.

    Lightning calls ``set_epoch`` at the start of every epoch. With ``shuffle=False`` the order is the
    dataset order (evaluation). ``block_sizes`` are the shard sizes for shard-local shuffling; a single block
    (the default) shuffles globally.

    ``resume`` continues an epoch that a checkpoint cut (see the module docstring). After a change of world size the
    resumed epoch keeps at least a fresh epoch's length, the samples left first and evening-out repeats after them:
    Lightning fixes the number of batches of every epoch of a fit from the first one it sees.
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
        self.resumed: EpochProgress | None = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def resume(self, progress: EpochProgress) -> None:
        """Continue ``progress.epoch`` on this sampler's processes (the epoch is set now: the loader replays its
        saved position before Lightning's ``set_epoch``)."""
        if progress.num_samples != self.num_samples:
            raise ValueError(
                f"the checkpoint's epoch {progress.epoch} drew from {progress.num_samples} training samples, but the "
                f"data now has {self.num_samples}: resume with the data the run was started on"
            )
        self.resumed, self.epoch = progress, progress.epoch

    def _closed_stretches(self) -> tuple[tuple[int, int], ...]:
        """The earlier stretches of this epoch; the last saved one goes on when the number of processes is the same."""
        if self.resumed is None or self.resumed.epoch != self.epoch:
            return ()
        stretches = self.resumed.stretches
        return stretches[:-1] if stretches and stretches[-1][0] == self.num_replicas else stretches

    def layout(self) -> EpochLayout:
        if self.shuffle:
            order = epoch_order(self.block_sizes, self.seed, self.epoch, self.blocks_per_window)
        else:
            order = np.arange(self.num_samples)
        left = order
        for replicas, drawn in self._closed_stretches():
            left = undrawn(left, replicas, drawn)
        replayed = sum(drawn for _, drawn in self._closed_stretches())
        per_replica = math.ceil(len(left) / self.num_replicas)
        share = left[self.rank * per_replica : (self.rank + 1) * per_replica]
        fresh = math.ceil(self.num_samples / self.num_replicas)
        return EpochLayout(replayed, share, max(per_replica, fresh - replayed), order)

    def progress(self, position: int) -> EpochProgress:
        """This epoch once every process has taken ``position`` draws (the loader's position, replays included)."""
        closed = self._closed_stretches()
        current = (self.num_replicas, min(position, len(self)) - sum(drawn for _, drawn in closed))
        return EpochProgress(self.epoch, self.num_samples, (*closed, current))

    def __len__(self) -> int:
        if not self._closed_stretches():
            return math.ceil(self.num_samples / self.num_replicas)
        layout = self.layout()
        return layout.replayed + layout.length

    def __iter__(self) -> Iterator[Draw]:
        layout = self.layout()
        # Replayed positions are only counted off by the loader's saved position: never read, they weigh nothing.
        for _ in range(layout.replayed):
            yield Draw(int(layout.order[0]), False)
        for index in layout.share:
            yield Draw(int(index), True)
        # Evening out: repeat this share (or, if empty, the epoch's first samples) without counting them.
        filler = layout.share if len(layout.share) else layout.order
        for position in range(layout.length - len(layout.share)):
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
