"""Phrase-grounding metrics during training: does the model still know where the words of a report are?"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.loggers import WandbLogger
from omegaconf import DictConfig

from callbacks.periodic import PeriodicCallback
from datamodules.mscxr import GroundingItem
from grounding.evaluation import evaluate_grounding, grounding_items, heatmap_settings, sample_rows
from grounding.phrase_grounding import HeatmapSettings
from metrics.grounding_metrics import PhraseGroundingMetrics


def gather_rows(rows: list[dict]) -> list[dict]:
    """Every process's per-sample rows, on every process (plain objects, so not through tensors)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return rows
    gathered: list[list[dict] | None] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, rows)
    return [row for shard in gathered for row in shard or []]


class GroundingCallback(PeriodicCallback):
    """Every ``every_n_steps`` optimizer steps and at the end of fit, on every process, with the EMA weights.

    Each process scores its shard of the items; ``PhraseGroundingMetrics`` sums across processes, so the logged
    ``grounding/<metric>`` and ``grounding/<metric>/<category>`` values cover all items whatever the process count.
    """

    def __init__(
        self,
        items: Sequence[GroundingItem],
        data_root: str | Path,
        resolution: int,
        settings: HeatmapSettings,
        every_n_steps: int = 500,
        thresholds: Sequence[float] = (0.3, 0.5),
        batch_size: int = 8,
    ) -> None:
        if not items:
            raise ValueError("GroundingCallback: no MS-CXR items to evaluate (check the CSV and grounding.split)")
        super().__init__(every_n_steps)
        self.items, self.data_root, self.resolution = list(items), Path(data_root), resolution
        self.settings, self.thresholds, self.batch_size = settings, tuple(thresholds), batch_size

    @classmethod
    def from_config(cls, cfg: DictConfig, data_root: Path) -> GroundingCallback:
        """``callbacks.grounding`` (how often, how many items, N and K) over the ``grounding`` section."""
        own = cfg.callbacks.grounding
        return cls(
            grounding_items(cfg.data.ms_cxr_csv, data_root, cfg.grounding.split, own.num_items),
            data_root,
            cfg.data.resolution,
            heatmap_settings(cfg.grounding, num_inference_steps=own.num_inference_steps, last_k_steps=own.last_k_steps),
            own.every_n_steps,
            tuple(cfg.grounding.thresholds),
            cfg.grounding.batch_size,
        )

    def evaluate(self, trainer: L.Trainer, module: L.LightningModule) -> tuple[dict[str, float], list[dict]]:
        """Metric values over all items and the per-sample rows of this process's shard (every process must
        call this: the metric state is synced)."""
        metric = PhraseGroundingMetrics(thresholds=self.thresholds, seed=self.settings.seed).to(module.device)
        shard = self.items[trainer.global_rank :: trainer.world_size]
        rows: list[dict] = []
        evaluate_grounding(
            module,
            shard,
            self.data_root,
            self.resolution,
            self.settings,
            metric,
            self.batch_size,
            on_batch=lambda batch: rows.extend(sample_rows(batch)),
        )
        results = metric.compute()
        values = {
            f"grounding/{name}": float(value)
            for name, value in results.items()
            if not name.startswith(("nan_count/", "count/"))
        }
        return values, rows

    def run(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        step = trainer.global_step
        values, rows = self.evaluate(trainer, module)
        rows = gather_rows(rows)
        for logger in trainer.loggers:  # not module.log: Lightning refuses it in on_train_end
            logger.log_metrics(values, step=step)
            if isinstance(logger, WandbLogger) and rows:  # the dashboard's per-sample view of this evaluation
                columns = list(rows[0])
                logger.log_table(
                    "grounding/samples", columns=columns, data=[[r[c] for c in columns] for r in rows], step=step
                )
            logger.save()
