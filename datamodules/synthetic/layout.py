"""Writing the synthetic set in the MIMIC-CXR-JPG + reports + MS-CXR layout, and the cached copy a run uses.

Why a module of its own: this is the contract with the real-data readers (datamodules.mimic, datamodules.mscxr):
the file names, the column lists and value conventions, the folder scheme of images and reports, and the
byte-for-byte determinism (per-study seeds, gzip without a timestamp) that makes the same (n, resolution, seed)
give identical files.
"""

from __future__ import annotations

import csv
import gzip
import io
import shutil
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from datamodules.mimic import CHEXPERT_LABELS, CHEXPERT_STEM, METADATA_STEM, REQUIRED_COLUMNS, SPLIT_STEM
from datamodules.mscxr import MS_CXR_COLUMNS as MS_CXR_BASE_COLUMNS
from datamodules.synthetic.radiographs import render_frontal, render_lateral
from datamodules.synthetic.report_writing import write_report
from datamodules.synthetic.studies import Study, plan_studies

METADATA_COLUMNS = (
    "dicom_id",
    "subject_id",
    "study_id",
    "PerformedProcedureStepDescription",
    "ViewPosition",
    "Rows",
    "Columns",
    "StudyDate",
    "StudyTime",
    "ProcedureCodeSequence_CodeMeaning",
    "ViewCodeSequence_CodeMeaning",
    "PatientOrientationCodeSequence_CodeMeaning",
)
SPLIT_COLUMNS = REQUIRED_COLUMNS[SPLIT_STEM]
CHEXPERT_COLUMNS = ("subject_id", "study_id", *CHEXPERT_LABELS)
MS_CXR_COLUMNS = (*MS_CXR_BASE_COLUMNS, "split")  # the v1.1.0 layout
METADATA_FILE = f"{METADATA_STEM}.csv.gz"
SPLIT_FILE = f"{SPLIT_STEM}.csv.gz"
CHEXPERT_FILE = f"{CHEXPERT_STEM}.csv.gz"
MS_CXR_FILE = "MS_CXR_Local_Alignment_v1.1.0.csv"
JPEG_QUALITY = 95

_MS_CXR_SPLIT = {"train": "train", "validate": "val", "test": "test"}
_VIEW_CODE = {"PA": "postero-anterior", "AP": "antero-posterior", "LATERAL": "lateral"}
_ORIENTATION = {"PA": "Erect", "AP": "Recumbent", "LATERAL": "Erect"}


def _csv_bytes(columns: Sequence[str], rows: Iterable[dict]) -> bytes:
    """CSV text in `columns` order; a column a row lacks is an empty cell (CheXpert's "not mentioned")."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n", extrasaction="raise")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue().encode()


def _save_jpeg(path: Path, pixels: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, format="JPEG", quality=JPEG_QUALITY)


def _write_study(
    rng: np.random.Generator, study: Study, out_dir: Path, resolution: int, tables: dict[str, list[dict]]
) -> None:
    """Draw and save a study's images and report; append its rows to the tables (keyed by file name)."""
    for image in study.images:
        if image.view == "LATERAL":
            pixels = render_lateral(rng, resolution)
        else:
            pixels, findings = render_frontal(rng, resolution, image.view)
        relative_path = f"{study.folder}/{image.dicom_id}.jpg"
        _save_jpeg(out_dir / relative_path, pixels)
        height, width = pixels.shape
        ids = {"dicom_id": image.dicom_id, "subject_id": study.subject_id, "study_id": study.study_id}
        tables[METADATA_FILE].append(
            ids
            | {
                "PerformedProcedureStepDescription": study.procedure,
                "ViewPosition": image.view_position,
                "Rows": height,
                "Columns": width,
                "StudyDate": study.study_date,
                "StudyTime": f"{study.study_time:.3f}",
                "ProcedureCodeSequence_CodeMeaning": study.procedure,
                "ViewCodeSequence_CodeMeaning": _VIEW_CODE[image.view],
                "PatientOrientationCodeSequence_CodeMeaning": _ORIENTATION[image.view],
            }
        )
        tables[SPLIT_FILE].append(ids | {"split": study.split})
        if image.view == "LATERAL":
            continue
        report, phrases, labels = write_report(rng, study, findings)
        (out_dir / f"{study.folder}.txt").write_text(report)
        labels = {column: f"{value:.1f}" for column, value in labels.items()}
        tables[CHEXPERT_FILE].append({"subject_id": study.subject_id, "study_id": study.study_id} | labels)
        for finding, phrase in zip(findings, phrases, strict=True):
            tables[MS_CXR_FILE].extend(
                {"dicom_id": image.dicom_id, "category_name": finding.category, "label_text": phrase}
                | {"path": relative_path, "x": x, "y": y, "w": w, "h": h}
                | {"image_width": width, "image_height": height, "split": _MS_CXR_SPLIT[study.split]}
                for x, y, w, h in finding.boxes
            )


def generate_synthetic_dataset(out_dir: Path, n: int, resolution: int, seed: int) -> Path:
    """Write n synthetic studies in the MIMIC-CXR-JPG + reports + MS-CXR layout into out_dir; return it."""
    if n < 3:
        raise ValueError(f"n must be at least 3 studies (one per split), got {n}")
    if resolution < 32:
        raise ValueError(f"resolution must be at least 32 px, got {resolution}")
    if seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    layout_seed, *study_seeds = np.random.SeedSequence(seed).spawn(n + 1)
    columns = {
        METADATA_FILE: METADATA_COLUMNS,
        SPLIT_FILE: SPLIT_COLUMNS,
        CHEXPERT_FILE: CHEXPERT_COLUMNS,
        MS_CXR_FILE: MS_CXR_COLUMNS,
    }
    tables: dict[str, list[dict]] = {name: [] for name in columns}
    for study, study_seed in zip(plan_studies(np.random.default_rng(layout_seed), n), study_seeds, strict=True):
        _write_study(np.random.default_rng(study_seed), study, out_dir, resolution, tables)
    for name, rows in tables.items():
        table = _csv_bytes(columns[name], rows)
        # gzip with mtime=0 and no stored file name, so the bytes depend only on the content.
        (out_dir / name).write_bytes(gzip.compress(table, mtime=0) if name.endswith(".gz") else table)
    return out_dir


def ensure_synthetic_dataset(cache_dir: Path, n: int, resolution: int, seed: int) -> Path:
    """`cache_dir/synthetic-n{n}-r{resolution}-s{seed}`, generated first if absent.

    Generation happens in a temporary sibling folder renamed into place when complete, so an interrupted run
    never leaves a folder that looks finished, and concurrent callers (e.g. DDP ranks) each get a whole one.
    """
    cache_dir = Path(cache_dir)
    target = cache_dir / f"synthetic-n{n}-r{resolution}-s{seed}"
    if target.is_dir():
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=cache_dir))
    try:
        generate_synthetic_dataset(scratch, n, resolution, seed)
        scratch.rename(target)
    except OSError:
        if not target.is_dir():  # a concurrent caller finishing first is fine; anything else is not
            raise
    finally:
        if scratch.exists():
            shutil.rmtree(scratch)
    return target
