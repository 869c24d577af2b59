"""MIMIC-CXR-JPG (images, metadata, split, CheXpert labels) joined with MIMIC-CXR report captions.

Reads the PhysioNet datasets as distributed, unchanged: CSVs gzipped or not,
reports unpacked or inside `mimic-cxr-reports.zip`, possibly under a different root than the JPGs.
`build_mimic_index` does the join and filtering once and counts every sample it had to skip;
`MimicCxrDataset` turns an index into model-ready tensors and tolerates undecodable JPEGs.

    index = build_mimic_index("/data/mimic-cxr-jpg", reports_root="/data/mimic-cxr", split="train",
                              tokenizer=tokenizer, max_caption_tokens=77)
    print(index.summary())
    loader = DataLoader(MimicCxrDataset(index, resolution=512), batch_size=16,
                        collate_fn=collate_skipping_bad)
"""

from __future__ import annotations

import logging
import re
import zipfile
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset, default_collate
from transformers import PreTrainedTokenizerBase

from datamodules.reports import (
    CaptionSection,
    ReportDecodeError,
    caption_from_report,
    decode_report,
    truncate_to_tokens,
)
from datamodules.skips import (
    SKIP_EMPTY_CAPTION,
    SKIP_MISSING_IMAGE,
    SKIP_MISSING_REPORT,
    SKIP_UNREADABLE_REPORT,
    SkippedSample,
    describe_skips,
)
from datamodules.transforms import UnreadableImageError, load_grayscale_image, resize_center_crop, to_model_tensor

logger = logging.getLogger(__name__)

METADATA_STEM = "mimic-cxr-2.0.0-metadata"
SPLIT_STEM = "mimic-cxr-2.0.0-split"
CHEXPERT_STEM = "mimic-cxr-2.0.0-chexpert"
REPORTS_ZIP = "mimic-cxr-reports.zip"
SPLITS = ("train", "validate", "test")

# The 14 CheXpert labeler columns, in the order of mimic-cxr-2.0.0-chexpert.csv.
CHEXPERT_LABELS = (
    "Atelectasis",
    "Cardiomegaly",
    "Consolidation",
    "Edema",
    "Enlarged Cardiomediastinum",
    "Fracture",
    "Lung Lesion",
    "Lung Opacity",
    "No Finding",
    "Pleural Effusion",
    "Pleural Other",
    "Pneumonia",
    "Pneumothorax",
    "Support Devices",
)

REQUIRED_COLUMNS = {
    METADATA_STEM: ("dicom_id", "subject_id", "study_id", "ViewPosition"),
    SPLIT_STEM: ("dicom_id", "study_id", "subject_id", "split"),
    CHEXPERT_STEM: ("subject_id", "study_id", *CHEXPERT_LABELS),
}

_SAFE_DICOM_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def read_mimic_csv(root: str | Path, stem: str, required_columns: Sequence[str] | None = None) -> pd.DataFrame:
    """Read `<root>/<stem>.csv.gz` or `<root>/<stem>.csv`, checking the columns a MIMIC file must have.

    `required_columns` defaults to the known columns of the three MIMIC-CXR-JPG CSVs (see REQUIRED_COLUMNS).
    dicom_id is read as text, subject_id/study_id as integers; only blank cells are NaN (not "NA", "None").
    """
    root = Path(root)
    candidates = [root / f"{stem}.csv.gz", root / f"{stem}.csv"]
    csv_path = next((path for path in candidates if path.is_file()), None)
    if csv_path is None:
        raise FileNotFoundError(f"no {stem} table under {root}: expected {candidates[0]} or {candidates[1]}")
    try:
        table = pd.read_csv(csv_path, dtype={"dicom_id": str}, keep_default_na=False, na_values=[""])
    except (UnicodeDecodeError, pd.errors.ParserError, EOFError, OSError) as error:  # gzip errors are OSErrors
        raise ValueError(f"{csv_path} is not a readable UTF-8 CSV table: {error}") from error
    required = REQUIRED_COLUMNS.get(stem, ()) if required_columns is None else required_columns
    missing = [column for column in required if column not in table.columns]
    if missing:
        raise ValueError(f"{csv_path} lacks the required columns {missing}; it has {list(table.columns)}")
    for column in ("subject_id", "study_id"):
        if column in table.columns and not pd.api.types.is_integer_dtype(table[column]):
            raise ValueError(f"{csv_path}: column {column} must hold integer ids, got dtype {table[column].dtype}")
    if "dicom_id" in table.columns:
        unsafe = ~table["dicom_id"].str.fullmatch(_SAFE_DICOM_ID, na=False)
        if unsafe.any():
            row = int(np.flatnonzero(unsafe.to_numpy())[0])
            dicom_id = table["dicom_id"].iloc[row]
            raise ValueError(f"{csv_path} line {row + 2}: dicom_id {dicom_id!r} is not a plain file-name id")
    return table


def resolve_within_root(root: str | Path, relative_path: str, source: str) -> Path:
    """`root / relative_path` for a path read from a table, refusing absolute paths and `..` escapes.

    Containment is checked on the path as written, not after resolving links: a link the user placed inside the
    root (a `files/` that points to another disk, as on most clusters) is followed. `source` names where the
    path came from (file and row) for the error message.
    """
    if PurePosixPath(relative_path).anchor or PureWindowsPath(relative_path).anchor:
        raise ValueError(f"{source}: path {relative_path!r} must be relative to the dataset root")
    if ".." in PurePosixPath(relative_path.replace("\\", "/")).parts:
        raise ValueError(f"{source}: path {relative_path!r} escapes the dataset root {root} ('..')")
    return Path(root) / relative_path


def _study_folder(subject_id: int, study_id: int) -> PurePosixPath:
    return PurePosixPath("files", f"p{str(subject_id)[:2]}", f"p{subject_id}", f"s{study_id}")


def image_path(root: str | Path, subject_id: int, study_id: int, dicom_id: str) -> Path:
    """`<root>/files/p{first 2 digits}/p{subject}/s{study}/{dicom}.jpg`."""
    return Path(root) / _study_folder(subject_id, study_id) / f"{dicom_id}.jpg"


def report_path(root: str | Path, subject_id: int, study_id: int) -> Path:
    """`<root>/files/p{first 2 digits}/p{subject}/s{study}.txt` (one report per study)."""
    folder = _study_folder(subject_id, study_id)
    return Path(root) / folder.parent / f"{folder.name}.txt"


class ReportSource:
    """Study reports from an unpacked folder or from `mimic-cxr-reports.zip`.

    `location` may be the zip itself, a folder holding `mimic-cxr-reports.zip` (preferred when present),
    or a folder holding the unpacked `files/` tree. Zip members may sit under a top folder
    (`mimic-cxr-reports/files/...`); the zip's names are indexed once. Use as a context manager.
    """

    def __init__(self, location: str | Path):
        location = Path(location)
        if not location.exists():
            raise FileNotFoundError(f"reports location {location} does not exist")
        zip_path = location if location.is_file() else location / REPORTS_ZIP
        if zip_path.is_file() and not zipfile.is_zipfile(zip_path):
            raise ValueError(f"reports file {zip_path} is not a zip archive")
        self._folder: Path | None = None
        self._zip: zipfile.ZipFile | None = None
        self._members: dict[str, str] = {}
        if zip_path.is_file():
            self._zip = zipfile.ZipFile(zip_path)
            for name in self._zip.namelist():
                parts = PurePosixPath(name).parts
                if "files" in parts:
                    self._members["/".join(parts[parts.index("files") :])] = name
        else:
            self._folder = location

    def read(self, subject_id: int, study_id: int) -> str | None:
        """The study's report text, or None when the report is absent.

        Raises ReportDecodeError when the file is not UTF-8 text (see `decode_report`) or cannot be read.
        """
        relative = report_path("", subject_id, study_id).as_posix()
        if self._zip is not None:
            member = self._members.get(relative)
            if member is None:
                return None
            source = f"{self._zip.filename}:{member}"
            try:
                data = self._zip.read(member)
            except (zipfile.BadZipFile, OSError, EOFError) as error:  # a damaged member (bad CRC, truncated)
                raise ReportDecodeError(source, SKIP_UNREADABLE_REPORT, str(error)) from error
            return decode_report(data, source)
        path = self._folder / relative
        if not path.is_file():
            return None
        try:
            data = path.read_bytes()
        except OSError as error:
            raise ReportDecodeError(path, SKIP_UNREADABLE_REPORT, str(error)) from error
        return decode_report(data, str(path))

    def close(self) -> None:
        if self._zip is not None:
            self._zip.close()

    def __enter__(self) -> ReportSource:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


@dataclass
class MimicIndex:
    """The usable samples of one split/view selection, and what was skipped on the way.

    `samples` has one row per image: dicom_id, subject_id, study_id, view, split, image_path (under root,
    str), caption, and the CHEXPERT_LABELS columns (float; NaN = not mentioned, -1 uncertain).
    """

    root: Path
    split: str
    views: tuple[str, ...]
    samples: pd.DataFrame
    skipped: dict[str, int] = field(default_factory=dict)
    truncated_captions: int = 0
    max_caption_tokens: int | None = None

    def __len__(self) -> int:
        return len(self.samples)

    def summary(self) -> str:
        """One line, worded as prepare's and train.py's summaries: "train: 1,234 samples (PA/AP); skipped: 3
        missing image; 12 captions truncated to 77 tokens"."""
        parts = [f"{self.split}: {len(self):,} samples ({'/'.join(self.views)})"]
        parts.append(f"skipped: {describe_skips(self.skipped)}")
        if self.max_caption_tokens is not None:
            truncated = f"{self.truncated_captions:,} captions truncated to {self.max_caption_tokens} tokens"
            parts.append(truncated)
        return "; ".join(parts)


def _normalise_split(split: str) -> str:
    split = "validate" if split == "val" else split
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS} (or 'val'), got {split!r}")
    return split


def build_mimic_index(
    root: str | Path,
    reports_root: str | Path | None = None,
    views: Sequence[str] = ("PA", "AP"),
    split: str = "train",
    caption_section: CaptionSection = "impression",
    tokenizer: PreTrainedTokenizerBase | None = None,
    max_caption_tokens: int | None = None,
    check_images: bool = True,
) -> MimicIndex:
    """Join metadata, split and CheXpert labels, keep `split` and `views`, and attach each study's caption.

    Views match ViewPosition case-insensitively (an empty ViewPosition never matches). Each study's
    report is read once. Samples are skipped and counted when the JPG is absent (only if `check_images`),
    the report is absent, unreadable or not UTF-8 text (never trained on as garbled text), or the report gives
    an empty caption. With a tokenizer, captions are cut to
    `max_caption_tokens` (default: the tokenizer's model_max_length) and the samples with a cut caption
    counted. Reports come from `reports_root` (default `root`), unpacked or as `mimic-cxr-reports.zip`.
    Raises ValueError when no usable sample is left.
    """
    root = Path(root)
    split = _normalise_split(split)
    wanted_views = tuple(view.strip().upper() for view in views)
    if max_caption_tokens is not None and tokenizer is None:
        raise ValueError("max_caption_tokens needs a tokenizer to count tokens with")
    if tokenizer is not None and max_caption_tokens is None:
        max_caption_tokens = tokenizer.model_max_length

    metadata = read_mimic_csv(root, METADATA_STEM)[["dicom_id", "subject_id", "study_id", "ViewPosition"]]
    splits = read_mimic_csv(root, SPLIT_STEM)[["dicom_id", "subject_id", "study_id", "split"]]
    labels = read_mimic_csv(root, CHEXPERT_STEM)[["subject_id", "study_id", *CHEXPERT_LABELS]]
    if labels.duplicated(["subject_id", "study_id"]).any():
        raise ValueError(f"{CHEXPERT_STEM} under {root} has several rows for one (subject_id, study_id)")

    images = metadata.merge(splits, on=["dicom_id", "subject_id", "study_id"], how="inner")
    images["view"] = images.pop("ViewPosition").fillna("").astype(str).str.strip()
    images = images[(images["split"] == split) & images["view"].str.upper().isin(wanted_views)]
    images = images.merge(labels, on=["subject_id", "study_id"], how="left")
    images[list(CHEXPERT_LABELS)] = images[list(CHEXPERT_LABELS)].astype(float)

    skipped: Counter[str] = Counter()
    truncated = 0
    captions: dict[int, tuple[str | None, bool, str | None]] = {}  # study_id -> (caption, was_truncated, skip)
    keep = np.zeros(len(images), dtype=bool)
    image_paths: list[str] = []
    sample_captions: list[str] = []
    reports_location = root if reports_root is None else Path(reports_root)
    with ReportSource(reports_location) as reports:
        for position, (subject_id, study_id, dicom_id) in enumerate(
            images[["subject_id", "study_id", "dicom_id"]].itertuples(index=False)
        ):
            path = image_path(root, subject_id, study_id, dicom_id)
            if check_images and not path.is_file():
                skipped[SKIP_MISSING_IMAGE] += 1
                continue
            if study_id not in captions:
                captions[study_id] = _study_caption(
                    reports, subject_id, study_id, caption_section, tokenizer, max_caption_tokens
                )
            caption, was_truncated, skip_reason = captions[study_id]
            if skip_reason is not None:
                skipped[skip_reason] += 1
            else:
                keep[position] = True
                truncated += was_truncated
                image_paths.append(str(path))
                sample_captions.append(caption)

    samples = images[keep].reset_index(drop=True)
    samples.insert(5, "image_path", image_paths)
    samples.insert(6, "caption", sample_captions)
    index = MimicIndex(
        root=root,
        split=split,
        views=wanted_views,
        samples=samples,
        skipped=dict(skipped),
        truncated_captions=truncated,
        max_caption_tokens=max_caption_tokens,
    )
    if not len(index):
        raise ValueError(
            f"no usable MIMIC-CXR samples under {root} for split {split!r} and views {list(wanted_views)} "
            f"({len(images):,} images matched the split and views; reports from {reports_location}; "
            f"skipped: {dict(skipped) or 'none'})"
        )
    return index


def _study_caption(
    reports: ReportSource,
    subject_id: int,
    study_id: int,
    section: CaptionSection,
    tokenizer: PreTrainedTokenizerBase | None,
    max_tokens: int | None,
) -> tuple[str | None, bool, str | None]:
    """(caption, was_truncated, skip reason or None) of one study."""
    try:
        report = reports.read(subject_id, study_id)
    except ReportDecodeError as error:
        logger.warning("skipping the samples of study %s: %s", study_id, error)
        return None, False, error.reason
    if report is None:
        return None, False, SKIP_MISSING_REPORT
    caption = caption_from_report(report, section)
    if not caption:
        return None, False, SKIP_EMPTY_CAPTION
    if tokenizer is None:
        return caption, False, None
    caption, was_truncated = truncate_to_tokens(caption, tokenizer, max_tokens)
    return caption, was_truncated, None


class MimicCxrDataset(Dataset):
    """Model-ready samples of a MimicIndex: resized, centre-cropped, [-1, 1] pixels with their caption.

    `__getitem__` returns a SkippedSample (its dicom_id and why) for an image that is missing or cannot be
    decoded (see `load_grayscale_image`); `collate_skipping_bad` as the DataLoader's collate_fn drops those and
    passes them on to be counted.
    """

    def __init__(self, index: MimicIndex, resolution: int):
        self.resolution = resolution
        self.image_paths = index.samples["image_path"].tolist()
        self.captions = index.samples["caption"].tolist()
        self.dicom_ids = index.samples["dicom_id"].tolist()
        self.labels = torch.tensor(index.samples[list(CHEXPERT_LABELS)].to_numpy(dtype=np.float32))

    def __len__(self) -> int:
        return len(self.image_paths)

    def __getitem__(self, item: int) -> dict[str, Any] | SkippedSample:
        try:
            image = load_grayscale_image(self.image_paths[item])
        except UnreadableImageError as error:
            logger.warning("skipping sample %s: %s", self.dicom_ids[item], error)
            return SkippedSample(self.dicom_ids[item], error.reason)
        return {
            "pixel_values": to_model_tensor(resize_center_crop(image, self.resolution)),
            "caption": self.captions[item],
            "dicom_id": self.dicom_ids[item],
            "labels": self.labels[item],
        }


def collate_skipping_bad(batch: list[dict[str, Any] | SkippedSample]) -> dict[str, Any]:
    """Collate the usable samples of a batch; the dropped ones are listed under "skipped" (SkippedSample each,
    for a SkipLedger to count once per sample and reason) and counted under "num_skipped".

    When every sample was bad the batch has zero samples: `batch["pixel_values"].shape[0] == 0` and
    `batch["caption"] == []`; callers should skip such a batch (e.g. return None from training_step).
    """
    good = [sample for sample in batch if isinstance(sample, dict)]
    skipped = [SkippedSample(*sample) for sample in batch if not isinstance(sample, dict)]
    if good:
        collated = default_collate(good)
    else:
        collated = {
            "pixel_values": torch.empty(0, 3, 0, 0),
            "caption": [],
            "dicom_id": [],
            "labels": torch.empty(0, len(CHEXPERT_LABELS)),
        }
    collated["skipped"] = skipped
    collated["num_skipped"] = len(skipped)
    return collated
