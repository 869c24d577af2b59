"""Known-answer tests for the phrase-grounding localization metrics and their torchmetrics aggregator."""

import math

import pytest
import torch

from metrics.grounding_conventions import convention_scores
from metrics.grounding_metrics import MS_CXR_CATEGORIES, PhraseGroundingMetrics
from metrics.localization import (
    cnr,
    fit_gmm,
    iou,
    iou_at_threshold,
    miou_fg_bg,
    normalize_heatmap,
    pixel_auc,
    pointing_game,
    remove_isolated_pixels,
)


def box_mask(height: int, width: int, top: int, left: int, box_height: int, box_width: int) -> torch.Tensor:
    mask = torch.zeros(height, width, dtype=torch.bool)
    mask[top : top + box_height, left : left + box_width] = True
    return mask


def localization_scores(p: torch.Tensor, gt: torch.Tensor, thresholds=(0.3, 0.5)) -> dict[str, float]:
    """Our convention's scores of one pair, unprefixed."""
    scores = convention_scores(p, gt, ("method",), thresholds)
    return {name.removeprefix("method/"): value for name, value in scores.items()}


def blob(height: int, width: int, row: float, col: float, sigma: float = 2.0) -> torch.Tensor:
    rows = torch.arange(height, dtype=torch.float64)[:, None]
    cols = torch.arange(width, dtype=torch.float64)[None, :]
    return torch.exp(-((rows - row) ** 2 + (cols - col) ** 2) / (2 * sigma**2))


# --- normalisation and the GMM threshold -------------------------------------------------------------


def test_normalize_heatmap_maps_to_unit_range_and_constant_to_zeros():
    p = torch.tensor([[2.0, 4.0], [6.0, 10.0]])
    assert torch.allclose(normalize_heatmap(p), torch.tensor([[0.0, 0.25], [0.5, 1.0]], dtype=torch.float64))
    constant = normalize_heatmap(torch.full((3, 3), 7.0))
    assert torch.equal(constant, torch.zeros(3, 3, dtype=torch.float64))


def test_gmm_threshold_separates_two_clusters_and_is_reproducible():
    generator = torch.Generator().manual_seed(0)
    low = 0.1 + 0.02 * torch.randn(200, generator=generator)
    high = 0.9 + 0.02 * torch.randn(56, generator=generator)
    values = torch.cat([low, high]).reshape(16, 16)
    threshold = fit_gmm(values, seed=3).threshold
    assert low.max() < threshold < high.min()
    assert abs(threshold - 0.5) < 0.02
    assert fit_gmm(values, seed=3).threshold == threshold


def test_gmm_threshold_degenerate_maps():
    two_values = torch.tensor([[0.2, 0.2], [0.2, 0.6]])
    assert fit_gmm(two_values).threshold == pytest.approx(0.4)
    assert fit_gmm(torch.full((4, 4), 0.3)).threshold == pytest.approx(0.3)


# --- isolated-pixel removal ----------------------------------------------------------------------------


def test_remove_isolated_pixels_drops_lone_pixel_and_block_corners():
    mask = torch.zeros(9, 9, dtype=torch.bool)
    mask[1, 7] = True  # lone pixel: 1 of 9 on
    mask[4:7, 2:5] = True  # 3x3 block
    cleaned = remove_isolated_pixels(mask)
    assert not cleaned[1, 7]
    # block centre sees 9 on, edge middles 6, corners only 4 of 9: the block keeps its "plus" shape
    expected_block = torch.tensor([[0, 1, 0], [1, 1, 1], [0, 1, 0]], dtype=torch.bool)
    assert torch.equal(cleaned[4:7, 2:5], expected_block)
    assert cleaned.sum() == 5


def test_remove_isolated_pixels_never_switches_pixels_on_and_treats_outside_as_off():
    ring = torch.ones(5, 5, dtype=torch.bool)
    ring[2, 2] = False  # a hole with 8 of 9 on stays a hole
    assert not remove_isolated_pixels(ring)[2, 2]
    band = box_mask(6, 6, 0, 0, 3, 6)  # three full-width rows at the top edge
    cleaned = remove_isolated_pixels(band)
    # only the band's corners fall: (0, 0) sees 2 + 2 in-image pixels, the rest of row 0 sees 6
    expected = band.clone()
    for row, col in [(0, 0), (0, 5), (2, 0), (2, 5)]:
        expected[row, col] = False
    assert torch.equal(cleaned, expected)


# --- IoU family ----------------------------------------------------------------------------------------


def test_iou_of_box_shifted_by_four_columns():
    gt = box_mask(16, 24, 4, 4, 8, 8)
    shifted = box_mask(16, 24, 4, 8, 8, 8)
    assert iou(shifted, gt) == pytest.approx(32 / 96)  # overlap 8x4, union 64 + 64 - 32
    # through the full pipeline the shifted prediction loses its 4 corners (two of them in the overlap)
    assert localization_scores(shifted.float(), gt)["iou"] == pytest.approx(30 / (60 + 64 - 30))


def test_miou_fg_bg_averages_foreground_and_background_iou():
    gt = box_mask(4, 4, 0, 0, 2, 2)  # top-left 2x2
    pred = box_mask(4, 4, 0, 0, 1, 4)  # top row
    foreground = 2 / 6
    background = 10 / 14  # 16 - 6 pixels off in both, 16 - 2 off in either
    assert iou(~pred, ~gt) == pytest.approx(background)
    assert miou_fg_bg(pred, gt) == pytest.approx((foreground + background) / 2)
    assert miou_fg_bg(gt, gt) == 1.0


def test_iou_at_fixed_thresholds_on_handcrafted_map():
    gt = box_mask(12, 12, 2, 2, 6, 6)  # 36 pixels
    p = torch.zeros(12, 12)
    p[2:8, 2:6] = 1.0  # 6x4 inside the box
    p[2:8, 6:10] = 0.4  # 6x4 straddling the box's right edge
    p[10, 10] = 0.9  # lone bright pixel, removed as isolated
    # > 0.5: the 6x4 block less its corners = 20 pixels, all inside the box
    assert iou_at_threshold(p, gt, 0.5) == pytest.approx(20 / 36)
    # > 0.3: the 6x8 block less its corners = 44 pixels; 2 of the corners were inside the box
    assert iou_at_threshold(p, gt, 0.3) == pytest.approx(34 / (44 + 36 - 34))


# --- AUC, CNR, pointing game ---------------------------------------------------------------------------


def test_heatmap_equal_to_box_mask_scores_perfectly():
    gt = box_mask(32, 32, 8, 8, 8, 8)
    scores = localization_scores(gt.float(), gt)
    assert scores["auc"] == 1.0
    assert scores["pointing"] == 1.0
    assert iou(gt, gt) == 1.0 and miou_fg_bg(gt, gt) == 1.0
    # the GMM splits the two values exactly; the majority filter then removes the box's 4 corners
    assert scores["iou"] == pytest.approx(60 / 64)
    assert scores["miou"] == pytest.approx((60 / 64 + 960 / 964) / 2)
    assert math.isnan(scores["cnr"])  # zero variance on both sides with contrast: unbounded


def test_constant_map_gives_chance_auc_and_no_nan():
    gt = box_mask(16, 16, 4, 4, 6, 6)
    scores = localization_scores(torch.full((16, 16), 0.7), gt)
    assert scores["auc"] == 0.5
    assert scores["iou"] == 0.0 and scores["iou@0.3"] == 0.0  # nothing is above any threshold
    assert scores["miou"] == pytest.approx((0.0 + (256 - 36) / 256) / 2)
    assert scores["cnr"] == 0.0
    assert scores["pointing"] == 0.0  # first argmax is the top-left pixel, outside the box
    assert not any(math.isnan(value) for value in scores.values())


def test_cnr_matches_hand_computation():
    p = torch.tensor(
        [[0.0, 0.1, 0.2, 0.0], [0.1, 0.9, 1.0, 0.1], [0.2, 0.8, 0.7, 0.2], [0.0, 0.1, 0.2, 0.1]],
        dtype=torch.float64,
    )
    gt = box_mask(4, 4, 1, 1, 2, 2)
    inside = [0.9, 1.0, 0.8, 0.7]
    outside = [0.0, 0.1, 0.2, 0.0, 0.1, 0.1, 0.2, 0.2, 0.0, 0.1, 0.2, 0.1]
    mean_in, mean_out = sum(inside) / 4, sum(outside) / 12
    var_in = sum((v - mean_in) ** 2 for v in inside) / 4
    var_out = sum((v - mean_out) ** 2 for v in outside) / 12
    expected = (mean_in - mean_out) / math.sqrt(var_in + var_out)
    assert cnr(p, gt) == pytest.approx(expected)
    assert cnr(3 * p + 5, gt) == pytest.approx(expected)  # P is min-max normalised first


def test_auc_and_cnr_are_nan_for_one_class_masks():
    p = blob(8, 8, 3, 3)
    for gt in (torch.zeros(8, 8, dtype=torch.bool), torch.ones(8, 8, dtype=torch.bool)):
        assert math.isnan(pixel_auc(p, gt))
        assert math.isnan(cnr(p, gt))


def test_pointing_game_uses_first_argmax_on_ties():
    gt = box_mask(4, 4, 2, 2, 2, 2)
    p = torch.zeros(4, 4)
    p[0, 0] = 1.0  # first maximum in row-major order, outside the box
    p[3, 3] = 1.0  # tied maximum inside the box
    assert pointing_game(p, gt) == 0.0
    p[0, 0] = 0.5
    assert pointing_game(p, gt) == 1.0


def test_heatmap_is_resized_bilinearly_to_mask_size():
    coarse = box_mask(8, 8, 2, 2, 4, 4).float()
    gt = box_mask(16, 16, 4, 4, 8, 8)
    # bilinear upsampling keeps the box >= 0.75 and everything outside <= 0.25
    assert pixel_auc(coarse, gt) == 1.0
    assert pointing_game(coarse, gt) == 1.0
    assert iou_at_threshold(coarse, gt, 0.5) == pytest.approx(60 / 64)


def test_localization_scores_keys_and_mask_validation():
    gt = box_mask(8, 8, 2, 2, 3, 3)
    scores = localization_scores(blob(8, 8, 3, 3), gt, thresholds=(0.25, 0.5))
    assert set(scores) == {"iou", "miou", "auc", "cnr", "pointing", "iou@0.25", "iou@0.5"}
    with pytest.raises(ValueError, match="0/1"):
        localization_scores(blob(8, 8, 3, 3), gt.float() * 0.5)
    with pytest.raises(ValueError, match="2-D"):
        localization_scores(blob(8, 8, 3, 3)[None], gt)


# --- PhraseGroundingMetrics ----------------------------------------------------------------------------


def grounding_samples() -> tuple[list[torch.Tensor], list[torch.Tensor], list[str]]:
    """Four samples, three Edema and one Pneumothorax; the blob hits the box in samples 0 and 2 only."""
    gt = box_mask(16, 16, 4, 4, 6, 6)
    heatmaps = [blob(16, 16, 6, 6), blob(16, 16, 13, 13), blob(16, 16, 7, 8, sigma=3.0), blob(16, 16, 1, 14)]
    return heatmaps, [gt] * 4, ["Edema", "Edema", "Edema", "Pneumothorax"]


def test_phrase_grounding_metrics_means_overall_and_per_category():
    heatmaps, masks, categories = grounding_samples()
    metric = PhraseGroundingMetrics(conventions=("method",))
    metric.update(heatmaps, masks, categories)
    rows = [{name.removeprefix("method/"): value for name, value in row.items()} for row in metric.latest_sample_scores]
    assert [row["pointing"] for row in rows] == [1.0, 0.0, 1.0, 0.0]
    results = {name.replace("method/", ""): value for name, value in metric.compute().items()}

    assert results["pointing"].item() == pytest.approx(0.5)  # mean over samples ...
    assert results["pointing/Edema"].item() == pytest.approx(2 / 3)
    assert results["pointing/Pneumothorax"].item() == 0.0  # ... not the mean of categories (1/3) ...
    assert results["pointing/macro"].item() == pytest.approx(1 / 3)  # ... which is reported beside it
    for name in ("iou", "miou", "auc", "cnr", "iou@0.3", "iou@0.5"):
        assert results[name].item() == pytest.approx(sum(row[name] for row in rows) / 4)
        assert results[f"{name}/Edema"].item() == pytest.approx(sum(row[name] for row in rows[:3]) / 3)
        assert results[f"{name}/Pneumothorax"].item() == pytest.approx(rows[3][name])
    assert results["count"].item() == 4
    assert results["count/Edema"].item() == 3 and results["count/Pneumothorax"].item() == 1
    assert "iou/Atelectasis" not in results and "count/Atelectasis" not in results


def test_split_updates_merge_to_the_same_result():
    heatmaps, masks, categories = grounding_samples()
    whole = PhraseGroundingMetrics()
    whole.update(torch.stack(heatmaps), torch.stack(masks), categories)  # batched tensors work too
    first, second = PhraseGroundingMetrics(), PhraseGroundingMetrics()
    first.update(heatmaps[3:], masks[3:], categories[3:])
    second.update(heatmaps[:3], masks[:3], categories[:3])
    first.merge_state(second)
    expected, merged = whole.compute(), first.compute()
    assert set(merged) == set(expected)
    for key, value in expected.items():
        assert torch.allclose(merged[key].double(), value.double()), key


def test_nan_auc_is_left_out_of_its_mean_only():
    heatmaps, masks, categories = grounding_samples()
    metric = PhraseGroundingMetrics(conventions=("method",))

    def unprefixed(scores: dict) -> dict:
        return {name.replace("method/", ""): value for name, value in scores.items()}

    metric.update(heatmaps, masks, categories)
    rows = [unprefixed(row) for row in metric.latest_sample_scores]
    one_class_mask = torch.zeros(16, 16, dtype=torch.bool)  # AUC and CNR undefined
    metric.update([blob(16, 16, 5, 5)], [one_class_mask], ["Pneumothorax"])
    extra = unprefixed(metric.latest_sample_scores[0])
    assert math.isnan(extra["auc"]) and not math.isnan(extra["pointing"])
    results = unprefixed(metric.compute())

    assert results["count"].item() == 5
    assert results["nan_count/auc"].item() == 1 and results["nan_count/iou"].item() == 0
    assert results["auc"].item() == pytest.approx(sum(row["auc"] for row in rows) / 4)
    assert results["auc/Pneumothorax"].item() == pytest.approx(rows[3]["auc"])
    assert results["pointing"].item() == pytest.approx((sum(row["pointing"] for row in rows) + 0.0) / 5)
    assert results["iou/Pneumothorax"].item() == pytest.approx((rows[3]["iou"] + extra["iou"]) / 2)


def test_unknown_category_and_length_mismatch_raise():
    metric = PhraseGroundingMetrics()
    gt = box_mask(8, 8, 2, 2, 3, 3)
    with pytest.raises(ValueError, match="'Nodule'.*Atelectasis"):
        metric.update([blob(8, 8, 3, 3)], [gt], ["Nodule"])
    with pytest.raises(ValueError, match="1 heatmaps, 1 gt_masks and 2 categories"):
        metric.update([blob(8, 8, 3, 3)], [gt], ["Edema", "Edema"])
    assert metric.sample_count.sum() == 0  # a rejected batch adds nothing
    assert len(MS_CXR_CATEGORIES) == 8
