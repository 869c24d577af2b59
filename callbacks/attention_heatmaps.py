"""Show, run by run, where the model's cross-attention puts the words of a report on real X-rays."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import lightning as L
import torch
from omegaconf import DictConfig

from callbacks.image_logging import TILE, image_grid, log_image
from callbacks.periodic import PeriodicCallback
from datamodules.mscxr import GroundingItem
from grounding.evaluation import (
    GroundingBatch,
    evaluate_grounding,
    grounding_items,
    grounding_tiles,
    heatmap_settings,
    score_caption,
)
from grounding.phrase_grounding import HeatmapSettings
from metrics.grounding_metrics import PhraseGroundingMetrics


class AttentionHeatmapCallback(PeriodicCallback):
    """Every ``every_n_steps`` optimizer steps and at the end of fit, on rank 0, with the EMA weights: a grid of
    a fixed panel of MS-CXR pairs, each as the X-ray and its phrase-grounding heatmap overlaid, ground-truth
    boxes outlined, the phrase and its scores as labels. Written to ``out_dir`` and the image loggers."""

    def __init__(
        self,
        items: Sequence[GroundingItem],
        data_root: str | Path,
        resolution: int,
        settings: HeatmapSettings,
        out_dir: str | Path,
        every_n_steps: int = 500,
        thresholds: Sequence[float] = (0.3, 0.5),
        batch_size: int = 8,
    ) -> None:
        if not items:
            raise ValueError("AttentionHeatmapCallback: empty panel (check the MS-CXR CSV and the panel's split)")
        super().__init__(every_n_steps)
        self.items, self.data_root, self.resolution = list(items), Path(data_root), resolution
        self.settings, self.out_dir = settings, Path(out_dir)
        self.thresholds, self.batch_size = tuple(thresholds), batch_size
        self.written: list[Path] = []

    @classmethod
    def from_config(cls, cfg: DictConfig, data_root: Path, out_dir: Path) -> AttentionHeatmapCallback:
        """``callbacks.attention_heatmaps`` (how often, panel size and split, N and K) over ``grounding``."""
        own = cfg.callbacks.attention_heatmaps
        return cls(
            grounding_items(cfg.data.ms_cxr_csv, data_root, own.split, own.num_items),
            data_root,
            cfg.data.resolution,
            heatmap_settings(cfg.grounding, num_inference_steps=own.num_inference_steps, last_k_steps=own.last_k_steps),
            out_dir,
            own.every_n_steps,
            tuple(cfg.grounding.thresholds),
            cfg.grounding.batch_size,
        )

    def run(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        """Compute the panel's heatmaps and log the grid (rank 0 only; once per step)."""
        if not trainer.is_global_zero:
            return
        batches: list[GroundingBatch] = []
        metric = PhraseGroundingMetrics(thresholds=self.thresholds, seed=self.settings.seed)
        evaluate_grounding(
            module, self.items, self.data_root, self.resolution, self.settings, metric, self.batch_size, batches.append
        )
        tiles, labels = [], []
        for batch in (batch for batch in batches if batch.samples):
            for sample, heatmap, scores in zip(batch.samples, batch.heatmaps, batch.scores, strict=True):
                tiles.append(grounding_tiles(sample["pixel_values"], heatmap, sample["boxes"], TILE))
                labels += [sample["phrase"], score_caption(scores)]
        if not tiles:
            return
        settings = self.settings
        caption = (
            f"step {trainer.global_step}: cross-attention on real X-rays (forward-noised, last {settings.last_k_steps} "
            f"of {settings.num_inference_steps} DDIM steps); ground-truth boxes in green"
        )
        grid = image_grid(torch.cat(tiles), labels, columns=4)
        self.written.append(log_image(trainer, "grounding/heatmaps", grid, caption, self.out_dir))
