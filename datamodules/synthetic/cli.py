"""``python -m datamodules.synthetic``: write a synthetic set into a folder and print what it holds."""

from __future__ import annotations

import argparse
import csv
import gzip
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from datamodules.mscxr import MS_CXR_CATEGORIES
from datamodules.synthetic.layout import CHEXPERT_FILE, METADATA_FILE, generate_synthetic_dataset


def _summary(out_dir: Path, seconds: float) -> str:
    with gzip.open(out_dir / METADATA_FILE, "rt") as file:
        views = Counter(row["ViewPosition"] or "(empty)" for row in csv.DictReader(file))
    with gzip.open(out_dir / CHEXPERT_FILE, "rt") as file:
        rows = list(csv.DictReader(file))
    findings = Counter(c for row in rows for c in MS_CXR_CATEGORIES if row[c] == "1.0")
    normal = sum(row["No Finding"] == "1.0" for row in rows)
    per_category = ", ".join(f"{c} {findings[c]}" for c in MS_CXR_CATEGORIES)
    view_counts = ", ".join(f"{view} {count}" for view, count in sorted(views.items()))
    return (
        f"{out_dir}: {len(rows)} studies, {sum(views.values())} images ({view_counts}); "
        f"normal {normal}; findings: {per_category}; {seconds:.1f} s"
    )


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder to write the dataset into")
    parser.add_argument("--n", type=int, default=1000, help="number of studies")
    parser.add_argument("--resolution", type=int, default=256, help="short side of every image in pixels")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    generate_synthetic_dataset(args.out, args.n, args.resolution, args.seed)
    print(_summary(args.out, time.perf_counter() - start))
