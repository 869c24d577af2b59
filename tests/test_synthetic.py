"""The embedded synthetic dataset: exact MIMIC-CXR-JPG / MS-CXR formats, determinism, anatomy and findings."""

from __future__ import annotations

import csv
import gzip
import re
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from datamodules import synthetic
from datamodules.synthetic import ensure_synthetic_dataset, generate_synthetic_dataset, layout

# Column lists and query words as written in docs/data.md ("The formats read") and docs/method.md ("Attention
# capture for grounding"), not imported, so the test fails if the module drifts from the documented formats.
METADATA_COLUMNS = [
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
]
SPLIT_COLUMNS = ["dicom_id", "study_id", "subject_id", "split"]
CHEXPERT_COLUMNS = [
    "subject_id",
    "study_id",
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
]
MS_CXR_COLUMNS = [
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
    "split",
]
QUERY_WORDS = {
    "Atelectasis": ("atelectasis", "atelectatic"),
    "Cardiomegaly": ("cardiomegaly", "cardiac"),
    "Consolidation": ("consolidation", "consolidations", "consolidative"),
    "Edema": ("edema",),
    "Lung Opacity": ("opacity", "opacities", "opacification"),
    "Pleural Effusion": ("pleural", "effusion", "effusions"),
    "Pneumonia": ("pneumonia",),
    "Pneumothorax": ("pneumothorax", "pneumothoraces"),
}
RESOLUTION = 64


def read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", newline="") as file:
        reader = csv.DictReader(file)
        return list(reader.fieldnames or []), list(reader)


def all_files(root: Path) -> dict[str, bytes]:
    return {str(path.relative_to(root)): path.read_bytes() for path in sorted(root.rglob("*")) if path.is_file()}


def load_gray(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path), dtype=np.float64)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_synthetic_dataset(tmp_path_factory.mktemp("synthetic"), n=24, resolution=RESOLUTION, seed=7)


@pytest.fixture(scope="module")
def larger_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Enough studies that every MS-CXR category occurs several times."""
    return generate_synthetic_dataset(tmp_path_factory.mktemp("larger"), n=100, resolution=RESOLUTION, seed=3)


def frontal_images(root: Path) -> list[dict[str, str]]:
    _, metadata = read_csv(root / "mimic-cxr-2.0.0-metadata.csv.gz")
    return [row for row in metadata if row["ViewPosition"] in ("PA", "AP")]


def jpg_path(root: Path, row: dict[str, str]) -> Path:
    subject = row["subject_id"]
    return root / f"files/p{subject[:2]}/p{subject}/s{row['study_id']}/{row['dicom_id']}.jpg"


def test_same_seed_gives_identical_bytes_in_every_file(dataset: Path, tmp_path: Path) -> None:
    again = generate_synthetic_dataset(tmp_path / "again", n=24, resolution=RESOLUTION, seed=7)
    first, second = all_files(dataset), all_files(again)
    assert first.keys() == second.keys()
    assert [name for name in first if first[name] != second[name]] == []


def test_different_seed_gives_different_images(dataset: Path, tmp_path: Path) -> None:
    other = generate_synthetic_dataset(tmp_path / "other", n=24, resolution=RESOLUTION, seed=8)
    images = {data for name, data in all_files(dataset).items() if name.endswith(".jpg")}
    other_images = {data for name, data in all_files(other).items() if name.endswith(".jpg")}
    assert images.isdisjoint(other_images)


def test_csv_columns_are_exactly_the_documented_ones(dataset: Path) -> None:
    assert read_csv(dataset / "mimic-cxr-2.0.0-metadata.csv.gz")[0] == METADATA_COLUMNS
    assert read_csv(dataset / "mimic-cxr-2.0.0-split.csv.gz")[0] == SPLIT_COLUMNS
    assert read_csv(dataset / "mimic-cxr-2.0.0-chexpert.csv.gz")[0] == CHEXPERT_COLUMNS
    assert read_csv(dataset / "MS_CXR_Local_Alignment_v1.1.0.csv")[0] == MS_CXR_COLUMNS


def test_ids_paths_views_and_image_sizes_follow_mimic(dataset: Path) -> None:
    _, metadata = read_csv(dataset / "mimic-cxr-2.0.0-metadata.csv.gz")
    _, chexpert = read_csv(dataset / "mimic-cxr-2.0.0-chexpert.csv.gz")
    assert len(chexpert) == 24 and len({row["study_id"] for row in metadata}) == 24
    for row in metadata:
        assert re.fullmatch(r"1\d{7}", row["subject_id"]) and re.fullmatch(r"5\d{7}", row["study_id"])
        assert re.fullmatch(r"[0-9a-f]{8}(-[0-9a-f]{8}){4}", row["dicom_id"])
        width, height = Image.open(jpg_path(dataset, row)).size
        assert (int(row["Columns"]), int(row["Rows"])) == (width, height)
        assert width == RESOLUTION and RESOLUTION <= height <= round(1.2 * RESOLUTION)
        assert (dataset / f"files/p{row['subject_id'][:2]}/p{row['subject_id']}/s{row['study_id']}.txt").is_file()
    views_per_study = defaultdict(list)
    for row in metadata:
        views_per_study[row["study_id"]].append(row["ViewPosition"])
    assert all(sum(view in ("PA", "AP") for view in views) == 1 for views in views_per_study.values())
    all_views = [view for views in views_per_study.values() for view in views]
    assert {"PA", "AP", "LATERAL", ""} <= set(all_views)
    assert 1 <= all_views.count("") <= 2
    heights = {int(row["Rows"]) for row in metadata}
    assert len(heights) > 3  # the aspect ratio varies, so a centre crop downstream really crops


def test_split_is_by_subject_and_every_split_is_used(dataset: Path) -> None:
    _, splits = read_csv(dataset / "mimic-cxr-2.0.0-split.csv.gz")
    _, metadata = read_csv(dataset / "mimic-cxr-2.0.0-metadata.csv.gz")
    assert sorted(row["dicom_id"] for row in splits) == sorted(row["dicom_id"] for row in metadata)
    split_of_subject = defaultdict(set)
    for row in splits:
        split_of_subject[row["subject_id"]].add(row["split"])
    assert all(len(names) == 1 for names in split_of_subject.values())
    counts = {
        name: sum(names == {name} for names in split_of_subject.values()) for name in ("train", "validate", "test")
    }
    assert min(counts.values()) >= 1 and counts["train"] > counts["validate"] + counts["test"]


def test_ms_cxr_boxes_lie_inside_images_of_the_stated_size(dataset: Path) -> None:
    _, rows = read_csv(dataset / "MS_CXR_Local_Alignment_v1.1.0.csv")
    _, splits = read_csv(dataset / "mimic-cxr-2.0.0-split.csv.gz")
    split_of = {row["dicom_id"]: row["split"] for row in splits}
    frontal = {row["dicom_id"] for row in frontal_images(dataset)}
    assert rows
    for row in rows:
        width, height = Image.open(dataset / row["path"]).size
        assert (int(row["image_width"]), int(row["image_height"])) == (width, height)
        x, y, w, h = (int(row[key]) for key in "xywh")
        assert w > 0 and h > 0 and x >= 0 and y >= 0 and x + w <= width and y + h <= height
        assert row["dicom_id"] in frontal and row["path"].endswith(f"/{row['dicom_id']}.jpg")
        assert row["split"] == {"train": "train", "validate": "val", "test": "test"}[split_of[row["dicom_id"]]]


def test_reports_name_exactly_the_findings_that_have_boxes(dataset: Path) -> None:
    _, chexpert = read_csv(dataset / "mimic-cxr-2.0.0-chexpert.csv.gz")
    _, ms_cxr = read_csv(dataset / "MS_CXR_Local_Alignment_v1.1.0.csv")
    boxed = defaultdict(set)
    for row in ms_cxr:
        study_folder = row["path"].rsplit("/", 1)[0]
        report = (dataset / f"{study_folder}.txt").read_text()
        assert row["label_text"] in report
        assert any(word in row["label_text"].lower() for word in QUERY_WORDS[row["category_name"]])
        boxed[study_folder.rsplit("/s", 1)[1]].add(row["category_name"])
    impressions = 0
    for row in chexpert:
        positive = {category for category in QUERY_WORDS if row[category] == "1.0"}
        negated = {category for category in QUERY_WORDS if row[category] == "0.0"}
        assert positive == boxed.get(row["study_id"], set())
        assert not positive & negated
        assert (row["No Finding"] == "1.0") == (not positive)
        subject = row["subject_id"]
        report = (dataset / f"files/p{subject[:2]}/p{subject}/s{row['study_id']}.txt").read_text()
        assert "FINAL REPORT" in report and re.search(r"^ FINDINGS:", report, re.MULTILINE)
        impressions += bool(re.search(r"^ IMPRESSION:", report, re.MULTILINE))
    assert impressions >= 0.7 * len(chexpert)
    assert 0.2 <= sum(row["No Finding"] == "1.0" for row in chexpert) / len(chexpert) <= 0.6


def test_mediastinum_is_brighter_than_lungs_and_the_heart_bulges_to_the_image_right(dataset: Path) -> None:
    centre, lungs, heart_right, heart_left = [], [], [], []
    for row in frontal_images(dataset):
        image = load_gray(jpg_path(dataset, row))
        height, width = image.shape

        def region(u0: float, u1: float, v0: float, v1: float, image=image, height=height, width=width) -> float:
            return float(image[int(v0 * height) : int(v1 * height), int(u0 * width) : int(u1 * width)].mean())

        centre.append(region(0.46, 0.54, 0.3, 0.6))
        lungs.append((region(0.22, 0.32, 0.25, 0.5) + region(0.68, 0.78, 0.25, 0.5)) / 2)
        heart_right.append(region(0.6, 0.66, 0.52, 0.62))
        heart_left.append(region(0.34, 0.4, 0.52, 0.62))
    assert np.mean(centre) > np.mean(lungs) + 40
    assert np.mean(np.array(centre) > np.array(lungs)) >= 0.9
    assert np.mean(heart_right) > np.mean(heart_left) + 15  # patient's left = image right


def test_findings_change_the_pixels_inside_their_boxes(larger_dataset: Path) -> None:
    """Against the same relative box in normal images: brighter for opacities, darker for pneumothorax."""
    _, chexpert = read_csv(larger_dataset / "mimic-cxr-2.0.0-chexpert.csv.gz")
    normal_studies = {row["study_id"] for row in chexpert if row["No Finding"] == "1.0"}
    normals = [
        load_gray(jpg_path(larger_dataset, r))
        for r in frontal_images(larger_dataset)
        if r["study_id"] in normal_studies
    ]
    _, ms_cxr = read_csv(larger_dataset / "MS_CXR_Local_Alignment_v1.1.0.csv")
    differences = defaultdict(list)
    for row in ms_cxr:
        image = load_gray(larger_dataset / row["path"])
        x, y, w, h = (int(row[key]) for key in "xywh")
        inside = image[y : y + h, x : x + w].mean()
        reference = []
        for normal in normals:  # same width, the height varies: map the box rows relatively
            top, bottom = (round(value * normal.shape[0] / image.shape[0]) for value in (y, y + h))
            reference.append(normal[top : max(bottom, top + 1), x : x + w].mean())
        differences[row["category_name"]].append(inside - np.mean(reference))
    assert set(differences) == set(QUERY_WORDS)
    mean_difference = {category: np.mean(values) for category, values in differences.items()}
    assert mean_difference.pop("Pneumothorax") < -4
    assert min(mean_difference.values()) > 4, mean_difference


def test_ensure_generates_once_then_reuses_and_ignores_leftover_temp_folders(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    leftover = tmp_path / ".synthetic-n6-r32-s1.tmp-interrupted"
    leftover.mkdir()
    (leftover / "mimic-cxr-2.0.0-metadata.csv.gz").write_bytes(b"half")
    root = ensure_synthetic_dataset(tmp_path, n=6, resolution=32, seed=1)
    assert root == tmp_path / "synthetic-n6-r32-s1"
    assert len(read_csv(root / "mimic-cxr-2.0.0-chexpert.csv.gz")[1]) == 6
    assert not [path for path in tmp_path.iterdir() if path not in (root, leftover)]

    def must_not_run(*args: object, **kwargs: object) -> Path:
        raise AssertionError("a finished dataset was generated again")

    monkeypatch.setattr(synthetic, "generate_synthetic_dataset", must_not_run)
    assert ensure_synthetic_dataset(tmp_path, n=6, resolution=32, seed=1) == root


def test_interrupted_generation_leaves_no_finished_looking_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def interrupted(out_dir: Path, n: int, resolution: int, seed: int) -> Path:
        (Path(out_dir) / "mimic-cxr-2.0.0-metadata.csv.gz").write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(layout, "generate_synthetic_dataset", interrupted)
    with pytest.raises(KeyboardInterrupt):
        ensure_synthetic_dataset(tmp_path, n=6, resolution=32, seed=1)
    assert list(tmp_path.iterdir()) == []


def test_cli_writes_the_dataset_and_prints_a_summary(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    synthetic.main(["--out", str(tmp_path / "cli"), "--n", "10", "--resolution", "32", "--seed", "2"])
    summary = capsys.readouterr().out
    _, metadata = read_csv(tmp_path / "cli" / "mimic-cxr-2.0.0-metadata.csv.gz")
    assert len(summary.strip().splitlines()) == 1
    assert f"{len(metadata)} images" in summary and "10 studies" in summary and "Pneumothorax" in summary


@pytest.mark.parametrize(
    ("n", "resolution", "seed", "message"),
    [(2, 64, 0, "^n must"), (10, 16, 0, "^resolution must"), (10, 64, -1, "^seed must")],
)
def test_bad_arguments_are_rejected_by_name(tmp_path: Path, n: int, resolution: int, seed: int, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        generate_synthetic_dataset(tmp_path, n=n, resolution=resolution, seed=seed)
