"""What the training data left out, for the end of the run: per split, and in the loader over all processes.

The index skips (missing image or report, report not UTF-8, empty caption) and truncated captions come from the
datamodule; the loader's skips (an image that fails to decode when read) from the training module's SkipLedger,
merged over processes so a bad sample is one skip however many epochs or processes met it. Written to
``data_report.json`` in the run folder, logged to every logger, and printed by train.py's end-of-run summary.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning as L

from callbacks.grounding import gather_rows
from datamodules.skips import SkipLedger, describe_skips, skip_metric_name

DATA_REPORT_FILE = "data_report.json"


class DataReportCallback(L.Callback):
    """At the end of fit (every process takes part in one gather), process 0 writes ``path`` and logs the counts."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        merged = SkipLedger(gather_rows(list(pl_module.skipped_samples)))
        if not trainer.is_global_zero:
            return
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
