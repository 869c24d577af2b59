"""Known answers for the metric conventions, including maps on which they must disagree."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from metrics.grounding_conventions import (
    BIOVIL_THRESHOLDS,
    PairMaps,
    biovil_scores,
    check_conventions,
    convention_metric_names,
    convention_scores,
    filter_orphan_pixels_two_way,
    paper_code_scores,
)
from metrics.localization import remove_isolated_pixels


def box(size: int, top: int, left: int, height: int, width: int) -> torch.Tensor:
    mask = torch.zeros(size, size, dtype=torch.bool)
    mask[top : top + height, left : left + width] = True
    return mask


def holed_block_with_border_pixel() -> torch.Tensor:
    """8x8: the 4x4 block rows/cols 2-5 with a hole at (3, 3), and one lone pixel on the border at (0, 7)."""
    mask = box(8, 2, 2, 4, 4)
    mask[3, 3] = False
    mask[0, 7] = True
    return mask


def test_two_way_filter_fills_a_hole_and_leaves_the_border_alone():
    filtered = filter_orphan_pixels_two_way(holed_block_with_border_pixel())
    expected = box(8, 2, 2, 4, 4)  # hole switched on (8 of 9 on around it) ...
    for corner in ((2, 2), (2, 5), (5, 2), (5, 5)):  # ... block corners off (3 or 4 of 9) ...
        expected[corner] = False
    expected[0, 7] = True  # ... the border pixel untouched
    assert torch.equal(filtered, expected)


def test_one_way_filter_keeps_the_hole_and_drops_the_border_pixel():
    filtered = remove_isolated_pixels(holed_block_with_border_pixel())
    expected = box(8, 2, 2, 4, 4)
    expected[3, 3] = False
    for corner in ((2, 2), (2, 5), (5, 2), (5, 5)):
        expected[corner] = False
    assert torch.equal(filtered, expected)


def test_paper_code_and_method_iou_disagree_on_the_hole_and_the_border():
    heatmap = holed_block_with_border_pixel().double()  # two values: GMM threshold = midpoint
    gt = box(8, 2, 2, 4, 4)
    scores = convention_scores(heatmap, gt, ("paper_code", "method"))
    assert scores["paper_code/iou"] == pytest.approx(12 / 17)  # 13 predicted (12 in the box, hole on), 16 in the box
    assert scores["method/iou"] == pytest.approx(11 / 16)  # 11 predicted, all in the box
    # background: 64 - 17 = 47 pixels in neither, of a background union of 51 + 48 - 47 = 52 (method: 48 of 53)
    assert scores["paper_code/miou"] == pytest.approx((12 / 17 + 47 / 52) / 2)
    assert scores["method/miou"] == pytest.approx((11 / 16 + 48 / 53) / 2)


def test_paper_code_upsamples_the_binary_map_bilinearly_then_rounds():
    heatmap = torch.tensor([[1.0, 0.0], [0.0, 0.0]])  # too small to filter: binary = the single hot cell
    gt = box(16, 0, 0, 8, 8)
    pair = PairMaps(heatmap, gt, seed=0)
    # bilinear weights of the hot cell along an axis, output pixels 0..7: 1, 1, 1, 1, 15/16, 13/16, 11/16, 9/16;
    # a pixel is on when the product of its two weights exceeds 1/2: 32 + 8 + 7 + 6 + 5 = 58 of the 64 (the
    # inner corner of the quadrant is cut), none outside it
    scores = paper_code_scores(pair)
    assert scores["iou"] == pytest.approx(58 / 64)
    assert convention_scores(heatmap, gt, ("biovil",))["biovil/miou"] == pytest.approx(1.0)  # nearest: exact


def test_cnr_variance_and_contrast_sign_per_convention():
    gt = box(4, 0, 0, 4, 2)  # left half: 8 pixels in, 8 out
    heatmap = torch.tensor(
        [[1.0, 1.0, 0.0, 0.0], [0.5, 0.5, 0.5, 0.0], [1.0, 1.0, 0.0, 0.0], [0.5, 0.5, 0.5, 0.0]]
    )  # inside: mean 0.75, population variance 1/16; outside: mean 1/8, population variance 3/64
    population, unbiased = 1 / 16 + 3 / 64, (1 / 16 + 3 / 64) * 8 / 7
    scores = convention_scores(heatmap, gt, ("paper_code", "biovil", "method"))
    assert scores["method/cnr"] == pytest.approx(0.625 / math.sqrt(population))
    assert scores["biovil/cnr"] == pytest.approx(0.625 / math.sqrt(population))
    assert scores["paper_code/cnr"] == pytest.approx(0.625 / math.sqrt(unbiased))

    flipped = convention_scores(1 - heatmap, gt, ("paper_code", "biovil", "method"))  # hot outside the box
    assert flipped["method/cnr"] == pytest.approx(-scores["method/cnr"])
    assert flipped["paper_code/cnr"] == pytest.approx(-scores["paper_code/cnr"])
    assert flipped["biovil/cnr"] == pytest.approx(scores["biovil/cnr"])  # absolute contrast: no sign


def test_biovil_miou_is_the_mean_iou_over_five_thresholds():
    heatmap = torch.tensor([[0.0, 0.15, 0.25], [0.35, 0.45, 0.55], [0.65, 0.75, 1.0]])
    gt = box(3, 1, 0, 2, 3)  # the bottom two rows: 6 cells
    # cells above t: t=0.1 -> 8 (6 in), 0.2 -> 7 (6 in), 0.3 -> 6 (6 in), 0.4 -> 5 (5 in), 0.5 -> 4 (4 in)
    expected = (6 / 8 + 6 / 7 + 6 / 6 + 5 / 6 + 4 / 6) / 5
    assert BIOVIL_THRESHOLDS == (0.1, 0.2, 0.3, 0.4, 0.5)
    assert biovil_scores(PairMaps(heatmap, gt, 0))["miou"] == pytest.approx(expected)


@pytest.mark.parametrize("map_size, mask_size", [(4, 16), (5, 12), (7, 7)])
def test_biovil_cell_sums_equal_pixel_level_metrics_after_nearest_upsampling(map_size, mask_size):
    generator = torch.Generator().manual_seed(map_size)
    heatmap = torch.rand(map_size, map_size, generator=generator, dtype=torch.float64)
    gt = box(mask_size, mask_size // 4, mask_size // 3, mask_size // 2, mask_size // 3 + 1)
    scores = biovil_scores(PairMaps(heatmap, gt, 0))

    p = (heatmap - heatmap.min()) / (heatmap.max() - heatmap.min())
    p = F.interpolate(p[None, None], size=(mask_size, mask_size), mode="nearest")[0, 0]  # the pixel-level view
    ious = [((p > t) & gt).sum().item() / ((p > t) | gt).sum().item() for t in BIOVIL_THRESHOLDS]
    inside, outside = p[gt], p[~gt]
    contrast = abs(inside.mean() - outside.mean()) / torch.sqrt(inside.var(correction=0) + outside.var(correction=0))
    positives, negatives = inside[:, None], outside[None, :]
    auc = ((positives > negatives).double().mean() + 0.5 * (positives == negatives).double().mean()).item()
    assert scores["miou"] == pytest.approx(sum(ious) / len(ious), abs=1e-12)
    assert scores["cnr"] == pytest.approx(contrast.item(), abs=1e-12)
    assert scores["auc"] == pytest.approx(auc, abs=1e-12)


def test_paper_code_auc_and_pointing_read_the_bilinear_map():
    heatmap = torch.zeros(4, 4, dtype=torch.float64)
    heatmap[0, 0], heatmap[3, 3] = 1.0, 0.9
    gt = box(16, 12, 12, 4, 4)  # under the 0.9 cell only
    scores = convention_scores(heatmap, gt, ("paper_code", "biovil"))
    assert scores["paper_code/pointing"] == 0.0  # the argmax is the top-left corner, outside the box
    p = F.interpolate(heatmap[None, None], size=(16, 16), mode="bilinear", align_corners=False)[0, 0]
    inside, outside = p[gt], p[~gt]
    auc = (inside[:, None] > outside[None, :]).double().mean() + 0.5 * (
        inside[:, None] == outside[None, :]
    ).double().mean()
    assert scores["paper_code/auc"] == pytest.approx(auc.item(), abs=1e-12)
    assert scores["paper_code/auc"] != pytest.approx(scores["biovil/auc"])  # nearest vs bilinear views differ


def test_undefined_scores_are_nan_under_every_convention():
    empty = torch.zeros(8, 8, dtype=torch.bool)
    scores = convention_scores(
        torch.rand(8, 8, generator=torch.Generator().manual_seed(0)), empty, ("paper_code", "biovil", "method")
    )
    for name in ("paper_code/auc", "paper_code/cnr", "biovil/auc", "biovil/cnr", "method/auc", "method/cnr"):
        assert math.isnan(scores[name]), name


def test_names_and_config_errors():
    assert convention_metric_names(("biovil", "method"), (0.3,)) == (
        "biovil/miou",
        "biovil/auc",
        "biovil/cnr",
        "method/iou",
        "method/miou",
        "method/auc",
        "method/cnr",
        "method/pointing",
        "method/iou@0.3",
    )
    scores = convention_scores(torch.rand(8, 8), box(8, 2, 2, 3, 3), ("paper_code", "biovil", "method"), (0.3,))
    assert tuple(scores) == convention_metric_names(("paper_code", "biovil", "method"), (0.3,))
    with pytest.raises(ValueError, match=r"unknown \['bioViL'\]; known: paper_code, biovil, method"):
        check_conventions(["bioViL"])
    with pytest.raises(ValueError, match="distinct"):
        check_conventions(["method", "method"])
    with pytest.raises(ValueError, match="larger than the mask"):
        convention_scores(torch.rand(8, 8), box(4, 0, 0, 2, 2), ("biovil",))


def test_rank_auc_equals_sklearn_with_ties_and_weights():
    from sklearn.metrics import roc_auc_score

    from metrics.localization import roc_auc

    generator = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 5, (500,), generator=generator).double().numpy()  # many ties
    labels = (torch.rand(500, generator=generator) < 0.3).numpy()
    weights = torch.randint(0, 4, (500,), generator=generator).double().numpy()
    assert roc_auc(labels, scores) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    keep = weights > 0
    expected = roc_auc_score(labels[keep], scores[keep], sample_weight=weights[keep])
    assert roc_auc(labels, scores, weights) == pytest.approx(expected, abs=1e-12)
    assert math.isnan(roc_auc(labels & False, scores))


def test_warm_started_gmm_is_sklearns_em_from_the_same_start_and_close_to_a_cold_fit():
    from sklearn.mixture import GaussianMixture

    from metrics.localization import fit_gmm

    generator = torch.Generator().manual_seed(1)
    heatmap = F.avg_pool2d(torch.rand(1, 1, 34, 34, generator=generator, dtype=torch.float64), 3, stride=1)[0, 0]
    heatmap[8:16, 12:22] += 1.0
    pair = PairMaps(heatmap, box(256, 64, 96, 64, 80), seed=0)
    upsampled = F.interpolate(pair.p_map[None, None], size=(256, 256), mode="bilinear", align_corners=False)[0, 0]
    start, warm = pair.map_fit, fit_gmm(upsampled, 0, start=pair.map_fit)
    reference = GaussianMixture(
        n_components=2,
        means_init=start.means[:, None],
        weights_init=start.weights,
        precisions_init=(1 / start.variances)[:, None, None],
    ).fit(upsampled.numpy().reshape(-1, 1))
    assert warm.means == pytest.approx(reference.means_.ravel(), abs=1e-10)
    assert warm.variances == pytest.approx(reference.covariances_.ravel(), abs=1e-10)
    assert warm.weights == pytest.approx(reference.weights_, abs=1e-10)
    assert warm.threshold == pytest.approx(fit_gmm(upsampled, 0).threshold, abs=1e-3)  # and near a cold k-means fit


def test_paper_code_and_method_share_auc_and_pointing():
    heatmap = torch.rand(8, 8, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    scores = convention_scores(heatmap, box(64, 10, 20, 20, 24), ("paper_code", "method"))
    assert scores["paper_code/auc"] == scores["method/auc"]  # same bilinear map up to an affine renormalisation
    assert scores["paper_code/pointing"] == scores["method/pointing"]
    assert scores["paper_code/cnr"] != scores["method/cnr"]


# --------------------------------------------------------------------------------------------- paper_code's raw fit
def three_band_map() -> torch.Tensor:
    """12x12 at attention-probability scale, full-width bands: rows 0-5 at 1e-3, rows 6-9 at 2e-3, rows 10-11 at
    4e-3. Full-width bands at least 2 rows high are left alone by the two-way filter."""
    heatmap = torch.full((12, 12), 1e-3)
    heatmap[6:10], heatmap[10:] = 2e-3, 4e-3
    return heatmap


def test_paper_code_fits_the_raw_map_where_a_normalised_fit_thresholds_elsewhere():
    from sklearn.mixture import GaussianMixture

    from metrics.grounding_conventions import reference_gmm_mask
    from metrics.localization import fit_gmm, normalize_heatmap

    heatmap = three_band_map()
    # On the raw values reg_covar (1e-6) dwarfs the bands' spread: both components sit near 2e-3 and the threshold
    # falls between 1e-3 and 2e-3, so the two upper bands are on (rows 6-11). On the normalised map (0, 1/3, 1)
    # the components are {0, 1/3} and {1}: only the top band (rows 10-11) is on.
    raw_fit = GaussianMixture(n_components=2, random_state=0).fit(heatmap.double().numpy().reshape(-1, 1))
    expected = heatmap > float(raw_fit.means_.mean())
    assert torch.equal(expected, box(12, 6, 0, 6, 12))
    assert torch.equal(reference_gmm_mask(heatmap, seed=0), expected)
    normalised = normalize_heatmap(heatmap)
    assert torch.equal(normalised > fit_gmm(normalised, 0).threshold, box(12, 10, 0, 2, 12))

    gt = box(12, 8, 0, 4, 12)  # rows 8-11
    scores = convention_scores(heatmap, gt, ("paper_code", "method"))
    assert scores["paper_code/iou"] == pytest.approx(48 / 72)  # rows 6-11 predicted, 8-11 true
    assert scores["paper_code/miou"] == pytest.approx((48 / 72 + 72 / 96) / 2)  # background: rows 0-5 of 0-7
    # method keeps the normalised fit: the top band less its 4 pixels in columns 0 and 11 (4 of 9 on, outside off)
    assert scores["method/iou"] == pytest.approx(20 / 48)


def attention_scale_map(generator: torch.Generator, size: int) -> torch.Tensor:
    """A smooth random map with a blob, offset and amplitude drawn between 1e-4 and ~3e-2: attention probabilities."""
    noise = torch.rand(1, 1, size + 4, size + 4, generator=generator, dtype=torch.float64)
    field = F.avg_pool2d(noise, 5, stride=1)[0, 0]
    row, col, width, strength, amplitude, offset = torch.rand(6, generator=generator, dtype=torch.float64).tolist()
    rows = torch.arange(size, dtype=torch.float64)[:, None]
    cols = torch.arange(size, dtype=torch.float64)[None, :]
    sigma = 1 + width * size / 6
    field = field + 2 * strength * torch.exp(-((rows - row * size) ** 2 + (cols - col * size) ** 2) / (2 * sigma**2))
    field = (field - field.min()) / (field.max() - field.min())
    return (10 ** (-4 + 2 * offset) + 10 ** (-4 + 2.5 * amplitude) * field).float()


def reference_code_iou(attention: torch.Tensor, gt: torch.Tensor, seed: int) -> tuple[float, float]:
    """IoU and (fg+bg)/2 mIoU step by step as MischaD/chest-distillation computes them: src/foreground_masks.py
    ``GMMMaskSuggestor`` (``get_gaussian_mixture_prediction`` on the saved float32 map, ``filter_orphan_pixel``),
    then scripts/compute_bbox_iou.py: ``Resize(512)`` of the binary mask (bilinear; here to the mask's size),
    ``.round()``, ``jaccard_score`` of the mask and of the complements. Only ``random_state`` is added."""
    from sklearn.metrics import jaccard_score
    from sklearn.mixture import GaussianMixture

    gmm = GaussianMixture(n_components=2, random_state=seed)
    gmm.fit(attention.reshape(-1, 1))  # a torch tensor, as the reference passes it
    binary_img = attention > np.mean(gmm.means_)
    img = binary_img[None, None].to(torch.float32)
    img[..., 1:-1, 1:-1] = F.conv2d(img, torch.full((1, 1, 3, 3), 1 / 9), bias=torch.zeros(1))
    img[img >= 0.5] = 1
    img[img < 0.5] = 0
    large = F.interpolate(img, size=tuple(gt.shape), mode="bilinear", align_corners=False).round()[0, 0]
    truth, prediction = gt.flatten().int().numpy(), large.flatten().int().numpy()
    foreground = jaccard_score(truth, prediction)
    background = jaccard_score(1 - truth, 1 - prediction)
    return foreground, (foreground + background) / 2


def test_paper_code_iou_equals_the_reference_code_path_on_attention_scale_maps():
    generator = torch.Generator().manual_seed(20)
    differences = []
    for _ in range(50):
        attention = attention_scale_map(generator, 32)
        top, left = torch.randint(0, 128, (2,), generator=generator).tolist()
        height, width = torch.randint(32, 128, (2,), generator=generator).tolist()
        gt = box(256, top, left, height, width)
        scores = convention_scores(attention, gt, ("paper_code",), seed=3)
        expected_iou, expected_miou = reference_code_iou(attention, gt, seed=3)
        differences += [abs(scores["paper_code/iou"] - expected_iou), abs(scores["paper_code/miou"] - expected_miou)]
    assert max(differences) < 1e-12


def test_only_paper_code_depends_on_the_heatmaps_scale():
    heatmap = three_band_map()
    gt = box(48, 32, 0, 16, 48)
    conventions = ("paper_code", "biovil", "method")
    at_attention_scale = convention_scores(heatmap, gt, conventions)
    rescaled = convention_scores(heatmap * 1000, gt, conventions)  # values 1, 2, 4: reg_covar no longer matters
    for name, value in at_attention_scale.items():
        if name in ("paper_code/iou", "paper_code/miou"):
            assert value != pytest.approx(rescaled[name]), name
        else:
            assert value == pytest.approx(rescaled[name], abs=1e-12), name


def test_paper_code_keeps_sklearns_answer_on_a_constant_map():
    """k-means finds one cluster; the empty component's mean stays 0, so the threshold is half the value."""
    import warnings

    from sklearn.exceptions import ConvergenceWarning

    from metrics.grounding_conventions import reference_gmm_mask

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        assert reference_gmm_mask(torch.full((8, 8), 0.01), seed=0).all()
        assert not reference_gmm_mask(torch.zeros(8, 8), seed=0).any()
