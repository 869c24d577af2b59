"""Show, run by run, where the model's cross-attention puts the words of a report on real X-rays."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
from omegaconf import DictConfig

from callbacks.image_logging import log_image
from callbacks.ms_cxr_evaluation import MsCxrEvaluationCallback
from grounding.evaluation import (
    GroundingBatch,
    evaluate_grounding,
    grounding_tiles,
    score_caption,
)
from metrics.pictures import TILE, image_grid


class AttentionHeatmapCallback(MsCxrEvaluationCallback):
    """Every ``every_n_steps`` optimizer steps and at the end of fit, on rank 0, with the EMA weights: a grid of
    a fixed panel of MS-CXR pairs, each as the X-ray and its phrase-grounding heatmap overlaid, ground-truth
    boxes outlined, the phrase and its scores as labels. Written to ``out_dir`` and the image loggers.

    Takes ``MsCxrEvaluationCallback``'s arguments, and ``out_dir``.
    """

    collective = False  # rank 0 alone, no sync: a failure is always caught (callbacks.evaluation_failures)

    def __init__(self, *args, out_dir: str | Path, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.out_dir = Path(out_dir)
        self.written: list[Path] = []

    @classmethod
    def from_config(cls, cfg: DictConfig, data_root: Path, out_dir: Path) -> AttentionHeatmapCallback:
        """``callbacks.attention_heatmaps`` (how often, panel size and split, N and K) over ``grounding``."""
        own = cfg.callbacks.attention_heatmaps
        return cls(**cls.config_arguments(cfg, data_root, own, own.split), out_dir=out_dir)

    def run(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        """Compute the panel's heatmaps and log the grid (rank 0 only; once per step)."""
        if not trainer.is_global_zero:
            return
        batches: list[GroundingBatch] = []
        metric = self.new_metric()
        evaluate_grounding(
            module, self.items, self.data_root, self.resolution, self.settings, metric, self.batch_size, batches.append
        )
        self.record_skips(skip for batch in batches for skip in batch.skipped)
        tiles, labels = [], []
        for batch in (batch for batch in batches if batch.samples):
            for sample, heatmap, scores in zip(batch.samples, batch.heatmaps, batch.scores, strict=True):
                tiles.append(grounding_tiles(sample["pixel_values"], heatmap, sample["boxes"], TILE))
                labels += [sample["phrase"], score_caption(scores, self.conventions[0])]
        if not tiles:
            return
        settings = self.settings
        caption = (
            f"step {trainer.global_step}: cross-attention on real X-rays (forward-noised, last {settings.last_k_steps} "
            f"of {settings.num_inference_steps} DDIM steps); ground-truth boxes in green"
        )
        grid = image_grid(torch.cat(tiles), labels, columns=4)
        self.written.append(log_image(trainer, "grounding/heatmaps", grid, caption, self.out_dir))
