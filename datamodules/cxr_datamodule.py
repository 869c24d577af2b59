"""The LightningDataModule for (chest X-ray, report caption) pairs: a MIMIC-CXR-JPG folder, or its prepared shards.

Real MIMIC-CXR-JPG and the embedded synthetic set are read by the same code; the split comes from the dataset's
own split CSV. Shards (``python -m datamodules.prepare``) hold the same samples, preprocessed, for streaming.
Unreadable images are dropped per batch and passed on as ``SkippedSample``s (see ``collate_skipping_bad``) for the
training module to count once per sample; ``data_report`` says what each split's index skipped or cut.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from pathlib import Path

import lightning as L
import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader, Dataset
from torchdata.stateful_dataloader import StatefulDataLoader
from transformers import PreTrainedTokenizerBase

from configs import ConfigError
from datamodules.mimic import (
    CHEXPERT_STEM,
    METADATA_STEM,
    SPLIT_STEM,
    MimicCxrDataset,
    MimicIndex,
    build_mimic_index,
    collate_skipping_bad,
)
from datamodules.sampling import DrawnDataset, EpochProgress, ExactlyOnceSampler
from datamodules.shards import ShardDataset
from datamodules.synthetic import ensure_synthetic_dataset

log = logging.getLogger(__name__)

DATA_FORMATS = ("folder", "shards")


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
    """Training and validation loaders over a MIMIC-CXR-JPG folder (``data_format="folder"``) or prepared shards.

    Both formats give the same sample dicts and the same sampling: every sample exactly once per epoch across
    processes (see ``datamodules.sampling``), an order fixed by (seed, epoch), and a stateful loader whose
    position Lightning saves in checkpoints. With ``read_latents`` the shards' stored VAE posteriors replace
    the pixels (``latent_moments`` instead of ``pixel_values``).
    """

    def __init__(
        self,
        root: str | Path | None,
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
        data_format: str = "folder",
        shards: str | Path | None = None,
        shard_cache_dir: str | Path = ".cache/cxr-diffusion/shards",
        shuffle_window: int = 4,
        read_latents: bool = False,
    ) -> None:
        super().__init__()
        if data_format not in DATA_FORMATS:
            raise ConfigError(f"data.format must be one of {DATA_FORMATS}, got {data_format!r}")
        if data_format == "shards" and not shards:
            raise ConfigError("data.format=shards needs data.shards: a folder or URL written by datamodules.prepare")
        if read_latents and data_format != "shards":
            raise ConfigError("cached latents are read from shards only (data.format=shards)")
        self.root, self.reports_root = (Path(root) if root else None), reports_root
        self.resolution, self.views, self.caption_section = resolution, tuple(views), caption_section
        self.train_split, self.val_split = train_split, val_split
        self.batch_size, self.num_workers = batch_size, num_workers
        self.tokenizer, self.seed = tokenizer, seed
        self.data_format, self.shards, self.shard_cache_dir = data_format, shards, Path(shard_cache_dir)
        self.shuffle_window, self.read_latents = shuffle_window, read_latents
        self.indices: dict[str, MimicIndex] = {}
        self.datasets: dict[str, Dataset] = {}
        self.train_sampler: ExactlyOnceSampler | None = None  # the one Lightning trains from
        self.progress_to_resume: EpochProgress | None = None

    def index(self, split: str) -> MimicIndex:
        """The split's folder index, built once (reading every report is the slow part on real data)."""
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

    def dataset(self, split: str) -> Dataset:
        """The split's samples, from the folder or from its shards (checked against ``resolution``)."""
        if self.data_format == "folder":
            return MimicCxrDataset(self.index(split), self.resolution)
        dataset = ShardDataset(
            self.shards, split, self.shard_cache_dir, read_pixels=not self.read_latents, read_latents=self.read_latents
        )
        prepared = dataset.metadata["resolution"]
        if prepared != self.resolution:
            raise ConfigError(
                f"{dataset.location} was prepared at resolution {prepared}, but data.resolution is {self.resolution}; "
                "prepare the shards again at this resolution (python -m datamodules.prepare)"
            )
        return dataset

    def data_report(self) -> dict[str, dict]:
        """Per split read so far: samples, skips by reason and truncated captions, from the index or the shards."""
        report = {}
        for split, dataset in self.datasets.items():
            if self.data_format == "folder":
                index = self.indices[split]
                report[split] = {
                    "samples": len(index),
                    "skipped": dict(sorted(index.skipped.items())),
                    "truncated_captions": index.truncated_captions,
                    "caption_max_tokens": index.max_caption_tokens,
                }
            else:
                metadata = dataset.metadata
                report[split] = {
                    "samples": len(dataset),
                    "skipped": metadata["skipped"],
                    "truncated_captions": metadata["truncated_captions"],
                    "caption_max_tokens": metadata.get("caption_max_tokens"),
                }
        return report

    def split_dataset(self, split: str) -> Dataset:
        if split not in self.datasets:
            self.datasets[split] = self.dataset(split)
        return self.datasets[split]

    def setup(self, stage: str | None = None) -> None:
        self.split_dataset(self.train_split)
        self.split_dataset(self.val_split)

    def train_dataloader(self) -> StatefulDataLoader:
        """Epoch-seeded shuffling, sliced per process, and a loader whose position is saved in checkpoints.

        Lightning stores the state of a stateful loader in the checkpoint, so a run resumed mid-epoch continues
        with the very next batch. The sampler is built for this process's rank (train.py keeps Lightning from
        re-sharding it); shards are shuffled shard-locally, ``shuffle_window`` shards at a time. A resumed run's
        sampler continues the checkpoint's epoch (``state_dict``), on however many processes it now has.
        """
        loader = self.train_loader(*self._world())
        self.train_sampler = loader.sampler
        if self.progress_to_resume is not None:
            self.train_sampler.resume(self.progress_to_resume)
            self.progress_to_resume = None
        return loader

    def state_dict(self) -> dict:
        """How far the training epoch got, in every process's draws (the same on every process; rank 0 writes it).

        The loader's own saved position is rank 0's count of draws: enough to continue on the same processes, not
        to split the rest of the epoch over another number of them. Lightning restores this before it asks for the
        loader, and counts the batches of the epoch from the first loader it gets, so the sampler must know now.
        """
        if self.train_sampler is None or self.trainer is None:
            return {}
        # Batches trained this epoch: the loader position a checkpoint holds, also when it is saved inside a batch
        # that never finished (callbacks.last_checkpoint then saves the position after the previous batch).
        batches = self.trainer.fit_loop.epoch_loop.batch_progress.current.processed
        return {"train_epoch_progress": self.train_sampler.progress(batches * self.batch_size).state_dict()}

    def load_state_dict(self, state_dict: dict) -> None:
        saved = state_dict.get("train_epoch_progress")
        self.progress_to_resume = EpochProgress.from_state_dict(saved) if saved else None

    def val_dataloader(self) -> DataLoader:
        """Every validation sample once across processes, in dataset order (evening-out repeats weigh 0)."""
        return self.val_loader(*self._world())

    def _world(self) -> tuple[int, int]:
        return (self.trainer.world_size, self.trainer.global_rank) if self.trainer else (1, 0)

    def train_loader(self, world_size: int, rank: int) -> StatefulDataLoader:
        dataset = self.split_dataset(self.train_split)
        sampler = ExactlyOnceSampler(
            len(dataset),
            num_replicas=world_size,
            rank=rank,
            seed=self.seed,
            block_sizes=getattr(dataset, "shard_sizes", None),
            blocks_per_window=self.shuffle_window,
        )
        return StatefulDataLoader(DrawnDataset(dataset), sampler=sampler, **self._loader_options())

    def val_loader(self, world_size: int, rank: int) -> DataLoader:
        dataset = self.split_dataset(self.val_split)
        sampler = ExactlyOnceSampler(len(dataset), num_replicas=world_size, rank=rank, shuffle=False)
        return DataLoader(DrawnDataset(dataset), sampler=sampler, **self._loader_options())

    def _loader_options(self) -> dict:
        # An explicit generator keeps loaders from drawing on the global RNG, which training noise relies on.
        return {
            "batch_size": self.batch_size,
            "num_workers": self.num_workers,
            "persistent_workers": self.num_workers > 0,
            "collate_fn": collate_skipping_bad,
            "generator": torch.Generator().manual_seed(self.seed),
        }
