"""Phrase-grounding metrics aggregated over MS-CXR samples, overall and per finding category.

Per-sample math lives in `metrics.localization`; this torchmetrics wrapper only sums scores and counts in
tensor states reduced by "sum", so results sync across DDP processes and do not depend on how samples
were split among them. Usage:

    metric = PhraseGroundingMetrics(conventions=("paper_code", "biovil"))
    metric.update(heatmaps, gt_masks, categories)
    rows = metric.latest_sample_scores  # this batch's per-sample score dicts, e.g. for a CSV
    results = metric.compute()  # {"paper_code/iou": ..., "paper_code/iou/Edema": ..., "count": ..., ...}
"""

from collections.abc import Sequence

import torch
from torchmetrics import Metric

from datamodules.mscxr import MS_CXR_CATEGORIES
from metrics.grounding_conventions import check_conventions, convention_metric_names, convention_scores

DEFAULT_CONVENTIONS = ("paper_code", "biovil", "method")


class PhraseGroundingMetrics(Metric):
    """Mean localization scores over samples, overall and per category, under each metric convention
    (``metrics.grounding_conventions``); also the mean over categories ("macro"), the average that
    vios-s/ldm-phrase-grounding's eval scripts print.

    A NaN score (e.g. AUC on a one-class mask) is left out of that metric's mean only; the sample still
    counts for the other metrics, and "nan_count/<metric>" says how many were left out.

    `latest_sample_scores` holds the last `update`'s per-sample score dicts (in input order) for a
    caller that writes them out; it is a plain attribute, neither synced nor reset. (torchmetrics
    drops `update`'s return value, hence the attribute.)
    """

    is_differentiable = False
    higher_is_better = None
    full_state_update = False

    def __init__(
        self,
        categories: Sequence[str] = MS_CXR_CATEGORIES,
        thresholds: Sequence[float] = (0.3, 0.5),
        seed: int = 0,
        conventions: Sequence[str] = DEFAULT_CONVENTIONS,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        if isinstance(categories, str) or len(categories) == 0 or len(set(categories)) != len(categories):
            raise ValueError(f"categories must be a non-empty sequence of distinct names, got {categories!r}")
        if any(not 0 <= t <= 1 for t in thresholds) or len(set(thresholds)) != len(thresholds):
            raise ValueError(f"thresholds must be distinct values in [0, 1] (P is normalised), got {thresholds}")
        self.categories = tuple(categories)
        self.thresholds = tuple(float(t) for t in thresholds)
        self.seed = seed
        self.conventions = check_conventions(conventions)
        self.metric_names = convention_metric_names(self.conventions, self.thresholds)
        shape = (len(self.metric_names), len(self.categories))
        self.add_state("score_sum", torch.zeros(shape, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("score_count", torch.zeros(shape, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("sample_count", torch.zeros(len(self.categories), dtype=torch.long), dist_reduce_fx="sum")
        self.latest_sample_scores: list[dict[str, float]] = []

    def _category_index(self, category: str) -> int:
        if category not in self.categories:
            raise ValueError(f"unknown category {category!r}; known categories: {', '.join(self.categories)}")
        return self.categories.index(category)

    def update(
        self,
        heatmaps: Sequence[torch.Tensor] | torch.Tensor,
        gt_masks: Sequence[torch.Tensor] | torch.Tensor,
        categories: Sequence[str],
    ) -> None:
        """Score each (heatmap, mask, category) sample and add the scores to the sums.

        heatmaps and gt_masks: lists of 2-D tensors or (B, H, W) tensors; a heatmap whose size differs
        from its mask's is resized bilinearly to it.
        """
        if not len(heatmaps) == len(gt_masks) == len(categories):
            raise ValueError(
                f"update got {len(heatmaps)} heatmaps, {len(gt_masks)} gt_masks and {len(categories)} "
                "categories; expected one of each per sample"
            )
        category_indices = [self._category_index(category) for category in categories]
        rows = [
            convention_scores(heatmap, gt_mask, self.conventions, self.thresholds, self.seed)
            for heatmap, gt_mask in zip(heatmaps, gt_masks, strict=True)
        ]
        for row, category_index in zip(rows, category_indices, strict=True):
            scores = torch.tensor([row[name] for name in self.metric_names], dtype=torch.float64)
            finite = ~torch.isnan(scores)
            self.score_sum[:, category_index] += torch.where(finite, scores, 0.0).to(self.device)
            self.score_count[:, category_index] += finite.to(self.device)
            self.sample_count[category_index] += 1
        self.latest_sample_scores = rows

    def compute(self) -> dict[str, torch.Tensor]:
        """Overall and per-category means ("paper_code/iou", "paper_code/iou/Edema", ...), the mean over the
        categories that have samples ("paper_code/iou/macro"), sample counts ("count", "count/Edema", ...) and
        per-metric NaN counts ("nan_count/paper_code/auc", ...). Categories without samples are left out; a
        mean over no finite score is NaN."""
        overall = self.score_sum.sum(dim=1) / self.score_count.sum(dim=1)
        per_category = self.score_sum / self.score_count
        total_samples = self.sample_count.sum()
        results: dict[str, torch.Tensor] = {"count": total_samples}
        present = self.sample_count > 0
        for metric_index, name in enumerate(self.metric_names):
            results[name] = overall[metric_index]
            results[f"{name}/macro"] = per_category[metric_index, present].nanmean()
            results[f"nan_count/{name}"] = total_samples - self.score_count[metric_index].sum()
        for category_index, category in enumerate(self.categories):
            if self.sample_count[category_index] == 0:
                continue
            results[f"count/{category}"] = self.sample_count[category_index]
            for metric_index, name in enumerate(self.metric_names):
                results[f"{name}/{category}"] = per_category[metric_index, category_index]
        return results
