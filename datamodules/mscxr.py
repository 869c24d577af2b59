"""MS-CXR phrase-grounding annotations (v1.0.0 and v1.1.0 CSVs) and their model-resolution samples.

One CSV row is one box; a phrase with several boxes spans several rows, not necessarily adjacent.
`read_ms_cxr` groups them into one `GroundingItem` per pair of the chosen pair set (`PAIR_SETS`): by default one
per (dicom_id, phrase); "reference" gives the rows the paper's code scored. `load_grounding_sample` puts the image
and its boxes through the same resize/crop (datamodules.transforms) and rasterises the ground-truth mask the
grounding metrics compare heatmaps against.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any, Literal

import pandas as pd
import torch

from datamodules.mimic import resolve_within_root
from datamodules.skips import SKIP_BOX_OUTSIDE_IMAGE, SkipLedger, SkippedSample
from datamodules.transforms import (
    Box,
    CropGeometry,
    box_mask,
    load_grayscale_image,
    resize_center_crop,
    to_model_tensor,
    transform_box,
)

MS_CXR_CATEGORIES = (
    "Atelectasis",
    "Cardiomegaly",
    "Consolidation",
    "Edema",
    "Lung Opacity",
    "Pleural Effusion",
    "Pneumonia",
    "Pneumothorax",
)
MS_CXR_COLUMNS = (
    "dicom_id",
    "category_name",
    "label_text",
    "path",
    "x",
    "y",
    "w",
    "h",
    "image_width",
    "image_height",
)
MS_CXR_SPLITS = ("train", "val", "test")
_VALIDATE = {"val", "validate"}
_SPLIT_ALIASES = {"train": {"train"}, "val": _VALIDATE, "validate": _VALIDATE, "test": {"test"}}
_NUMERIC_COLUMNS = {"x": False, "y": False, "w": True, "h": True, "image_width": True, "image_height": True}
INVALID_BOX_POLICIES = ("error", "skip")
InvalidBoxPolicy = Literal["error", "skip"]

PairSet = Literal["phrase", "reference"]
PAIR_SET_DESCRIPTIONS: dict[str, str] = {
    "phrase": "one per image and phrase (dicom_id, label_text), with all that phrase's boxes",
    "reference": "one per image and finding (dicom_id, category_name), with all that finding's boxes, kept when "
    "its rows carry one phrase that names the finding by a query word, as MischaD/chest-distillation (6ab790a) "
    "scored MS-CXR for its published rows",
}
PAIR_SETS = tuple(PAIR_SET_DESCRIPTIONS)
_GROUP_KEYS = {"phrase": ["dicom_id", "label_text"], "reference": ["dicom_id", "category_name"]}
_GROUP_AGREES_ON = ("path", "category_name", "image_width", "image_height", "split")  # less its group key

# The reference's query words as of 6ab790a (src/visualization/utils.py MIMIC_STRING_TO_ATTENTION), the table its
# MS-CXR filter used for the published rows. It is not grounding.token_selection.QUERY_WORDS: that follows the
# reference's later table (Consolidation + "consolidative", Pneumothorax + "pneumothoraces", Pneumonia without
# "opacity"/"opacities"), which would keep and drop other rows.
REFERENCE_FILTER_QUERY_WORDS: dict[str, tuple[str, ...]] = {
    "Atelectasis": ("atelectasis", "atelectatic"),
    "Cardiomegaly": ("cardiomegaly", "cardiac"),
    "Consolidation": ("consolidation", "consolidations"),
    "Edema": ("edema",),
    "Lung Opacity": ("opacity", "opacities", "opacification"),
    "Pleural Effusion": ("pleural", "effusion", "effusions"),
    "Pneumonia": ("opacities", "pneumonia", "opacity"),
    "Pneumothorax": ("pneumothorax",),
}
EXCLUDED_PHRASES_DIFFER = "its boxes carry different phrases"
EXCLUDED_NO_QUERY_WORD = "its phrase has no query word of its finding"


@dataclass
class GroundingItem:
    """One MS-CXR image-phrase pair with all its boxes (x, y, w, h in original-image pixels)."""

    dicom_id: str
    path: str
    category: str
    phrase: str
    boxes: list[Box]
    image_width: int
    image_height: int
    split: str | None


def _line(row: int) -> str:
    return f"line {row + 2}"  # the header is line 1


def read_ms_cxr(
    csv_path: str | Path,
    split: str | None = None,
    invalid_boxes: InvalidBoxPolicy = "error",
    skipped: SkipLedger | None = None,
    pairs: PairSet = "phrase",
    excluded: dict[str, list[str]] | None = None,
) -> list[GroundingItem]:
    """Read an MS-CXR CSV into one item per pair of the pair set `pairs`, in order of first appearance.

    ``pairs="phrase"``: one item per (dicom_id, label_text). ``pairs="reference"``: the rows
    MischaD/chest-distillation scored for its published values (6ab790a: `MimicCXRDatasetMSBBOX` over its table
    of one row per image and finding, each finding's boxes and phrases joined by "|", then
    `apply_filter_for_disease_in_txt`): one item per (dicom_id, category_name) holding all that finding's boxes,
    left out when its rows carry different phrases (`EXCLUDED_PHRASES_DIFFER`) or when its phrase, split on
    spaces, has no word containing a query word of its finding in the reference's table of that date
    (`REFERENCE_FILTER_QUERY_WORDS`, lower case; `EXCLUDED_NO_QUERY_WORD`). Left-out pairs are not bad data; with
    ``excluded`` given they are listed there, reason → ["<dicom_id> / <category>", ...].

    Accepts v1.0.0 (no split column; items get split None) and v1.1.0. `split` keeps only that split
    ("val" and "validate" are the same); filtering by split needs v1.1.0. Raises ValueError naming the
    file and line for missing columns, unknown categories, non-numeric or non-positive sizes, absolute
    or escaping paths, and rows of one pair that disagree on path, category, image size or split.
    A box not wholly inside its image_width x image_height cannot be right: with ``invalid_boxes="error"``
    it is a ValueError naming the line; with ``"skip"`` its row is dropped and recorded in ``skipped`` (id
    "<file> line N: <dicom_id>", reason "box outside its image"); a pair left without boxes is dropped.
    """
    if invalid_boxes not in INVALID_BOX_POLICIES:
        raise ValueError(f"grounding.invalid_boxes must be one of {INVALID_BOX_POLICIES}, got {invalid_boxes!r}")
    if pairs not in PAIR_SETS:
        raise ValueError(f"the MS-CXR pair set must be one of {PAIR_SETS}, got {pairs!r}")
    csv_path = Path(csv_path)
    text_columns = {"dicom_id": str, "category_name": str, "label_text": str, "path": str}
    try:
        table = pd.read_csv(csv_path, dtype=text_columns, keep_default_na=False, na_values=[""])
    except (UnicodeDecodeError, pd.errors.ParserError) as error:
        raise ValueError(f"{csv_path} is not a readable UTF-8 CSV table: {error}") from error
    missing = [column for column in MS_CXR_COLUMNS if column not in table.columns]
    if missing:
        raise ValueError(f"{csv_path} lacks the MS-CXR columns {missing}; it has {list(table.columns)}")
    has_split = "split" in table.columns
    if split is not None and not has_split:
        raise ValueError(f"{csv_path} has no split column (MS-CXR v1.0.0); read it with split=None")
    if split is not None and split not in _SPLIT_ALIASES:
        raise ValueError(f"split must be one of {MS_CXR_SPLITS} (or 'validate'), got {split!r}")
    if not has_split:
        table["split"] = None
    _validate_rows(table, csv_path)
    outside = _boxes_outside_their_image(table)
    if outside.any():
        rows = [int(row) for row in outside.to_numpy().nonzero()[0]]
        if invalid_boxes == "error":
            first = table.iloc[rows[0]]
            raise ValueError(
                f"{csv_path} {_line(rows[0])}: box x={first['x']}, y={first['y']}, w={first['w']}, h={first['h']} "
                f"is not inside its {first['image_width']} x {first['image_height']} image ({len(rows)} such rows; "
                "set grounding.invalid_boxes=skip to leave them out)"
            )
        if skipped is not None:
            dicom_ids = table["dicom_id"].to_numpy()
            ids = (f"{csv_path.name} {_line(row)}: {dicom_ids[row]}" for row in rows)
            skipped.add(SkippedSample(sample_id, SKIP_BOX_OUTSIDE_IMAGE) for sample_id in ids)
        table = table[~outside.to_numpy()]

    items: list[GroundingItem] = []
    key = _GROUP_KEYS[pairs]
    for (dicom_id, name), rows in table.groupby(key, sort=False):
        for column in _GROUP_AGREES_ON:
            if column not in key and rows[column].nunique(dropna=False) > 1:
                lines = ", ".join(_line(row) for row in rows.index)
                raise ValueError(
                    f"{csv_path} {lines}: the boxes of {dicom_id} / {name!r} disagree on {column} "
                    f"({sorted(map(str, rows[column].unique()))})"
                )
        first = rows.iloc[0]
        if split is not None and first["split"] not in _SPLIT_ALIASES[split]:
            continue
        if pairs == "reference":
            reason = _reference_exclusion(first["category_name"], list(rows["label_text"]))
            if reason is not None:
                if excluded is not None:
                    excluded.setdefault(reason, []).append(f"{dicom_id} / {first['category_name']}")
                continue
        items.append(
            GroundingItem(
                dicom_id=dicom_id,
                path=first["path"],
                category=first["category_name"],
                phrase=first["label_text"],
                boxes=[tuple(map(float, box)) for box in rows[["x", "y", "w", "h"]].itertuples(index=False)],
                image_width=int(first["image_width"]),
                image_height=int(first["image_height"]),
                split=first["split"],
            )
        )
    return items


def _reference_exclusion(category: str, phrases: list[str]) -> str | None:
    """Why the reference's filter leaves an image–finding row out (None: it keeps it). As the reference: phrases
    compared exactly; the phrase split on single spaces, a word kept when it contains a query word, lower-cased."""
    if len(set(phrases)) > 1:
        return EXCLUDED_PHRASES_DIFFER
    words = [word.lower() for word in phrases[0].split(" ")]
    if not any(query in word for query in REFERENCE_FILTER_QUERY_WORDS[category] for word in words):
        return EXCLUDED_NO_QUERY_WORD
    return None


def _boxes_outside_their_image(table: pd.DataFrame) -> pd.Series:
    """Rows whose box reaches outside [0, image_width] x [0, image_height] (sizes already checked numeric)."""
    x, y, w, h, width, height = (
        pd.to_numeric(table[column]) for column in ("x", "y", "w", "h", "image_width", "image_height")
    )
    return (x < 0) | (y < 0) | (x + w > width) | (y + h > height)


def _validate_rows(table: pd.DataFrame, csv_path: Path) -> None:
    for column in ("dicom_id", "label_text", "path"):
        blank = table[column].isna() | (table[column].astype(str).str.strip() == "")
        if blank.any():
            raise ValueError(f"{csv_path} {_line(int(blank.to_numpy().argmax()))}: {column} is empty")
    unknown = ~table["category_name"].isin(MS_CXR_CATEGORIES)
    if unknown.any():
        row = int(unknown.to_numpy().argmax())
        raise ValueError(
            f"{csv_path} {_line(row)}: category_name {table['category_name'].iloc[row]!r} is not one of "
            f"{list(MS_CXR_CATEGORIES)}"
        )
    for column, must_be_positive in _NUMERIC_COLUMNS.items():
        values = pd.to_numeric(table[column], errors="coerce")
        bad = values.isna() | (values <= 0) if must_be_positive else values.isna()
        if bad.any():
            row = int(bad.to_numpy().argmax())
            expected = "a number > 0" if must_be_positive else "a number"
            value = table[column].iloc[row]
            raise ValueError(f"{csv_path} {_line(row)}: {column} must be {expected}, got {str(value)!r}")
    for row, path in enumerate(table["path"]):
        if PurePosixPath(path).anchor or PureWindowsPath(path).anchor or ".." in PurePosixPath(path).parts:
            raise ValueError(f"{csv_path} {_line(row)}: path {path!r} must be relative, staying under the root")


def load_grounding_sample(
    item: GroundingItem, root: str | Path, resolution: int, mask_size: int | None = None
) -> dict[str, Any] | None:
    """The item's image and boxes at model resolution, and the ground-truth mask at `mask_size`^2.

    The image is `root / item.path`; a missing or undecodable one raises UnreadableImageError (with its reason)
    for the caller to skip and count. If the JPG's actual size differs from the CSV's image_width/height
    (e.g. a downscaled copy of MIMIC-CXR-JPG), the boxes are first scaled per axis by actual/declared
    size, so they keep naming the same anatomy. Boxes wholly cropped away are dropped and counted in
    "num_boxes_dropped"; when no box is left the item cannot be evaluated and None is returned.
    Returns {"pixel_values": 3 x R x R in [-1, 1], "boxes": n x 4 (x, y, w, h model pixels),
    "mask": bool mask_size x mask_size (default R), "phrase", "category", "dicom_id", "num_boxes_dropped"}.
    """
    path = resolve_within_root(root, item.path, f"MS-CXR item {item.dicom_id} / {item.phrase!r}")
    image = load_grayscale_image(path)
    geometry = CropGeometry.for_image(image.width, image.height, resolution)
    scale_x = image.width / item.image_width
    scale_y = image.height / item.image_height
    transformed = [
        transform_box(geometry, x * scale_x, y * scale_y, w * scale_x, h * scale_y) for x, y, w, h in item.boxes
    ]
    boxes = [box for box in transformed if box is not None]
    if not boxes:  # the CSV's boxes are inside the image, so only the transform's crop can have removed them
        return None
    return {
        "pixel_values": to_model_tensor(resize_center_crop(image, resolution)),
        "boxes": torch.tensor(boxes, dtype=torch.float32),
        "mask": box_mask(boxes, resolution, resolution if mask_size is None else mask_size),
        "phrase": item.phrase,
        "category": item.category,
        "dicom_id": item.dicom_id,
        "num_boxes_dropped": len(transformed) - len(boxes),
    }
