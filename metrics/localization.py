"""Per-sample phrase-grounding localization metrics: how well a heatmap P points at a ground-truth mask.

These are the building blocks and our own ("method") convention: docs/method.md, "Localization metrics"
(Dombrowski et al., arXiv 2303.17908). Every function takes one 2-D heatmap and/or one 2-D boolean mask;
`metrics.grounding_conventions` combines them into our convention ("method") and the published ones, and
`metrics.grounding_metrics.PhraseGroundingMetrics` aggregates them.

Conventions shared by all functions:
- P is min-max normalised to [0, 1]; a constant map becomes all zeros.
- Binarising P at a threshold t keeps the pixels strictly above t, so a constant map binarises to an
  empty prediction whatever t is.
- An undefined value (a 0/0) is NaN, never an exception, so one degenerate sample cannot stop an
  evaluation; the aggregator leaves NaNs out of the mean and counts them.
"""

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from scipy.stats import rankdata
from sklearn.metrics import roc_auc_score
from sklearn.mixture import GaussianMixture


def iou_threshold_key(threshold: float) -> str:
    """Name of the fixed-threshold IoU, e.g. 0.3 -> "iou@0.3"."""
    return f"iou@{threshold:g}"


def _check_2d(tensor: torch.Tensor, name: str) -> None:
    if not isinstance(tensor, torch.Tensor) or tensor.ndim != 2:
        shape = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
        raise ValueError(f"{name} must be a 2-D tensor (H, W), got {shape}")


def as_bool_mask(mask: torch.Tensor, name: str) -> torch.Tensor:
    """Accept a bool mask or one holding only 0/1 (as uint8 or float masks do)."""
    _check_2d(mask, name)
    if mask.dtype == torch.bool:
        return mask
    if not torch.all((mask == 0) | (mask == 1)):
        raise ValueError(f"{name} must be boolean or hold only 0/1, got other values (dtype {mask.dtype})")
    return mask.bool()


def normalize_heatmap(p: torch.Tensor) -> torch.Tensor:
    """Min-max normalise to [0, 1] in float64; a constant map (no contrast) becomes all zeros."""
    _check_2d(p, "heatmap")
    p = p.detach().to(torch.float64)
    if not torch.isfinite(p).all():
        raise ValueError("heatmap contains NaN or inf")
    low, high = p.min(), p.max()
    if high == low:
        return torch.zeros_like(p)
    return (p - low) / (high - low)


def heatmap_at_mask_size(p: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """Normalised P at the mask's resolution (bilinear resize first when the sizes differ)."""
    _check_2d(p, "heatmap")
    p = p.detach().to(torch.float64)
    if p.shape != gt.shape:
        p = F.interpolate(p[None, None], size=tuple(gt.shape), mode="bilinear", align_corners=False)[0, 0]
    return normalize_heatmap(p)


@dataclass(frozen=True)
class GmmFit:
    """A fitted 2-component Gaussian mixture of a map's values and its threshold (the mean of the two means).

    ``weights``, ``means``, ``variances`` are None when the map holds fewer than three distinct values: the two
    components are then the values themselves, so the threshold is the midpoint of min and max.
    """

    threshold: float
    weights: np.ndarray | None = None
    means: np.ndarray | None = None
    variances: np.ndarray | None = None


GMM_TOLERANCE, GMM_MAX_ITER, GMM_REG_COVAR = 1e-3, 100, 1e-6  # sklearn GaussianMixture's defaults


def fit_gmm(p: torch.Tensor, seed: int = 0, start: GmmFit | None = None) -> GmmFit:
    """The 2-component GMM of a map's values: sklearn's (k-means start, seeded), or EM from ``start``.

    ``start``: the fit of a smaller version of the same map (before upsampling). EM then needs a few iterations,
    run here in numpy with sklearn's update rules, stopping rule and regularisation (``_em_from``): sklearn
    spends ~60 ms per iteration on the 262,144 values of a 512 px map in checks and general-case algebra.
    """
    _check_2d(p, "heatmap")
    values = p.detach().to(torch.float64).cpu().numpy().reshape(-1)
    low, high = values.min(), values.max()
    if np.all((values == low) | (values == high)):
        return GmmFit(float((low + high) / 2))
    if start is not None and start.means is not None:
        return _em_from(values, start)
    mixture = GaussianMixture(n_components=2, random_state=seed).fit(values.reshape(-1, 1))
    means, variances = mixture.means_.reshape(-1), mixture.covariances_.reshape(-1)
    return GmmFit(float(means.mean()), mixture.weights_, means, variances)


def _em_from(values: np.ndarray, start: GmmFit) -> GmmFit:
    """sklearn's EM loop for a 1-D, 2-component mixture from given parameters: E-step, M-step, stop when the mean
    log-likelihood changed by less than the tolerance (tested equal to ``GaussianMixture(means_init=...)``)."""
    (w0, w1), (m0, m1), (v0, v1) = start.weights, start.means, start.variances
    total, lower_bound, tiny = values.sum(), -np.inf, 10 * np.finfo(np.float64).eps
    for _ in range(GMM_MAX_ITER):
        log_p0 = np.log(w0) - 0.5 * (np.log(2 * np.pi * v0) + np.square(values - m0) / v0)
        log_p1 = np.log(w1) - 0.5 * (np.log(2 * np.pi * v1) + np.square(values - m1) / v1)
        log_norm = np.logaddexp(log_p0, log_p1)
        r0 = np.exp(log_p0 - log_norm)
        n0, n1 = r0.sum() + tiny, values.size - r0.sum() + tiny  # the two responsibilities sum to 1
        m0, m1 = r0 @ values / n0, (total - r0 @ values) / n1
        v0 = r0 @ np.square(values - m0) / n0 + GMM_REG_COVAR
        v1 = (np.square(values - m1).sum() - r0 @ np.square(values - m1)) / n1 + GMM_REG_COVAR
        w0, w1 = n0 / (n0 + n1), n1 / (n0 + n1)
        previous, lower_bound = lower_bound, log_norm.mean()
        if abs(lower_bound - previous) < GMM_TOLERANCE:
            break
    means = np.array([m0, m1])
    return GmmFit(float(means.mean()), np.array([w0, w1]), means, np.array([v0, v1]))


def remove_isolated_pixels(mask: torch.Tensor) -> torch.Tensor:
    """3x3 majority filter that only removes: an on pixel stays on iff at least 5 of the 9 pixels of its
    3x3 neighbourhood (itself included) are on; off pixels stay off.

    Border rule: pixels outside the image count as off. Note that a rectangle loses its 4 corner pixels
    (each sees only 4 of 9 on), wherever it lies.
    """
    mask = as_bool_mask(mask, "mask")
    on_counts = ndimage.convolve(mask.cpu().numpy().astype(np.uint8), np.ones((3, 3), np.uint8), mode="constant")
    return mask & torch.from_numpy(on_counts >= 5).to(mask.device)


def iou(pred_mask: torch.Tensor, gt_mask: torch.Tensor) -> float:
    """Intersection over union of two masks; NaN when both are empty (0/0)."""
    pred_mask = as_bool_mask(pred_mask, "pred_mask")
    gt_mask = as_bool_mask(gt_mask, "gt_mask")
    if pred_mask.shape != gt_mask.shape:
        raise ValueError(f"pred_mask {tuple(pred_mask.shape)} and gt_mask {tuple(gt_mask.shape)} differ in size")
    union = (pred_mask | gt_mask).sum().item()
    if union == 0:
        return math.nan
    return (pred_mask & gt_mask).sum().item() / union


def miou_fg_bg(pred_mask: torch.Tensor, gt_mask: torch.Tensor) -> float:
    """(IoU of the foreground + IoU of the background) / 2.

    This is the reference code's "mIoU" (chest-distillation), reported in the paper; it is not the mIoU
    of other grounding papers (e.g. BioViL's), which averages IoU over thresholds or classes.
    """
    pred_mask = as_bool_mask(pred_mask, "pred_mask")
    gt_mask = as_bool_mask(gt_mask, "gt_mask")
    return (iou(pred_mask, gt_mask) + iou(~pred_mask, ~gt_mask)) / 2


def _binarise_and_clean(p_normalised: torch.Tensor, threshold: float) -> torch.Tensor:
    return remove_isolated_pixels(p_normalised > threshold)


def iou_at_threshold(p: torch.Tensor, gt: torch.Tensor, threshold: float) -> float:
    """IoU with P binarised at a fixed threshold on the normalised map instead of the GMM's; isolated
    pixels are removed as for the GMM-threshold IoU, so the two differ only in the threshold."""
    gt = as_bool_mask(gt, "gt_mask")
    return iou(_binarise_and_clean(heatmap_at_mask_size(p, gt), threshold), gt)


def roc_auc(labels: np.ndarray, scores: np.ndarray, weights: np.ndarray | None = None) -> float:
    """ROC AUC of boolean ``labels`` by ``scores``, ties counted half; NaN when one class is absent (by weight).

    Unweighted, it is the Mann-Whitney statistic from average ranks (scipy), equal to sklearn's
    ``roc_auc_score`` and about twice as fast on the 262,144 pixels of a 512 px mask; weighted, sklearn's.
    """
    labels = np.asarray(labels, dtype=bool)
    if weights is not None:
        keep = weights > 0
        labels, scores, weights = labels[keep], scores[keep], weights[keep]
    positives = int(labels.sum())
    if positives in (0, labels.size):
        return math.nan
    if weights is not None:
        return float(roc_auc_score(labels, scores, sample_weight=weights))
    negatives = labels.size - positives
    rank_sum = rankdata(scores)[labels].sum()
    return float((rank_sum - positives * (positives + 1) / 2) / (positives * negatives))


def pixel_auc(p: torch.Tensor, gt: torch.Tensor) -> float:
    """Pixel-level ROC AUC of P against the mask. A constant map gives 0.5 (all ties).
    NaN when the mask holds only one class (all in or all out): ROC AUC is undefined there."""
    gt = as_bool_mask(gt, "gt_mask")
    return roc_auc(gt.cpu().numpy().ravel(), heatmap_at_mask_size(p, gt).cpu().numpy().ravel())


def cnr(p: torch.Tensor, gt: torch.Tensor) -> float:
    """Contrast-to-noise ratio (mean(P|in) - mean(P|out)) / sqrt(var(P|in) + var(P|out)) on normalised P.

    Variances are population variances (divide by n; the reference code used torch's unbiased default).
    Zero denominator: 0.0 when there is no contrast either (a constant map), NaN otherwise (a perfectly
    two-valued map: the ratio is unbounded). NaN when the mask holds only one class.
    """
    gt = as_bool_mask(gt, "gt_mask")
    p = heatmap_at_mask_size(p, gt)
    inside, outside = p[gt], p[~gt]
    if inside.numel() == 0 or outside.numel() == 0:
        return math.nan
    contrast = (inside.mean() - outside.mean()).item()
    noise = math.sqrt((inside.var(correction=0) + outside.var(correction=0)).item())
    if noise == 0:
        return 0.0 if contrast == 0 else math.nan
    return contrast / noise


def pointing_game(p: torch.Tensor, gt: torch.Tensor) -> float:
    """Top-1 pointing game: 1.0 if the mask is on at the argmax of P, else 0.0.

    Ties: the first maximum in row-major order counts, so a constant map points at the top-left pixel.
    """
    gt = as_bool_mask(gt, "gt_mask")
    p = heatmap_at_mask_size(p, gt)
    return float(gt.reshape(-1)[torch.argmax(p.reshape(-1))].item())
