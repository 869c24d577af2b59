"""The MIMIC-CXR-JPG + reports reader on hand-made fixtures in the distributed layout."""

import gzip
import io
import math
import os
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from datamodules.mimic import (
    CHEXPERT_LABELS,
    CHEXPERT_STEM,
    METADATA_STEM,
    SPLIT_STEM,
    MimicCxrDataset,
    ReportSource,
    build_mimic_index,
    collate_skipping_bad,
    image_path,
    read_mimic_csv,
    report_path,
    resolve_within_root,
)
from datamodules.skips import SKIP_UNDECODABLE_IMAGE, SkippedSample

IMPRESSION_REPORT = "  FINAL REPORT\n FINDINGS:  Lungs clear.\n\n IMPRESSION:\n  No acute\n  process.\n"
FINDINGS_REPORT = "  FINAL REPORT\n FINDINGS:\n  Mild   cardiomegaly.\n"
EMPTY_REPORT = "  FINAL REPORT\n\n IMPRESSION:\n\n"
LONG_REPORT = "IMPRESSION: " + "small left effusion " * 10

# subject, study, dicom, view, split, image ("ok" | "missing" | "corrupt" | "truncated"), report (None: absent)
IMAGES = [
    (10000032, 50000001, "d1", "PA", "train", "ok", IMPRESSION_REPORT),
    (10000032, 50000001, "d2", "LATERAL", "train", "ok", IMPRESSION_REPORT),
    (10000033, 50000002, "d3", "AP", "train", "ok", FINDINGS_REPORT),
    (10000033, 50000002, "d3b", "ap", "train", "ok", FINDINGS_REPORT),
    (11000034, 50000003, "d4", "", "train", "ok", IMPRESSION_REPORT),
    (11000034, 50000004, "d5", "PA", "validate", "ok", LONG_REPORT),
    (12000035, 50000005, "d6", "PA", "train", "missing", IMPRESSION_REPORT),
    (12000035, 50000006, "d7", "PA", "train", "ok", None),
    (12000036, 50000007, "d8", "PA", "train", "ok", EMPTY_REPORT),
    (12000036, 50000008, "d9", "PA", "train", "corrupt", IMPRESSION_REPORT),
    (12000036, 50000009, "d10", "PA", "test", "truncated", IMPRESSION_REPORT),
]
# Study 50000002 has blanks (not mentioned); study 50000008 has no CheXpert row at all.
CHEXPERT_ROWS = {
    50000001: ["1.0", "0.0", "-1.0"] + ["1.0"] * 11,
    50000002: ["", "1.0", ""] + ["0.0"] * 11,
}


def _jpeg_bytes(width: int, height: int) -> bytes:
    gradient = np.tile(np.linspace(0, 255, width, dtype=np.uint8), (height, 1))
    buffer = io.BytesIO()
    Image.fromarray(gradient, mode="L").save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def _write_csv(root: Path, stem: str, header: list[str], rows: list[list], gzipped: bool) -> None:
    text = ",".join(header) + "\n" + "".join(",".join(str(value) for value in row) + "\n" for row in rows)
    if gzipped:
        (root / f"{stem}.csv.gz").write_bytes(gzip.compress(text.encode()))
    else:
        (root / f"{stem}.csv").write_text(text)


def make_mimic(root: Path, gzipped=(True, True, True), reports_root: Path | None = None) -> Path:
    """Write the IMAGES fixture in the MIMIC-CXR-JPG layout; reports under `reports_root` (default: root)."""
    reports_root = root if reports_root is None else reports_root
    for subject, study, dicom, _, _, image, report in IMAGES:
        path = image_path(root, subject, study, dicom)
        path.parent.mkdir(parents=True, exist_ok=True)
        if image == "ok":
            path.write_bytes(_jpeg_bytes(40, 60))
        elif image == "corrupt":
            path.write_bytes(np.random.default_rng(0).integers(0, 256, 500, dtype=np.uint8).tobytes())
        elif image == "truncated":
            path.write_bytes(_jpeg_bytes(40, 60)[:300])
        if report is not None:
            text_path = report_path(reports_root, subject, study)
            text_path.parent.mkdir(parents=True, exist_ok=True)
            text_path.write_text(report)
    metadata_header = ["dicom_id", "subject_id", "study_id", "PerformedProcedureStepDescription", "ViewPosition"]
    metadata_rows = [[dicom, subject, study, "CHEST (PA AND LAT)", view] for subject, study, dicom, view, *_ in IMAGES]
    split_rows = [[dicom, study, subject, split] for subject, study, dicom, _, split, *_ in IMAGES]
    chexpert_rows = [
        [subject, study, *CHEXPERT_ROWS[study]]
        for subject, study, *_ in dict.fromkeys((s, t) for s, t, *_ in IMAGES)
        if study in CHEXPERT_ROWS
    ]
    _write_csv(root, METADATA_STEM, metadata_header, metadata_rows, gzipped[0])
    _write_csv(root, SPLIT_STEM, ["dicom_id", "study_id", "subject_id", "split"], split_rows, gzipped[1])
    _write_csv(root, CHEXPERT_STEM, ["subject_id", "study_id", *CHEXPERT_LABELS], chexpert_rows, gzipped[2])
    return root


@pytest.fixture
def mimic_root(tmp_path):
    return make_mimic(tmp_path / "mimic")


def _word_tokenizer() -> PreTrainedTokenizerFast:
    words = ["[UNK]", "[CLS]", "[SEP]", "small", "left", "effusion"]
    backend = Tokenizer(models.WordLevel({word: i for i, word in enumerate(words)}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 1), ("[SEP]", 2)]
    )
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]")


def test_paths_follow_the_distributed_layout(tmp_path):
    assert image_path(tmp_path, 10000032, 50414267, "02aa804e") == (
        tmp_path / "files/p10/p10000032/s50414267/02aa804e.jpg"
    )
    assert report_path(tmp_path, 10000032, 50414267) == tmp_path / "files/p10/p10000032/s50414267.txt"


@pytest.mark.parametrize("gzipped", [(True, True, True), (False, False, False), (True, False, True)])
def test_gzipped_and_plain_csvs_give_the_same_index(tmp_path, gzipped):
    index = build_mimic_index(make_mimic(tmp_path, gzipped=gzipped))
    assert index.samples["dicom_id"].tolist() == ["d1", "d3", "d3b", "d9"]


def test_missing_csv_names_both_candidates_and_the_root(tmp_path):
    with pytest.raises(FileNotFoundError) as error:
        read_mimic_csv(tmp_path, METADATA_STEM)
    message = str(error.value)
    assert str(tmp_path / f"{METADATA_STEM}.csv.gz") in message
    assert message.endswith(str(tmp_path / f"{METADATA_STEM}.csv"))


def test_missing_columns_name_the_file_and_the_columns(tmp_path):
    _write_csv(tmp_path, SPLIT_STEM, ["dicom_id", "study_id"], [["d1", 1]], gzipped=False)
    with pytest.raises(ValueError, match=r"split\.csv.*\['subject_id', 'split'\]"):
        read_mimic_csv(tmp_path, SPLIT_STEM)


def test_unsafe_dicom_id_is_refused_with_file_and_line(tmp_path):
    rows = [["d1", 10000032, 50000001, "PA"], ["../../etc/passwd", 10000032, 50000001, "PA"]]
    _write_csv(tmp_path, METADATA_STEM, ["dicom_id", "subject_id", "study_id", "ViewPosition"], rows, False)
    with pytest.raises(ValueError, match=r"metadata\.csv line 3: dicom_id '\.\./\.\./etc/passwd'"):
        read_mimic_csv(tmp_path, METADATA_STEM)


def test_duplicate_chexpert_rows_are_refused(mimic_root):
    (mimic_root / f"{CHEXPERT_STEM}.csv.gz").unlink()
    row = [10000032, 50000001, *CHEXPERT_ROWS[50000001]]
    _write_csv(mimic_root, CHEXPERT_STEM, ["subject_id", "study_id", *CHEXPERT_LABELS], [row, row], gzipped=False)
    with pytest.raises(ValueError, match="several rows for one"):
        build_mimic_index(mimic_root)


def test_views_and_split_filter(mimic_root):
    assert build_mimic_index(mimic_root, split="validate").samples["dicom_id"].tolist() == ["d5"]
    assert build_mimic_index(mimic_root, split="val").samples["dicom_id"].tolist() == ["d5"]
    lateral = build_mimic_index(mimic_root, views=("lateral",))
    assert lateral.samples["dicom_id"].tolist() == ["d2"]
    with pytest.raises(ValueError, match="split must be one of"):
        build_mimic_index(mimic_root, split="training")


def test_skips_are_counted_and_summarised(mimic_root):
    index = build_mimic_index(mimic_root)
    assert index.skipped == {"missing image": 1, "missing report": 1, "empty caption": 1}
    summary = index.summary()
    assert summary.startswith("train: 4 samples")
    assert "1 missing image" in summary and "1 missing report" in summary and "1 empty caption" in summary
    unchecked = build_mimic_index(mimic_root, check_images=False)
    assert "d6" in unchecked.samples["dicom_id"].tolist() and "missing image" not in unchecked.skipped


def test_captions_and_labels_are_joined_per_study(mimic_root):
    samples = build_mimic_index(mimic_root).samples.set_index("dicom_id")
    assert samples.loc["d1", "caption"] == "No acute process."
    assert samples.loc["d3", "caption"] == samples.loc["d3b", "caption"] == "Mild cardiomegaly."
    assert samples.loc["d1", "image_path"] == str(image_path(mimic_root, 10000032, 50000001, "d1"))
    assert samples.loc["d1", list(CHEXPERT_LABELS[:3])].tolist() == [1.0, 0.0, -1.0]
    assert math.isnan(samples.loc["d3", "Atelectasis"]) and samples.loc["d3", "Cardiomegaly"] == 1.0
    assert samples.loc["d9", list(CHEXPERT_LABELS)].isna().all()  # study without a CheXpert row


def test_each_study_report_is_read_once(mimic_root, monkeypatch):
    studies_read = []
    original_read = ReportSource.read

    def counting_read(self, subject_id, study_id):
        studies_read.append(study_id)
        return original_read(self, subject_id, study_id)

    monkeypatch.setattr(ReportSource, "read", counting_read)
    build_mimic_index(mimic_root)
    assert sorted(studies_read) == [50000001, 50000002, 50000006, 50000007, 50000008]


def test_reports_from_a_zip_under_another_root(tmp_path):
    unpacked = tmp_path / "unpacked-reports"
    root = make_mimic(tmp_path / "jpg", reports_root=unpacked)
    reports_dir = tmp_path / "mimic-cxr"
    reports_dir.mkdir()
    with zipfile.ZipFile(reports_dir / "mimic-cxr-reports.zip", "w") as archive:
        for text_path in sorted(unpacked.rglob("*.txt")):
            archive.write(text_path, f"mimic-cxr-reports/{text_path.relative_to(unpacked).as_posix()}")
    from_folder = build_mimic_index(root, reports_root=unpacked)
    from_zip = build_mimic_index(root, reports_root=reports_dir)
    from_zip_file = build_mimic_index(root, reports_root=reports_dir / "mimic-cxr-reports.zip")
    assert from_zip.samples["caption"].tolist() == from_folder.samples["caption"].tolist()
    expected = ["No acute process.", "Mild cardiomegaly.", "Mild cardiomegaly.", "No acute process."]
    assert from_zip_file.samples["caption"].tolist() == expected
    assert from_zip.skipped == from_folder.skipped


def test_zero_usable_samples_names_root_split_views_and_skips(tmp_path, mimic_root):
    empty_reports = tmp_path / "no-reports"
    empty_reports.mkdir()
    with pytest.raises(ValueError) as error:
        build_mimic_index(mimic_root, reports_root=empty_reports)
    message = str(error.value)
    assert str(mimic_root) in message and "'train'" in message and "['PA', 'AP']" in message
    assert "'missing report': 6" in message and "'missing image': 1" in message
    assert f"reports from {empty_reports}" in message


def test_long_captions_are_truncated_and_counted(mimic_root):
    index = build_mimic_index(mimic_root, split="validate", tokenizer=_word_tokenizer(), max_caption_tokens=8)
    assert index.samples["caption"].tolist() == ["small left effusion small left effusion"]
    assert index.truncated_captions == 1
    assert index.summary().endswith("1 captions truncated to 8 tokens")
    # Counted per sample: the two images of study 50000002 both carry the cut caption.
    train = build_mimic_index(mimic_root, tokenizer=_word_tokenizer(), max_caption_tokens=4)
    assert train.samples["caption"].tolist() == ["No acute", "Mild cardiomegaly", "Mild cardiomegaly", "No acute"]
    assert train.truncated_captions == 4


def test_dataset_item_is_model_ready(mimic_root):
    dataset = MimicCxrDataset(build_mimic_index(mimic_root), resolution=32)
    item = dataset[0]
    assert item["pixel_values"].shape == (3, 32, 32) and item["pixel_values"].dtype == torch.float32
    assert item["pixel_values"].min() >= -1 and item["pixel_values"].max() <= 1
    assert item["pixel_values"].min() < -0.5 and item["pixel_values"].max() > 0.5  # the gradient survives
    assert item["caption"] == "No acute process." and item["dicom_id"] == "d1"
    assert item["labels"].shape == (len(CHEXPERT_LABELS),) and item["labels"][2] == -1.0


def test_undecodable_jpegs_are_dropped_and_counted(mimic_root):
    train = MimicCxrDataset(build_mimic_index(mimic_root), resolution=16)
    test = MimicCxrDataset(build_mimic_index(mimic_root, split="test"), resolution=16)
    corrupt, truncated = train[3], test[0]
    assert corrupt == SkippedSample("d9", SKIP_UNDECODABLE_IMAGE)
    assert truncated == SkippedSample("d10", SKIP_UNDECODABLE_IMAGE)
    batch = collate_skipping_bad([train[0], corrupt, train[1], truncated])
    assert batch["num_skipped"] == 2 and batch["dicom_id"] == ["d1", "d3"]
    assert batch["skipped"] == [corrupt, truncated]
    assert batch["pixel_values"].shape == (2, 3, 16, 16) and batch["labels"].shape == (2, 14)
    assert torch.isnan(batch["labels"][1, 0])
    all_bad = collate_skipping_bad([corrupt, truncated])
    assert all_bad["num_skipped"] == 2 and all_bad["pixel_values"].shape[0] == 0 and all_bad["caption"] == []


def test_table_paths_escaping_the_root_are_refused_but_links_inside_it_are_followed(tmp_path):
    root = tmp_path / "root"
    (root / "files").mkdir(parents=True)
    assert resolve_within_root(root, "files/x.jpg", "t.csv line 2") == root / "files/x.jpg"
    for bad in ("../outside.jpg", "files/../../outside.jpg", "files/a/../b.jpg", "/etc/passwd", "C:\\x.jpg", "..\\x"):
        with pytest.raises(ValueError, match="t.csv line 2"):
            resolve_within_root(root, bad, "t.csv line 2")
    (tmp_path / "other-disk").mkdir()
    (tmp_path / "other-disk" / "x.jpg").write_bytes(b"pixels")
    os.symlink(tmp_path / "other-disk", root / "files" / "link")  # the user's own link: followed
    assert resolve_within_root(root, "files/link/x.jpg", "t.csv line 2").read_bytes() == b"pixels"
