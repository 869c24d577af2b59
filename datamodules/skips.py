"""Samples the readers had to skip: why, counted once per (sample, reason), and described the same way everywhere.

Every reader names a bad sample with a ``SkippedSample`` (its id and one of the reasons below) instead of failing.
A ``SkipLedger`` keeps each (id, reason) once, so a bad image met again in every epoch is still one skip;
``describe_skips`` is the one text the log, the end-of-run summary and ``datamodules.prepare`` print, and
``skip_metric_name`` the one W&B/CSV key per reason.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import NamedTuple

SKIP_MISSING_IMAGE = "missing image"
SKIP_UNDECODABLE_IMAGE = "undecodable image"
SKIP_MISSING_REPORT = "missing report"
SKIP_UNDECODABLE_REPORT = "report not UTF-8 text"
SKIP_UNREADABLE_REPORT = "unreadable report"
SKIP_EMPTY_CAPTION = "empty caption"
SKIP_UNREADABLE_RECORD = "unreadable shard record"
SKIP_BOX_OUTSIDE_IMAGE = "box outside its image"
SKIP_CROPPED_AWAY = "every box cropped away by the image transform"


class SkippedSample(NamedTuple):
    """What a reader gives instead of a sample it could not use: which one, and why."""

    sample_id: str
    reason: str


class SkipLedger:
    """The distinct (sample id, reason) pairs seen so far; picklable state for checkpoints."""

    def __init__(self, skips: Iterable[SkippedSample] = ()) -> None:
        self._seen: set[SkippedSample] = set()
        self.add(skips)

    def add(self, skips: Iterable[SkippedSample]) -> list[SkippedSample]:
        """Record skips; returns those not seen before (to warn about once)."""
        new = []
        for skip in map(SkippedSample._make, skips):
            if skip not in self._seen:
                self._seen.add(skip)
                new.append(skip)
        return new

    def __len__(self) -> int:
        return len(self._seen)

    def __iter__(self):
        return iter(sorted(self._seen))

    def __contains__(self, skip: Iterable[str]) -> bool:
        return SkippedSample._make(skip) in self._seen

    def counts(self) -> dict[str, int]:
        """{reason: number of distinct samples}, reasons sorted."""
        counts: dict[str, int] = {}
        for skip in sorted(self._seen, key=lambda skip: skip.reason):
            counts[skip.reason] = counts.get(skip.reason, 0) + 1
        return counts

    def state_dict(self) -> list[list[str]]:
        return [list(skip) for skip in self]

    def load_state_dict(self, state: Iterable[Iterable[str]]) -> None:
        self._seen = {SkippedSample(*skip) for skip in state}


def describe_skips(counts: Mapping[str, int]) -> str:
    """e.g. "3 missing image, 1 report not UTF-8 text", or "none"."""
    return ", ".join(f"{count:,} {reason}" for reason, count in sorted(counts.items()) if count) or "none"


def skip_metric_name(reason: str, prefix: str = "data/skipped") -> str:
    """The logger key of a reason: "data/skipped/missing_image"."""
    return f"{prefix}/{re.sub(r'[^a-z0-9]+', '_', reason.lower()).strip('_')}"
