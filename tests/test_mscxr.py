"""MS-CXR CSV reading (v1.0.0 / v1.1.0, grouping, validation) and model-resolution grounding samples."""

from pathlib import Path

import pytest
import torch
from PIL import Image

from datamodules.mscxr import (
    EXCLUDED_NO_QUERY_WORD,
    EXCLUDED_PHRASES_DIFFER,
    GroundingItem,
    load_grounding_sample,
    read_ms_cxr,
)

HEADER = "dicom_id,category_name,label_text,path,x,y,w,h,image_width,image_height"
PATH_A = "files/p10/p10000032/s50000001/a.jpg"
PATH_B = "files/p11/p11000001/s50000002/b.jpg"
# Two boxes of the effusion phrase on "a" are separated by another image's row.
ROWS = [
    f"a,Pleural Effusion,Small left effusion,{PATH_A},50,100,100,50,200,300",
    f"b,Cardiomegaly,Enlarged heart,{PATH_B},10,20,30,40,300,200",
    f"a,Pleural Effusion,Small left effusion,{PATH_A},0,0,40,40,200,300",
    f"a,Pneumothorax,Left apical pneumothorax,{PATH_A},60,120,20,20,200,300",
]


def _write(tmp_path: Path, lines: list[str], name="MS_CXR_Local_Alignment_v1.0.0.csv") -> Path:
    csv_path = tmp_path / name
    csv_path.write_text("\n".join(lines) + "\n")
    return csv_path


def _v110(tmp_path: Path, splits=("train", "test", "train", "validate")) -> Path:
    lines = [HEADER + ",split"] + [f"{row},{split}" for row, split in zip(ROWS, splits, strict=True)]
    return _write(tmp_path, lines, "MS_CXR_Local_Alignment_v1.1.0.csv")


def test_v100_groups_non_adjacent_boxes_of_one_phrase(tmp_path):
    items = read_ms_cxr(_write(tmp_path, [HEADER, *ROWS]))
    assert [(item.dicom_id, item.phrase) for item in items] == [
        ("a", "Small left effusion"),
        ("b", "Enlarged heart"),
        ("a", "Left apical pneumothorax"),
    ]
    assert items[0] == GroundingItem(
        dicom_id="a",
        path=PATH_A,
        category="Pleural Effusion",
        phrase="Small left effusion",
        boxes=[(50.0, 100.0, 100.0, 50.0), (0.0, 0.0, 40.0, 40.0)],
        image_width=200,
        image_height=300,
        split=None,
    )


def test_v110_split_filter_accepts_val_and_validate(tmp_path):
    csv_path = _v110(tmp_path)
    assert [item.split for item in read_ms_cxr(csv_path)] == ["train", "test", "validate"]
    assert [item.phrase for item in read_ms_cxr(csv_path, split="train")] == ["Small left effusion"]
    assert [item.phrase for item in read_ms_cxr(csv_path, split="val")] == ["Left apical pneumothorax"]
    assert [item.phrase for item in read_ms_cxr(csv_path, split="validate")] == ["Left apical pneumothorax"]


def test_split_filter_needs_v110(tmp_path):
    with pytest.raises(ValueError, match="no split column"):
        read_ms_cxr(_write(tmp_path, [HEADER, *ROWS]), split="test")


def test_missing_columns_name_the_file(tmp_path):
    csv_path = _write(tmp_path, ["dicom_id,category_name,label_text,path,x,y", "a,Edema,edema,f.jpg,1,2"])
    with pytest.raises(ValueError, match=r"v1\.0\.0\.csv lacks the MS-CXR columns \['w', 'h', 'image_width'"):
        read_ms_cxr(csv_path)


def test_unknown_category_names_line_and_value(tmp_path):
    bad = f"c,Nodule,Small nodule,{PATH_A},1,1,5,5,200,300"
    with pytest.raises(ValueError, match=r"line 4: category_name 'Nodule'"):
        read_ms_cxr(_write(tmp_path, [HEADER, *ROWS[:2], bad]))


@pytest.mark.parametrize("path", ["../outside/a.jpg", "files/../../a.jpg", "/data/files/a.jpg"])
def test_paths_escaping_the_root_are_refused(tmp_path, path):
    with pytest.raises(ValueError, match=r"line 3: path .* must be relative"):
        read_ms_cxr(_write(tmp_path, [HEADER, ROWS[0], f"c,Edema,Mild edema,{path},1,1,5,5,200,300"]))


def test_non_positive_box_size_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"line 2: w must be a number > 0, got '0'"):
        read_ms_cxr(_write(tmp_path, [HEADER, f"c,Edema,Mild edema,{PATH_A},1,1,0,5,200,300"]))


def test_rows_of_one_phrase_must_agree(tmp_path):
    other_size = f"a,Pleural Effusion,Small left effusion,{PATH_A},0,0,40,40,400,600"
    with pytest.raises(ValueError, match=r"line 2, line 4: .* disagree on image_width"):
        read_ms_cxr(_write(tmp_path, [HEADER, ROWS[0], ROWS[1], other_size]))


def _save_image(root: Path, relative: str, width: int, height: int) -> None:
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("L", (width, height), 128).save(path)


def test_sample_transforms_boxes_and_counts_the_cropped_one(tmp_path):
    item = read_ms_cxr(_write(tmp_path, [HEADER, *ROWS]))[0]
    _save_image(tmp_path, PATH_A, 200, 300)
    sample = load_grounding_sample(item, tmp_path, resolution=64, mask_size=32)
    assert sample["pixel_values"].shape == (3, 64, 64)
    # 200x300 -> 64x96, crop_top 16: (50, 100, 100, 50) -> (16, 16, 32, 16); (0, 0, 40, 40) lies above the crop.
    assert torch.allclose(sample["boxes"], torch.tensor([[16.0, 16.0, 32.0, 16.0]]))
    assert sample["num_boxes_dropped"] == 1
    expected = torch.zeros(32, 32, dtype=torch.bool)
    expected[8:16, 8:24] = True
    assert torch.equal(sample["mask"], expected)
    assert (sample["phrase"], sample["category"], sample["dicom_id"]) == (
        "Small left effusion",
        "Pleural Effusion",
        "a",
    )


def test_boxes_follow_a_downscaled_image(tmp_path):
    item = read_ms_cxr(_write(tmp_path, [HEADER, *ROWS]))[0]
    _save_image(tmp_path, PATH_A, 100, 150)  # half the size the CSV declares
    sample = load_grounding_sample(item, tmp_path, resolution=64)
    assert torch.allclose(sample["boxes"], torch.tensor([[16.0, 16.0, 32.0, 16.0]]))
    assert sample["mask"].shape == (64, 64) and sample["mask"].sum() == 32 * 16


def test_item_with_every_box_cropped_away_gives_none(tmp_path):
    item = GroundingItem("a", PATH_A, "Edema", "Edema at the apex", [(0, 0, 40, 40)], 200, 300, None)
    _save_image(tmp_path, PATH_A, 200, 300)
    assert load_grounding_sample(item, tmp_path, resolution=64) is None


def test_loading_refuses_a_path_outside_the_root(tmp_path):
    item = GroundingItem("a", "../a.jpg", "Edema", "Edema", [(0, 0, 40, 40)], 200, 300, None)
    with pytest.raises(ValueError, match="escapes the dataset root"):
        load_grounding_sample(item, tmp_path / "root", resolution=64)


# ------------------------------------------------------------------------------------ the reference's pair set
# MischaD/chest-distillation (6ab790a) scored one row per image and finding: all that finding's boxes, kept when its
# rows carry one phrase and that phrase, split on spaces, has a word containing a query word of its finding in the
# reference's table of that date (src/visualization/utils.py), e.g. Pneumonia: opacities, pneumonia, opacity;
# Consolidation: consolidation, consolidations (no "consolidative"). Images 200 x 300; every box survives the crop.
REFERENCE_ROWS = [
    "a,Pleural Effusion,Small left effusion,files/p10/p10000001/s50000001/a.jpg,25,75,50,50,200,300",
    "b,Cardiomegaly,Enlarged heart,files/p10/p10000002/s50000002/b.jpg,50,100,100,75,200,300",
    "a,Pleural Effusion,Small left effusion,files/p10/p10000001/s50000001/a.jpg,125,175,50,75,200,300",
    "a,Pneumothorax,Left apical pneumothorax,files/p10/p10000001/s50000001/a.jpg,100,75,50,25,200,300",
    "c,Pneumonia,Patchy opacity in the right base,files/p10/p10000003/s50000003/c.jpg,25,125,75,75,200,300",
    "c,Consolidation,Consolidative changes,files/p10/p10000003/s50000003/c.jpg,100,125,75,75,200,300",
    "d,Atelectasis,Bibasilar atelectasis,files/p10/p10000004/s50000004/d.jpg,25,200,75,25,200,300",
    "d,Atelectasis,Left basilar atelectatic changes,files/p10/p10000004/s50000004/d.jpg,100,200,75,25,200,300",
    'e,Lung Opacity,"OPACITY, left lower lobe",files/p10/p10000005/s50000005/e.jpg,25,100,50,100,200,300',
]
REFERENCE_PAIRS = [  # (dicom_id, category, phrase, boxes), in order of first appearance
    ("a", "Pleural Effusion", "Small left effusion", [(25.0, 75.0, 50.0, 50.0), (125.0, 175.0, 50.0, 75.0)]),
    ("a", "Pneumothorax", "Left apical pneumothorax", [(100.0, 75.0, 50.0, 25.0)]),
    ("c", "Pneumonia", "Patchy opacity in the right base", [(25.0, 125.0, 75.0, 75.0)]),  # "opacity": a 6ab790a word
    ("e", "Lung Opacity", "OPACITY, left lower lobe", [(25.0, 100.0, 50.0, 100.0)]),  # lower-cased, comma kept
]
REFERENCE_EXCLUDED = {
    EXCLUDED_NO_QUERY_WORD: ["b / Cardiomegaly", "c / Consolidation"],
    EXCLUDED_PHRASES_DIFFER: ["d / Atelectasis"],
}


def write_reference_csv(folder: Path) -> Path:
    """The hand-written MS-CXR v1.0.0 CSV above (shared with the end-to-end test of evaluate.py grounding)."""
    return _write(folder, [HEADER, *REFERENCE_ROWS])


def test_reference_pairs_group_by_image_and_finding_and_filter_as_the_reference(tmp_path):
    excluded = {}
    items = read_ms_cxr(write_reference_csv(tmp_path), pairs="reference", excluded=excluded)
    assert [(item.dicom_id, item.category, item.phrase, item.boxes) for item in items] == REFERENCE_PAIRS
    assert items[0].path == "files/p10/p10000001/s50000001/a.jpg" and items[0].split is None
    assert (items[0].image_width, items[0].image_height) == (200, 300)
    assert excluded == REFERENCE_EXCLUDED


def test_phrase_pairs_stay_the_default_on_the_same_csv(tmp_path):
    csv_path = write_reference_csv(tmp_path)
    excluded = {}
    items = read_ms_cxr(csv_path, excluded=excluded)
    assert items == read_ms_cxr(csv_path, pairs="phrase")
    assert [(item.dicom_id, item.phrase) for item in items] == [
        ("a", "Small left effusion"),
        ("b", "Enlarged heart"),
        ("a", "Left apical pneumothorax"),
        ("c", "Patchy opacity in the right base"),
        ("c", "Consolidative changes"),
        ("d", "Bibasilar atelectasis"),
        ("d", "Left basilar atelectatic changes"),
        ("e", "OPACITY, left lower lobe"),
    ]
    assert excluded == {}  # the phrase pair set leaves nothing out


def test_reference_pairs_take_the_split_before_filtering(tmp_path):
    splits = ["test", "train", "test", "test", "train", "train", "test", "test", "test"]
    lines = [HEADER + ",split"] + [f"{row},{split}" for row, split in zip(REFERENCE_ROWS, splits, strict=True)]
    excluded = {}
    items = read_ms_cxr(_write(tmp_path, lines), "test", pairs="reference", excluded=excluded)
    assert [(item.dicom_id, item.category) for item in items] == [
        ("a", "Pleural Effusion"),
        ("a", "Pneumothorax"),
        ("e", "Lung Opacity"),
    ]
    assert excluded == {EXCLUDED_PHRASES_DIFFER: ["d / Atelectasis"]}


def test_rows_of_one_image_and_finding_must_agree_on_the_image(tmp_path):
    moved = REFERENCE_ROWS[2].replace("s50000001/a.jpg", "s50000009/a.jpg")
    with pytest.raises(ValueError, match=r"line 2, line 3: the boxes of a / 'Pleural Effusion' disagree on path"):
        read_ms_cxr(_write(tmp_path, [HEADER, REFERENCE_ROWS[0], moved]), pairs="reference")


def test_an_unknown_pair_set_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"pair set must be one of \('phrase', 'reference'\), got 'finding'"):
        read_ms_cxr(write_reference_csv(tmp_path), pairs="finding")
