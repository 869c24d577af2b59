"""What the training data left out, for the end of the run: per split, and in the loader over all processes.

The index skips (missing image or report, report not UTF-8, empty caption) and truncated captions come from the
datamodule; the loader's skips (an image that fails to decode when read) from the training module's SkipLedger,
merged over processes so a bad sample is one skip however many epochs or processes met it. Written to
``data_report.json`` in the run folder, logged to every logger, and printed by train.py's end-of-run summary.

Each process's ledger is its own, and a checkpoint is written by process 0 alone (``callbacks.last_checkpoint``), so
this callback keeps a copy of every process's ledger, brought up to date at each batch end (a point every process
reaches; the new skips only travel), saves them with its state and hands each process its own back on resume.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning as L
import torch

from callbacks.grounding import gather_rows
from datamodules.skips import SkipLedger, describe_skips, skip_metric_name

DATA_REPORT_FILE = "data_report.json"


class DataReportCallback(L.Callback):
    """Every process's skip ledger across checkpoints (see the module docstring), and at the end of fit process 0
    writes ``path`` and logs the counts merged over processes."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.ledgers: list[SkipLedger] = []  # every process's, in rank order, as of the last batch end
        self.ledgers_to_restore: list[SkipLedger] | None = None

    def state_dict(self) -> dict[str, Any]:
        return {"skipped_samples_per_rank": [ledger.state_dict() for ledger in self.ledgers]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = state_dict.get("skipped_samples_per_rank")
        self.ledgers_to_restore = None if saved is None else [SkipLedger(ledger) for ledger in saved]

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """A resumed process takes back its own ledger. After a change in the number of processes, process 0 also
        keeps the ledgers of ranks that no longer run, so their skips stay counted."""
        if self.ledgers_to_restore is not None:
            saved, rank = self.ledgers_to_restore, trainer.global_rank
            own = saved[rank] if rank < len(saved) else SkipLedger()
            if rank == 0:
                for gone in saved[trainer.world_size :]:
                    own.add(gone)
            pl_module.skipped_samples = own
            self.ledgers_to_restore = None
        self.ledgers = [SkipLedger() for _ in range(trainer.world_size)]
        self.share(trainer, pl_module)  # every process is here

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        self.share(trainer, pl_module)

    def share(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """This process's skips not yet in the copies, to every process. Under DDP a collective, which every process
        enters: one number a batch, and the skips themselves only after a batch in which some process met new ones."""
        rank = trainer.global_rank
        new = [[rank, *skip] for skip in pl_module.skipped_samples if skip not in self.ledgers[rank]]
        if trainer.world_size > 1:
            count = trainer.strategy.reduce(torch.tensor(float(len(new)), device=pl_module.device), reduce_op="sum")
            new = gather_rows(new) if count.item() > 0 else []
        for owner, *skip in new:
            self.ledgers[owner].add([skip])

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        merged = SkipLedger(skip for ledger in self.ledgers for skip in ledger)
        datamodule = trainer.datamodule
        report = {
            "splits": datamodule.data_report() if hasattr(datamodule, "data_report") else {},
            "training_loader": {"skipped": merged.counts(), "samples": merged.state_dict()},
        }
        self.path.write_text(json.dumps(report, indent=1) + "\n")
        metrics = {"data/skipped_samples": float(len(merged))}
        metrics |= {skip_metric_name(reason): float(count) for reason, count in merged.counts().items()}
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)


def describe_data_report(report: dict[str, Any]) -> list[str]:
    """The report's lines for the end-of-run summary, worded as the data log and ``datamodules.prepare``."""
    lines = []
    for split, entry in report["splits"].items():
        truncated = f"{entry['truncated_captions']:,} captions truncated"
        if entry.get("caption_max_tokens") is not None:
            truncated += f" to {entry['caption_max_tokens']} tokens"
        lines.append(f"{split}: {entry['samples']:,} samples; skipped: {describe_skips(entry['skipped'])}; {truncated}")
    loader = report["training_loader"]
    named = ", ".join(f"{sample_id} ({reason})" for sample_id, reason in loader["samples"][:10])
    more = f", ... {len(loader['samples']) - 10} more in {DATA_REPORT_FILE}" if len(loader["samples"]) > 10 else ""
    listed = f": {named}{more}" if named else ""
    lines.append(f"training loader skipped: {describe_skips(loader['skipped'])}{listed}")
    return lines
