"""Fidelity metrics of generated images: FID, classifier agreement and MS-SSIM diversity, DDP-ready.

- FID is torchmetrics' ``FrechetInceptionDistance`` fed with features computed outside it, so any
  ``FeatureExtractor`` serves; its states (feature sum, sum of outer products, count) are float64 sums, so the
  value does not depend on how images were split among processes. The real set's statistics are computed once and
  cached on disk (``reference_statistics``); under DDP exactly one process loads them, the sum-sync does the rest.
- Classifier agreement: per-finding ROC AUC of a classifier's scores on generated images against the findings
  their prompts' CheXpert labels name, and their mean.
- Diversity: mean pairwise MS-SSIM among several images of one prompt, averaged over prompts (lower = more
  diverse), with as many MS-SSIM scales as the image size allows.

    metrics = FidelityMetrics([inception, xrv], scorer=xrv, num_images=500)
    metrics.load_reference({e.name: reference_statistics(e, real_batches, cache_file_of(e)).statistics
                            for e in (inception, xrv)})
    metrics.update(generated_images, finding_targets, indices)   # per batch, on every process
    metrics.update_diversity(images_of_one_prompt)
    metrics.compute()   # {"fid/inception@500": ..., "fid/xrv@500": ..., "agreement/xrv/auroc_mean": ..., ...}
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torchmetrics import MeanMetric, Metric
from torchmetrics.functional.image import multiscale_structural_similarity_index_measure
from torchmetrics.image.fid import FrechetInceptionDistance

from metrics.domain_classifier import finding_aurocs
from metrics.feature_extractors import FeatureExtractor

MS_SSIM_BETAS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)  # the standard five scales (Wang et al. 2003)
MS_SSIM_KERNEL = 11


@dataclass
class FeatureStatistics:
    """Sufficient statistics of a feature set, float64: what torchmetrics' FID keeps as its states."""

    feature_sum: torch.Tensor  # (D,)
    outer_sum: torch.Tensor  # (D, D)
    count: int

    @classmethod
    def of(cls, features: torch.Tensor) -> FeatureStatistics:
        features = features.double()
        return cls(features.sum(dim=0), features.T @ features, len(features))


class _GivenFeatures(nn.Module):
    """Identity "network": the FID metric receives features already computed by a FeatureExtractor."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = num_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


class FrechetDistance(FrechetInceptionDistance):
    """torchmetrics' FID on given features, float64 throughout; the reference (real) statistics survive reset().

    ``compute()`` sums the statistics over processes (a collective every process must enter); with
    ``sync_on_compute=False`` it uses this process's features alone and is safe where only one process runs.
    """

    def __init__(self, num_features: int, sync_on_compute: bool = True) -> None:
        super().__init__(
            feature=_GivenFeatures(num_features), reset_real_features=False, sync_on_compute=sync_on_compute
        )
        self.orig_dtype = torch.float64  # compute() casts to it; set here for a process that saw no images

    def update(self, features: torch.Tensor, real: bool) -> None:
        super().update(features.double(), real)

    def load_reference(self, statistics: FeatureStatistics) -> None:
        self.real_features_sum = statistics.feature_sum.to(self.real_features_sum)
        self.real_features_cov_sum = statistics.outer_sum.to(self.real_features_cov_sum)
        self.real_features_num_samples = torch.tensor(statistics.count, device=self.real_features_sum.device)


def frechet_distance(real_features: torch.Tensor, generated_features: torch.Tensor) -> float:
    """FID between two feature sets (rows are samples), through the same metric the evaluation uses.

    Local to the calling process (no sync): the reference statistics are computed on process 0 alone.
    """
    metric = FrechetDistance(real_features.shape[1], sync_on_compute=False)
    metric.update(real_features, real=True)
    metric.update(generated_features, real=False)
    return float(metric.compute())


@dataclass
class ReferenceStatistics:
    """The real held-out set's feature statistics, and FID between its two halves (the floor at M/2 vs M/2;
    NaN below 4 images)."""

    statistics: FeatureStatistics
    real_halves_fid: float


def reference_cache_file(cache_dir: str | Path, key: dict) -> Path:
    """``cache_dir/fid_reference/<hash of key>.pt``; the key must name data, resolution, extractor and M."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return Path(cache_dir) / "fid_reference" / f"{digest}.pt"


def reference_statistics(
    extractor: FeatureExtractor, real_batches: Callable[[], Iterable[torch.Tensor]], cache_file: str | Path
) -> ReferenceStatistics:
    """Load ``cache_file``, or extract features of ``real_batches()`` (images in [0, 1]) once and write it."""
    cache_file = Path(cache_file)
    if cache_file.is_file():
        saved = torch.load(cache_file, map_location="cpu", weights_only=True)
        statistics = FeatureStatistics(saved["feature_sum"], saved["outer_sum"], int(saved["count"]))
        return ReferenceStatistics(statistics, float(saved["real_halves_fid"]))
    device = next(itertools.chain(extractor.parameters(), extractor.buffers()), torch.empty(0)).device
    features = torch.cat([extractor(images.to(device)).cpu() for images in real_batches()])
    if len(features) < 2:
        raise ValueError(f"FID needs at least 2 real images, got {len(features)}")
    half = len(features) // 2
    halves = frechet_distance(features[:half], features[half:]) if half >= 2 else float("nan")
    reference = ReferenceStatistics(FeatureStatistics.of(features), halves)
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    handle, staging = tempfile.mkstemp(prefix=f".{cache_file.name}.", dir=cache_file.parent)
    os.close(handle)
    saved = {
        "feature_sum": reference.statistics.feature_sum,
        "outer_sum": reference.statistics.outer_sum,
        "count": torch.tensor(reference.statistics.count),
        "real_halves_fid": torch.tensor(reference.real_halves_fid, dtype=torch.float64),
    }
    torch.save(saved, staging)
    os.replace(staging, cache_file)  # atomic: a concurrent reader sees the old state or the whole file
    return reference


def ms_ssim_scales(size: int, kernel_size: int = MS_SSIM_KERNEL) -> tuple[float, ...]:
    """The standard MS-SSIM betas, cut to the scales an image of this size allows, renormalised to sum to 1.

    torchmetrics needs size > (kernel_size - 1) * 2 ** (scales - 1): 5 scales from 161 px, 3 at 64 px, 2 at 32 px.
    """
    scales = 1
    while scales < len(MS_SSIM_BETAS) and size > (kernel_size - 1) * 2**scales:
        scales += 1
    betas = MS_SSIM_BETAS[:scales]
    return tuple(beta / sum(betas) for beta in betas)


def mean_pairwise_ms_ssim(images: torch.Tensor) -> float:
    """Mean MS-SSIM over all pairs of (K, C, H, W) images in [0, 1] (compared as grayscale), K >= 2."""
    if len(images) < 2:
        raise ValueError(f"diversity needs at least 2 images of a prompt, got {len(images)}")
    gray = images.float().clamp(0, 1).mean(dim=1, keepdim=True)
    first, second = zip(*itertools.combinations(range(len(gray)), 2), strict=True)
    scores = multiscale_structural_similarity_index_measure(
        gray[list(first)],
        gray[list(second)],
        data_range=1.0,
        kernel_size=MS_SSIM_KERNEL,
        betas=ms_ssim_scales(min(gray.shape[-2:])),
        reduction="none",
    )
    return float(scores.mean())


def _slug(finding: str) -> str:
    return finding.lower().replace(" ", "_")


class IndexedScores(Metric):
    """Classifier scores and prompt targets of image i stored in row i of fixed-size sum states.

    Rows are filled by whichever process generated image i and summed across processes, so the gathered matrix
    is the same for any process count, and a process that generated nothing syncs zeros, not an empty list.
    """

    full_state_update = False

    def __init__(self, num_images: int, width: int) -> None:
        super().__init__()
        self.add_state("scores", torch.zeros(num_images, width, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("targets", torch.zeros(num_images, width, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("filled", torch.zeros(num_images, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, indices: torch.Tensor, scores: torch.Tensor, targets: torch.Tensor) -> None:
        indices = indices.to(self.filled.device)
        self.scores[indices] += scores.to(self.scores)
        self.targets[indices] += targets.to(self.targets)
        self.filled[indices] += 1

    def compute(self) -> tuple[torch.Tensor, torch.Tensor]:
        rows = self.filled > 0
        return self.scores[rows], self.targets[rows]


class FidelityMetrics(nn.Module):
    """FID of generated images against a reference on each extractor, classifier agreement and diversity.

    One generation feeds every metric: each batch of generated images goes through every extractor (one
    ``FrechetDistance`` each, ``fid/<extractor>@M``) and the scorer. Every process updates with its own images;
    ``compute`` syncs (sums FID statistics, gathers agreement scores, averages diversity) so all processes get
    the values of the union. Call ``load_reference`` on one process only.
    """

    def __init__(
        self,
        extractors: Sequence[FeatureExtractor],
        scorer: FeatureExtractor | None,
        num_images: int,
        measure_diversity: bool = True,
    ) -> None:
        super().__init__()
        names = [extractor.name for extractor in extractors]
        if not names or len(set(names)) != len(names):
            raise ValueError(f"FID needs one or more extractors with distinct names, got {names}")
        self.extractors = nn.ModuleDict(zip(names, extractors, strict=True))
        self.fids = nn.ModuleDict({extractor.name: FrechetDistance(extractor.num_features) for extractor in extractors})
        self.scorer, self.num_images, self.measure_diversity = scorer, num_images, measure_diversity
        self.agreement = IndexedScores(num_images, len(scorer.findings)) if scorer is not None else None
        self.diversity = MeanMetric()

    def load_reference(self, statistics: Mapping[str, FeatureStatistics]) -> None:
        """The real set's statistics of every extractor, by extractor name."""
        missing = set(self.fids) - set(statistics)
        if missing:
            raise ValueError(f"no reference statistics for extractor(s) {sorted(missing)}")
        for name, fid in self.fids.items():
            fid.load_reference(statistics[name])

    @torch.no_grad()
    def update(self, images: torch.Tensor, targets: torch.Tensor, indices: torch.Tensor) -> None:
        """Generated images in [0, 1], their prompts' finding targets (N, 8): 1, 0, or -1 = uncertain, and their
        positions among the M images."""
        for name, extractor in self.extractors.items():
            self.fids[name].update(extractor(images), real=False)
        if self.agreement is not None:
            self.agreement.update(indices, self.scorer.finding_scores(images), targets)

    def update_diversity(self, images_of_one_prompt: torch.Tensor) -> None:
        self.diversity.update(mean_pairwise_ms_ssim(images_of_one_prompt))

    def compute(self) -> dict[str, float]:
        """Values named for dashboards; M is in the FID names; findings without both classes are left out.

        Every process must call it (the sync is collective), whether or not it had images to update with.
        """
        results = {f"fid/{name}@{self.num_images}": float(fid.compute()) for name, fid in self.fids.items()}
        if self.agreement is not None:
            aurocs = finding_aurocs(*self.agreement.compute())
            prefix = f"agreement/{self.scorer.name}"
            results[f"{prefix}/auroc_mean"] = aurocs.pop("mean")
            results |= {f"{prefix}/auroc_{_slug(finding)}": value for finding, value in aurocs.items()}
        if self.measure_diversity:
            results["diversity/ms_ssim"] = float(self.diversity.compute())
        return {name: value for name, value in results.items() if not math.isnan(value)}

    def reset(self) -> None:
        """Forget generated images (the reference statistics stay)."""
        for metric in (*self.fids.values(), self.agreement, self.diversity):
            if metric is not None:
                metric.reset()
