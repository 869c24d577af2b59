"""Spread over seeds: is a difference between two ways of fine-tuning larger than what a new seed changes?

Pure arithmetic on per-seed values (no I/O), for ``study.py``:

- ``summarize``: mean, sample standard deviation (n - 1) and the 95 % Student-t interval of the mean,
  mean ± t(0.975, n - 1) · sd / √n. With one value the spread is unknown: sd and interval are NaN.
- ``paired_difference``: preset B minus preset A on the same seeds (same data order, same noise draws), the
  mean difference and its t-interval; the difference "exceeds the spread" when that interval excludes 0.
  Pairing removes what the seed does to both presets alike, so it is tighter than comparing two intervals.

Non-finite values (an undefined metric on one seed) are left out and show up in ``n``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np
from scipy import stats

CONFIDENCE = 0.95


@dataclass(frozen=True)
class Summary:
    """Mean of ``n`` values with their sample sd and the t-interval [low, high] = mean ± half_width."""

    n: int
    mean: float
    std: float
    half_width: float

    @property
    def low(self) -> float:
        return self.mean - self.half_width

    @property
    def high(self) -> float:
        return self.mean + self.half_width

    def as_dict(self) -> dict[str, float]:
        return {
            "n": self.n,
            "mean": self.mean,
            "std": self.std,
            "half_width": self.half_width,
            "low": self.low,
            "high": self.high,
        }


@dataclass(frozen=True)
class PairedDifference:
    """B - A on each common seed, summarized; ``exceeds_spread``: the interval excludes 0 (False when unknown)."""

    seeds: tuple[int, ...]
    differences: tuple[float, ...]
    summary: Summary

    @property
    def exceeds_spread(self) -> bool:
        return bool(self.summary.low > 0 or self.summary.high < 0)  # NaN compares False: unknown is not "exceeds"

    def as_dict(self) -> dict:
        return {
            "seeds": list(self.seeds),
            "differences": list(self.differences),
            **self.summary.as_dict(),
            "exceeds_spread": self.exceeds_spread,
        }


def t_half_width(std: float, n: int, confidence: float = CONFIDENCE) -> float:
    """Half-width of the two-sided Student-t interval of a mean of n values; NaN for n < 2."""
    if n < 2:
        return math.nan
    return float(stats.t.ppf(0.5 + confidence / 2, df=n - 1) * std / math.sqrt(n))


def summarize(values: Iterable[float], confidence: float = CONFIDENCE) -> Summary:
    """Mean, sample sd and t-interval of the finite values (NaN throughout when there are none)."""
    finite = np.array([v for v in values if math.isfinite(v)], dtype=np.float64)
    n = len(finite)
    mean = float(finite.mean()) if n else math.nan
    std = float(finite.std(ddof=1)) if n > 1 else math.nan
    return Summary(n, mean, std, t_half_width(std, n, confidence))


def paired_difference(
    a: Mapping[int, float], b: Mapping[int, float], confidence: float = CONFIDENCE
) -> PairedDifference:
    """B - A per seed on the seeds both have a finite value for (seed → value mappings), and its t-interval."""
    seeds = tuple(sorted(s for s in a.keys() & b.keys() if math.isfinite(a[s]) and math.isfinite(b[s])))
    differences = tuple(float(b[s] - a[s]) for s in seeds)
    return PairedDifference(seeds, differences, summarize(differences, confidence))
