"""Named metric conventions, so our grounding numbers can stand next to the ones people publish.

The same heatmap scores differently depending on where it is binarised, how isolated pixels are cleaned,
which variance and which contrast CNR takes and what "mIoU" means. Each convention below is one such
definition, written from the code that produced published MS-CXR numbers (cited per function; see
docs/method.md, "Metric conventions"). Scores of one (heatmap, mask) pair under several conventions:

    scores = convention_scores(heatmap, gt_mask, ("paper_code", "biovil", "method"))
    scores["paper_code/iou"], scores["biovil/miou"], scores["method/cnr"], ...

The heatmap comes at its own (latent) resolution, the mask at the image's, and at its own scale: the mean
attention probability, unnormalised, as ``grounding.phrase_grounding`` returns it. ``paper_code`` fits its
mixture to those raw values, as the reference code does (the fit's absolute covariance regularisation makes
the threshold depend on the scale); everything else reads the min-max normalised map. ``paper_code``
thresholds at the map's resolution and ``biovil`` upsamples by nearest neighbour, whose metrics are exact
sums over map cells; so their cost hardly grows with the image. ``method`` binarises at the mask's
resolution by definition, so its cost does (its GMM fit starts from the map-resolution fit to need few
iterations). Shared rules (``metrics.localization``): a 0/0 is NaN, never an exception.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from functools import cached_property

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.mixture import GaussianMixture

from metrics.localization import (
    GmmFit,
    as_bool_mask,
    cnr,
    fit_gmm,
    heatmap_at_mask_size,
    iou,
    iou_at_threshold,
    iou_threshold_key,
    miou_fg_bg,
    normalize_heatmap,
    pixel_auc,
    pointing_game,
    remove_isolated_pixels,
    roc_auc,
)

BIOVIL_THRESHOLDS = (0.1, 0.2, 0.3, 0.4, 0.5)


class PairMaps:
    """One (heatmap, mask) pair and the views of it the conventions share, each computed once."""

    def __init__(self, heatmap: torch.Tensor, gt: torch.Tensor, seed: int) -> None:
        self.gt = as_bool_mask(gt, "gt_mask")
        self.p_map = normalize_heatmap(heatmap)  # also rejects a map that is not 2-D or not finite
        self.raw_map = heatmap.detach()  # unnormalised, for paper_code's mixture fit
        self.seed = seed

    @cached_property
    def map_fit(self) -> GmmFit:
        """The 2-component GMM of the normalised map's values (seeded); ``method``'s, not ``paper_code``'s."""
        return fit_gmm(self.p_map, self.seed)

    def upsample_bilinear(self, values: torch.Tensor) -> torch.Tensor:
        """``values`` (map-sized) at the mask's size, bilinear, half-pixel centres (torchvision's Resize)."""
        if values.shape == self.gt.shape:
            return values
        return F.interpolate(values[None, None], size=tuple(self.gt.shape), mode="bilinear", align_corners=False)[0, 0]

    @cached_property
    def p_bilinear(self) -> torch.Tensor:
        return self.upsample_bilinear(self.p_map)

    @cached_property
    def bilinear_auc(self) -> float:
        """AUC of the bilinear map; also the method's (its renormalisation is affine: ranks are unchanged)."""
        return pixel_auc(self.p_bilinear, self.gt)

    @cached_property
    def bilinear_pointing(self) -> float:
        """Pointing game on the bilinear map (first maximum in row-major order); affine-invariant as the AUC."""
        return pointing_game(self.p_bilinear, self.gt)

    @cached_property
    def cell_counts(self) -> tuple[np.ndarray, np.ndarray]:
        """Mask pixels inside and outside the ground truth that nearest-neighbour upsampling gives each map cell.

        torch's "nearest" takes source index floor(i * in / out) for output index i: monotone, so each cell's
        pixels form a block and a reduceat sums them."""
        gt = self.gt.cpu().numpy().astype(np.int64)
        starts = []
        for axis in (0, 1):
            source = (np.arange(gt.shape[axis]) * self.p_map.shape[axis]) // gt.shape[axis]
            if len(np.unique(source)) != self.p_map.shape[axis]:
                raise ValueError(
                    f"biovil convention: heatmap {tuple(self.p_map.shape)} is larger than the mask "
                    f"{tuple(gt.shape)} along axis {axis}; nearest upsampling would drop map cells"
                )
            starts.append(np.searchsorted(source, np.arange(self.p_map.shape[axis])))
        inside = np.add.reduceat(np.add.reduceat(gt, starts[0], axis=0), starts[1], axis=1)
        rows, cols = (np.diff(np.append(start, size)) for start, size in zip(starts, gt.shape, strict=True))
        return inside, np.outer(rows, cols) - inside


# --------------------------------------------------------------------------------------------- paper_code
def filter_orphan_pixels_two_way(mask: torch.Tensor) -> torch.Tensor:
    """The reference code's isolated-pixel filter: every pixel not on the border becomes the majority (>= 5 of 9)
    of its 3x3 neighbourhood, so it can switch pixels on as well as off; border pixels keep their value.

    Follows MischaD/chest-distillation, src/foreground_masks.py, ``GMMMaskSuggestor.filter_orphan_pixel``
    (a 1/9 box filter without padding written into ``[1:-1, 1:-1]``, then ``>= 0.5``).
    """
    mask = as_bool_mask(mask, "mask")
    if min(mask.shape) < 3:
        return mask.clone()
    counts = F.conv2d(mask.double()[None, None], torch.ones(1, 1, 3, 3, dtype=torch.float64))[0, 0]
    filtered = mask.clone()
    filtered[1:-1, 1:-1] = counts >= 5
    return filtered


def reference_gmm_mask(raw_map: torch.Tensor, seed: int) -> torch.Tensor:
    """The reference code's binarisation: a 2-component Gaussian mixture fitted to the raw map's values, a cell
    on when its value exceeds the mean of the two component means.

    Follows MischaD/chest-distillation, src/foreground_masks.py, ``GMMMaskSuggestor.get_gaussian_mixture_prediction``:
    ``GaussianMixture(n_components=2)`` with every other argument at sklearn's default (full covariance, k-means
    initialisation, ``reg_covar=1e-6``, ``tol=1e-3``, ``max_iter=100``, ``n_init=1``) fitted to the map's cells in
    row-major order. The map is the one the reference saves: float32, the mean attention probability, never
    normalised. sklearn gets it as a torch tensor, which it converts to float64, and the threshold is compared
    with the float32 map as torch compares a tensor with a scalar, in the map's dtype (the threshold rounded
    to float32). ``reg_covar`` is absolute, so on attention probabilities (~1e-3) it is no small correction:
    the threshold differs from that of a fit to the min-max normalised map. Ours passes ``random_state=seed``;
    the reference's one unseeded mixture draws its k-means start from NumPy's global stream, seeded once
    before all pairs (``seed_everything``), so a pair's start depends on its place in the loop. A constant
    map keeps sklearn's answer too: k-means finds one cluster, the other mean stays 0, a positive map is all on.
    """
    values = raw_map.detach().cpu().to(torch.float32).numpy()
    mixture = GaussianMixture(n_components=2, random_state=seed).fit(values.reshape(-1, 1).astype(np.float64))
    return torch.from_numpy(values > np.float32(np.mean(mixture.means_)))


def paper_code_scores(pair: PairMaps) -> dict[str, float]:
    """The reference code's localization metrics.

    Follows MischaD/chest-distillation, scripts/compute_bbox_iou.py (``compute_iou_score``'s "computing metrics"
    loop; ``main`` in the version that produced the published values) with src/foreground_masks.py
    ``GMMMaskSuggestor`` and src/evaluation/utils.py ``contrast_to_noise_ratio``: the raw map is binarised at its
    own resolution by the mixture threshold (``reference_gmm_mask``), cleaned by the two-way filter, then resized
    bilinearly to the image and rounded; IoU and the foreground/background mIoU take that mask. AUC, CNR and the
    pointing game take the min-max normalised map resized bilinearly. CNR: signed contrast over the square root
    of the sum of the unbiased (n - 1) variances.

    Differences kept on purpose: the mixture is seeded (``random_state=seed``; the reference's draws from
    NumPy's global stream); the ground-truth mask is our exact box transform (the reference resizes a boolean
    mask bilinearly, which dilates it) at the mask's size (the reference resizes to 512); an empty union is NaN
    (sklearn's ``jaccard_score`` gives 0); a map with NaN or inf raises (the reference skips a NaN map);
    the normalised map for AUC, CNR and pointing is computed in float64 (the reference's in float32). The
    heatmap is ours (``grounding.phrase_grounding``), the same quantity at the same scale as the map the reference
    saves (head-averaged attention probabilities averaged over the last 40 of 50 steps, every cross-attention
    layer and the phrase's query-word tokens), made differently in two ways: layer maps are resized bilinearly
    (the reference repeats pixels), and the selected tokens are averaged together (the reference averages each
    matched word's tokens, then the words, a word matching two query words counting twice).
    """
    binary = filter_orphan_pixels_two_way(reference_gmm_mask(pair.raw_map, pair.seed))
    prediction = pair.upsample_bilinear(binary.double()) > 0.5  # no exact halves at integer scale factors
    p, gt = pair.p_bilinear, pair.gt
    foreground, background = iou(prediction, gt), iou(~prediction, ~gt)
    return {
        "iou": foreground,
        "miou": (foreground + background) / 2,
        "auc": pair.bilinear_auc,
        "cnr": _cnr(p[gt], p[~gt], unbiased=True, absolute=False),
        "pointing": pair.bilinear_pointing,
    }


# --------------------------------------------------------------------------------------------- biovil
def biovil_scores(pair: PairMaps) -> dict[str, float]:
    """BioViL / BioViL-T's phrase-grounding metrics on the map upsampled by nearest neighbour.

    Upsampling: microsoft/hi-ml, hi-ml-multimodal/src/health_multimodal/vlp/inference_engine.py,
    ``ImageTextInferenceEngine.convert_similarity_to_image_size`` (``interpolation="nearest"``). Metrics:
    vios-s/ldm-phrase-grounding, metrics/eval_metrics.py (``CNR``, ``mIoU``, ``AUC_ROC``), which follows the
    BioViL papers (hi-ml itself ships no metric code): mIoU is the mean over thresholds 0.1 ... 0.5 of the
    IoU of ``map > t`` with the boxes; CNR takes the absolute contrast over the square root of the sum of
    population variances. Ours differs where the map and the data differ: BioViL thresholds a cosine
    similarity, an attention map has no scale of its own, so the thresholds apply to the min-max normalised
    map; CNR takes the union of the boxes (theirs averages per box); AUC is exact (theirs 5-bin binned).
    Every sum runs over map cells weighted by their pixel counts, which equals the pixel-level result.
    """
    inside, outside = pair.cell_counts
    values = pair.p_map.cpu().numpy()
    in_area = inside.sum()
    ious = []
    for threshold in BIOVIL_THRESHOLDS:
        on = values > threshold
        intersection = inside[on].sum()
        union = (inside + outside)[on].sum() + in_area - intersection
        ious.append(math.nan if union == 0 else intersection / union)
    labels = np.concatenate([np.ones(values.size), np.zeros(values.size)])
    weights = np.concatenate([inside.ravel(), outside.ravel()]).astype(np.float64)
    scores = np.concatenate([values.ravel(), values.ravel()])
    return {
        "miou": float(np.mean(ious)),
        "auc": roc_auc(labels, scores, weights),
        "cnr": _weighted_cnr(values.ravel(), inside.ravel(), outside.ravel()),
    }


# --------------------------------------------------------------------------------------------- method
def method_scores(pair: PairMaps, thresholds: Sequence[float]) -> dict[str, float]:
    """Ours (docs/method.md, "Localization metrics"): everything at the mask's resolution after a bilinear
    resize (``metrics.localization.heatmap_at_mask_size``); the GMM threshold and one "iou@<t>" per fixed
    threshold binarise it, the one-way filter (``remove_isolated_pixels``, outside counted as off) cleans it;
    population variances and signed contrast for CNR (``metrics.localization.cnr``). "iou" and "miou" share
    one binarisation; the GMM fit at mask resolution starts from the map-resolution fit (``fit_gmm``)."""
    p, gt = heatmap_at_mask_size(pair.p_map, pair.gt), pair.gt
    fit = pair.map_fit if pair.p_map.shape == gt.shape else fit_gmm(p, pair.seed, start=pair.map_fit)
    prediction = remove_isolated_pixels(p > fit.threshold)
    scores = {
        "iou": iou(prediction, gt),
        "miou": miou_fg_bg(prediction, gt),
        "auc": pair.bilinear_auc,
        "cnr": cnr(p, gt),
        "pointing": pair.bilinear_pointing,
    }
    for threshold in thresholds:
        scores[iou_threshold_key(threshold)] = iou_at_threshold(p, gt, threshold)
    return scores


# --------------------------------------------------------------------------------------------- shared
def _cnr(inside: torch.Tensor, outside: torch.Tensor, unbiased: bool, absolute: bool) -> float:
    """(mean in - mean out) / sqrt(var in + var out); 0/0 -> 0.0 (no contrast), x/0 -> NaN; NaN on an empty side."""
    if inside.numel() <= int(unbiased) or outside.numel() <= int(unbiased):
        return math.nan
    contrast = (inside.mean() - outside.mean()).item()
    noise = math.sqrt((inside.var(correction=int(unbiased)) + outside.var(correction=int(unbiased))).item())
    return _ratio(abs(contrast) if absolute else contrast, noise)


def _weighted_cnr(values: np.ndarray, inside: np.ndarray, outside: np.ndarray) -> float:
    """``_cnr`` with absolute contrast and population variances over cells weighted by pixel counts."""
    if inside.sum() == 0 or outside.sum() == 0:
        return math.nan
    mean_in, mean_out = np.average(values, weights=inside), np.average(values, weights=outside)
    var_in = np.average((values - mean_in) ** 2, weights=inside)
    var_out = np.average((values - mean_out) ** 2, weights=outside)
    return _ratio(abs(mean_in - mean_out), math.sqrt(var_in + var_out))


def _ratio(contrast: float, noise: float) -> float:
    if noise == 0:
        return 0.0 if contrast == 0 else math.nan
    return float(contrast / noise)


ConventionFunction = Callable[[PairMaps, Sequence[float]], dict[str, float]]
CONVENTIONS: dict[str, ConventionFunction] = {
    "paper_code": lambda pair, _thresholds: paper_code_scores(pair),
    "biovil": lambda pair, _thresholds: biovil_scores(pair),
    "method": method_scores,
}
CONVENTION_METRICS: dict[str, tuple[str, ...]] = {
    "paper_code": ("iou", "miou", "auc", "cnr", "pointing"),
    "biovil": ("miou", "auc", "cnr"),
    "method": ("iou", "miou", "auc", "cnr", "pointing"),  # + one "iou@<t>" per fixed threshold
}


def check_conventions(conventions: Sequence[str]) -> tuple[str, ...]:
    """The conventions as a tuple; a clear error for an unknown or repeated one (``grounding.conventions``)."""
    if isinstance(conventions, str) or not conventions or len(set(conventions)) != len(conventions):
        raise ValueError(f"grounding.conventions must be a non-empty list of distinct names, got {conventions!r}")
    unknown = [name for name in conventions if name not in CONVENTIONS]
    if unknown:
        raise ValueError(f"grounding.conventions: unknown {unknown}; known: {', '.join(CONVENTIONS)}")
    return tuple(conventions)


def convention_metric_names(conventions: Sequence[str], thresholds: Sequence[float]) -> tuple[str, ...]:
    """Every "<convention>/<metric>" key ``convention_scores`` returns, in a stable order."""
    names = []
    for convention in check_conventions(conventions):
        metrics = CONVENTION_METRICS[convention]
        if convention == "method":
            metrics = metrics + tuple(iou_threshold_key(t) for t in thresholds)
        names += [f"{convention}/{metric}" for metric in metrics]
    return tuple(names)


def convention_scores(
    heatmap: torch.Tensor,
    gt: torch.Tensor,
    conventions: Sequence[str],
    thresholds: Sequence[float] = (0.3, 0.5),
    seed: int = 0,
) -> dict[str, float]:
    """One pair's scores under each convention, keyed "<convention>/<metric>"."""
    pair = PairMaps(heatmap, gt, seed)
    return {
        f"{convention}/{metric}": value
        for convention in check_conventions(conventions)
        for metric, value in CONVENTIONS[convention](pair, thresholds).items()
    }
