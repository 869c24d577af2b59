"""What the in-training grounding callbacks share: which MS-CXR pairs they score, and how."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from callbacks.periodic import PeriodicCallback
from datamodules.mscxr import GroundingItem
from datamodules.skips import SkipLedger, SkippedSample
from grounding.evaluation import grounding_items, heatmap_settings
from grounding.phrase_grounding import HeatmapSettings
from metrics.grounding_conventions import check_conventions
from metrics.grounding_metrics import DEFAULT_CONVENTIONS, PhraseGroundingMetrics

log = logging.getLogger(__name__)


class MsCxrEvaluationCallback(PeriodicCallback):
    """A periodic evaluation over MS-CXR pairs at model resolution, with its attention settings and thresholds.

    ``skipped`` holds what could not be scored, once per (pair or CSV line, reason): the rows the CSV reader
    left out (``skipped`` argument) and the pairs an evaluation skipped (missing or undecodable image, every box
    cropped away); each is logged once, with its id, when first met.
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
        skipped: Iterable[SkippedSample] = (),
        conventions: Sequence[str] = DEFAULT_CONVENTIONS,
    ) -> None:
        if not items:
            raise ValueError(f"{type(self).__name__}: no MS-CXR pairs to score (check the MS-CXR CSV and the split)")
        super().__init__(every_n_steps)
        self.items, self.data_root, self.resolution = list(items), Path(data_root), resolution
        self.settings, self.thresholds, self.batch_size = settings, tuple(thresholds), batch_size
        self.conventions = check_conventions(conventions)
        self.skipped = SkipLedger()
        self.record_skips(skipped)

    def record_skips(self, skips: Iterable[SkippedSample]) -> None:
        for sample_id, reason in self.skipped.add(skips):
            log.warning("%s: skipping MS-CXR %s: %s", type(self).__name__, sample_id, reason)

    @staticmethod
    def config_arguments(cfg: DictConfig, data_root: Path, own: DictConfig, split: str | None) -> dict[str, Any]:
        """Constructor arguments from the callback's own section (how often, how many pairs, N and K) over
        the ``grounding`` protocol section."""
        skipped = SkipLedger()
        items = grounding_items(
            cfg.data.ms_cxr_csv, data_root, split, own.num_items, cfg.grounding.invalid_boxes, skipped
        )
        return {
            "items": items,
            "skipped": list(skipped),
            "data_root": data_root,
            "resolution": cfg.data.resolution,
            "settings": heatmap_settings(
                cfg.grounding, num_inference_steps=own.num_inference_steps, last_k_steps=own.last_k_steps
            ),
            "every_n_steps": own.every_n_steps,
            "thresholds": tuple(cfg.grounding.thresholds),
            "batch_size": cfg.grounding.batch_size,
            "conventions": tuple(cfg.grounding.conventions),
        }

    def new_metric(self) -> PhraseGroundingMetrics:
        return PhraseGroundingMetrics(thresholds=self.thresholds, seed=self.settings.seed, conventions=self.conventions)
