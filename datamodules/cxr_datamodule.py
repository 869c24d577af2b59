"""The LightningDataModule for (chest X-ray, report caption) pairs read from a MIMIC-CXR-JPG layout.

Real MIMIC-CXR-JPG and the embedded synthetic set are read by the same code; the split comes from the dataset's
own split CSV. Unreadable images are dropped per batch and counted (see ``collate_skipping_bad``).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from pathlib import Path

import lightning as L
import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader, DistributedSampler
from torchdata.stateful_dataloader import StatefulDataLoader
from transformers import PreTrainedTokenizerBase

from datamodules.mimic import (
    CHEXPERT_STEM,
    METADATA_STEM,
    SPLIT_STEM,
    MimicCxrDataset,
    MimicIndex,
    build_mimic_index,
    collate_skipping_bad,
)
from datamodules.synthetic import ensure_synthetic_dataset

log = logging.getLogger(__name__)


def dataset_fingerprint(root: str | Path) -> str:
    """A short hash of the dataset's index CSVs: changes whenever the set of images or the split changes."""
    digest = hashlib.sha256()
    for stem in (METADATA_STEM, SPLIT_STEM, CHEXPERT_STEM):
        for suffix in (".csv.gz", ".csv"):
            path = Path(root) / f"{stem}{suffix}"
            if path.is_file():
                digest.update(path.name.encode())
                digest.update(path.read_bytes())
                break
    return digest.hexdigest()[:16]


def resolve_data_root(data_cfg: DictConfig) -> Path:
    """``data.root``, or the embedded synthetic set (generated from its seed on first use) when it is null."""
    if data_cfg.root:
        return Path(data_cfg.root)
    synthetic = data_cfg.synthetic
    return ensure_synthetic_dataset(Path(data_cfg.cache_dir), synthetic.n, synthetic.resolution, synthetic.seed)


class CxrDataModule(L.LightningDataModule):
    def __init__(
        self,
        root: str | Path,
        resolution: int,
        reports_root: str | Path | None = None,
        views: Sequence[str] = ("PA", "AP"),
        caption_section: str = "impression",
        train_split: str = "train",
        val_split: str = "validate",
        batch_size: int = 16,
        num_workers: int = 0,
        tokenizer: PreTrainedTokenizerBase | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.root, self.reports_root = Path(root), reports_root
        self.resolution, self.views, self.caption_section = resolution, tuple(views), caption_section
        self.train_split, self.val_split = train_split, val_split
        self.batch_size, self.num_workers = batch_size, num_workers
        self.tokenizer, self.seed = tokenizer, seed
        self.indices: dict[str, MimicIndex] = {}

    def index(self, split: str) -> MimicIndex:
        """The split's index, built once (reading every report is the slow part on real data)."""
        if split not in self.indices:
            self.indices[split] = build_mimic_index(
                self.root,
                self.reports_root,
                views=self.views,
                split=split,
                caption_section=self.caption_section,
                tokenizer=self.tokenizer,
            )
            log.info("data %s", self.indices[split].summary())
        return self.indices[split]

    def setup(self, stage: str | None = None) -> None:
        self.index(self.train_split)
        self.index(self.val_split)

    def train_dataloader(self) -> StatefulDataLoader:
        """Epoch-seeded shuffling, sharded per process, and a loader whose position is saved in checkpoints.

        Lightning stores the state of a stateful loader in the checkpoint, so a run resumed mid-epoch continues
        with the very next batch. The sampler is built for this process's rank: Lightning leaves a
        DistributedSampler as it is, which keeps shuffling identical between 1 and N processes.
        """
        world_size, rank = (self.trainer.world_size, self.trainer.global_rank) if self.trainer else (1, 0)
        dataset = MimicCxrDataset(self.index(self.train_split), self.resolution)
        sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=self.seed)
        return StatefulDataLoader(dataset, sampler=sampler, **self._loader_options())

    def val_dataloader(self) -> DataLoader:
        dataset = MimicCxrDataset(self.index(self.val_split), self.resolution)
        return DataLoader(dataset, shuffle=False, **self._loader_options())

    def _loader_options(self) -> dict:
        # An explicit generator keeps loaders from drawing on the global RNG, which training noise relies on.
        return {
            "batch_size": self.batch_size,
            "num_workers": self.num_workers,
            "persistent_workers": self.num_workers > 0,
            "collate_fn": collate_skipping_bad,
            "generator": torch.Generator().manual_seed(self.seed),
        }
