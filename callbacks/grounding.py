"""Phrase-grounding metrics during training: does the model still know where the words of a report are?"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.loggers import WandbLogger
from omegaconf import DictConfig

from callbacks.evaluation_failures import agree_on_success
from callbacks.ms_cxr_evaluation import MsCxrEvaluationCallback
from datamodules.skips import SkippedSample
from grounding.evaluation import evaluate_grounding, sample_rows


def gather_rows(rows: list) -> list:
    """Every process's per-sample rows (or skips), on every process (plain objects, so not through tensors)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return rows
    gathered: list[list[dict] | None] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, rows)
    return [row for shard in gathered for row in shard or []]


class GroundingCallback(MsCxrEvaluationCallback):
    """Every ``every_n_steps`` optimizer steps and at the end of fit, on every process, with the EMA weights.

    Each process scores its shard of the items; ``PhraseGroundingMetrics`` sums across processes, so the logged
    ``grounding/<convention>/<metric>`` (and ``.../<category>``, ``.../macro``) values cover all items whatever the
    process count (conventions: ``grounding.conventions``, see ``metrics.grounding_conventions``);
    ``grounding/skipped_pairs`` counts the pairs (and CSV rows) that could not be scored, named in the log.
    The processes agree that their shards succeeded before any sync (see ``callbacks.evaluation_failures``).
    """

    @classmethod
    def from_config(cls, cfg: DictConfig, data_root: Path) -> GroundingCallback:
        """``callbacks.grounding`` (how often, how many pairs of which split, N and K) over the ``grounding`` section.

        Its split is ``val``, not ``grounding.split`` (``test``): checkpoints chosen on the test pairs would leak."""
        own = cfg.callbacks.grounding
        return cls(**cls.config_arguments(cfg, data_root, own, own.split))

    def evaluate(self, trainer: L.Trainer, module: L.LightningModule) -> tuple[dict[str, float], list[dict]]:
        """Metric values over all items (with ``grounding/skipped_pairs``) and the per-sample rows of this process's
        shard (every process must call this: the processes agree on success, then metrics and skips are synced)."""
        metric = self.new_metric().to(module.device)
        shard = self.items[trainer.global_rank :: trainer.world_size]
        rows: list[dict] = []
        skipped: list[SkippedSample] = []

        def keep(batch) -> None:
            rows.extend(sample_rows(batch))
            skipped.extend(batch.skipped)

        error = None
        try:
            evaluate_grounding(
                module, shard, self.data_root, self.resolution, self.settings, metric, self.batch_size, keep
            )
        except Exception as caught:  # noqa: BLE001 - reported after every process knows (agree_on_success)
            error = caught
        agree_on_success(error, module.device)
        results = metric.compute()
        values = {
            f"grounding/{name}": float(value)
            for name, value in results.items()
            if not name.startswith(("nan_count/", "count/"))
        }
        self.record_skips(gather_rows(skipped))
        values["grounding/skipped_pairs"] = float(len(self.skipped))
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
