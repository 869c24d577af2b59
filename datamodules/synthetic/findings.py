"""The findings of the synthetic set: which MS-CXR categories an image shows, where, and the density they add.

Why a module of its own: a finding is sampled (category, side, zone, severity), drawn as one density layer per
ground-truth box on top of the normal anatomy, and named by the report; keeping the what and the where of the
eight categories together makes a category readable in one place.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from datamodules.mscxr import MS_CXR_CATEGORIES
from datamodules.synthetic.anatomy import (
    EDGE,
    IMAGE_SIGN,
    LUNG_DARKNESS,
    Anatomy,
    air_column,
    lung_depth,
    mediastinal_border,
    round_profile,
    soft_step,
)
from datamodules.synthetic.studies import pick


@dataclass(frozen=True)
class Finding:
    category: str
    side: str  # the patient's side: right | left | bilateral
    zone: str  # upper | middle | lower | base | apex | perihilar | heart
    severity: int  # 0 small/mild, 1 moderate, 2 large/severe
    boxes: tuple[tuple[int, int, int, int], ...] = ()  # x, y, w, h in pixels


# Where a category always sits; the others (consolidation, pneumonia, opacity) get an upper/middle/lower zone.
_FIXED_ZONE = {
    "Atelectasis": "base",
    "Cardiomegaly": "heart",
    "Edema": "perihilar",
    "Pleural Effusion": "base",
    "Pneumothorax": "apex",
}


def sample_findings(rng: np.random.Generator) -> list[Finding]:
    """0-2 distinct MS-CXR categories per frontal image, ~35% normal, each with laterality and zone."""
    count = int(rng.choice(3, p=[0.35, 0.4, 0.25]))
    findings = []
    for index in rng.choice(len(MS_CXR_CATEGORIES), size=count, replace=False):
        category = MS_CXR_CATEGORIES[int(index)]
        side = "bilateral" if category in ("Cardiomegaly", "Edema") else pick(rng, ("right", "left"))
        zone = _FIXED_ZONE.get(category) or pick(rng, ("upper", "middle", "lower"))
        findings.append(Finding(category, side, zone, severity=int(rng.integers(0, 3))))
    return findings


def _zone_centre(rng: np.random.Generator, anatomy: Anatomy, side: str, zone: str) -> tuple[float, float]:
    """(u, v) of the middle of a lung zone, jittered; lower zones of the left lung sit lateral to the heart."""
    t = {"upper": 0.25, "middle": 0.5, "lower": 0.74, "base": 0.8}[zone] + rng.uniform(-0.04, 0.04)
    v = anatomy.apex_v + t * (anatomy.base_v[side] - anatomy.apex_v)
    inner = float(mediastinal_border(np.asarray(v), anatomy, side))
    outer = anatomy.apex_d + (anatomy.lung_outer - anatomy.apex_d) * float(round_profile(np.asarray(t), 0.6))
    d = inner + (outer - inner) * rng.uniform(0.4, 0.6)
    return anatomy.midline + IMAGE_SIGN[side] * d, v


def _airspace_patch(
    rng: np.random.Generator,
    u: np.ndarray,
    v: np.ndarray,
    centre: tuple[float, float],
    size: float,
    texture: np.ndarray,
    patchiness: float,
) -> np.ndarray:
    """An irregular, ill-defined airspace opacity: a randomly oriented soft ellipse frayed by `texture`."""
    angle = rng.uniform(0, np.pi)
    along = (u - centre[0]) * math.cos(angle) + (v - centre[1]) * math.sin(angle)
    across = -(u - centre[0]) * math.sin(angle) + (v - centre[1]) * math.cos(angle)
    length, width = size * rng.uniform(1.0, 1.4), size * rng.uniform(0.6, 0.9)
    envelope = np.exp(-0.5 * ((along / length) ** 2 + (across / width) ** 2))
    return soft_step(envelope + patchiness * texture - 0.4, 0.9) * soft_step(envelope - 0.1, 0.15)


def draw_finding(
    rng: np.random.Generator,
    finding: Finding,
    u: np.ndarray,
    v: np.ndarray,
    anatomy: Anatomy,
    depth: dict[str, np.ndarray],
    markings: np.ndarray,
    texture: np.ndarray,
) -> list[np.ndarray]:
    """The density layers (one per box) a finding adds inside the lungs (`depth` per side). Lung air lowers
    the density by `air * (darkness - markings)`; fluid or tissue filling a fraction of it adds that back,
    dense ones a little more."""
    category, side, severity = finding.category, finding.side, finding.severity
    air = {key: air_column(value) for key, value in depth.items()}
    aerated = {key: value * (LUNG_DARKNESS - markings) for key, value in air.items()}
    lung = {key: soft_step(value, EDGE) for key, value in depth.items()}
    if category == "Pleural Effusion":  # as dense as the abdomen below, with a meniscus
        d = IMAGE_SIGN[side] * (u - anatomy.midline)
        height = (0.07, 0.12, 0.18)[severity] + rng.uniform(-0.01, 0.01)
        lateral = np.clip((d - 0.1) / (anatomy.lung_outer - 0.1), 0, 1)
        meniscus = anatomy.base_v[side] - height - 0.07 * lateral**2  # fluid climbs the lateral chest wall
        fluid = soft_step(v - meniscus, 0.03) * (0.8 + 0.2 * soft_step(v - meniscus - 0.05, 0.1))
        return [fluid * (aerated[side] + 0.24 * lung[side])]
    if category == "Pneumothorax":  # air without lung: darker, no vessel markings, a thin pleural line
        width = (0.045, 0.07, 0.1)[severity]
        extent = anatomy.apex_v + (0.35, 0.45, 0.55)[severity] * (anatomy.base_v[side] - anatomy.apex_v)
        upper = soft_step(extent - v, 0.05)
        collapsed = lung_depth(u, v, anatomy, side, shrink=width, apex_drop=0.7 * width)
        rim = soft_step(-collapsed, EDGE) * upper * air[side]
        lateral_part = IMAGE_SIGN[side] * (u - anatomy.midline) > anatomy.apex_d - 0.04
        pleural_line = np.exp(-((collapsed / 0.004) ** 2)) * (air[side] > 0.5) * upper * lateral_part
        return [-rim * (0.14 + markings) + 0.12 * pleural_line]
    if category == "Edema":  # bilateral perihilar haze, one layer per lung
        strength = (0.6, 0.7, 0.8)[severity]
        layers = []
        for lung_side in ("right", "left"):
            du = IMAGE_SIGN[lung_side] * (u - anatomy.midline) - mediastinal_border(v, anatomy, lung_side)
            haze = np.exp(-(((du - 0.03) / 0.11) ** 2 + ((v - anatomy.hilum_v) / 0.15) ** 2))
            layers.append(strength * haze * (0.8 + 0.2 * texture) * aerated[lung_side])
        return layers
    if category == "Atelectasis":  # a plate-like band at the base
        cu, cv = _zone_centre(rng, anatomy, side, "base")
        angle = rng.uniform(-0.3, 0.3) * IMAGE_SIGN[side]
        along = (u - cu) * math.cos(angle) + (v - cv) * math.sin(angle)
        across = -(u - cu) * math.sin(angle) + (v - cv) * math.cos(angle)
        half_length, thickness = rng.uniform(0.08, 0.12), rng.uniform(0.012, 0.018)
        band = np.exp(-((across / thickness) ** 2)) * soft_step(half_length - np.abs(along), 0.05)
        return [band * (aerated[side] + 0.05 * lung[side])]
    centre = _zone_centre(rng, anatomy, side, finding.zone)
    if category == "Lung Opacity":  # hazy and faint
        size = rng.uniform(0.055, 0.075)
        haze = np.exp(-(((u - centre[0]) ** 2 + (v - centre[1]) ** 2) / (2 * size**2)))
        return [0.55 * haze * (0.8 + 0.2 * texture) * aerated[side]]
    if category == "Consolidation":  # dense, fairly compact
        patch = _airspace_patch(rng, u, v, centre, 0.045, texture, 0.25)
        return [patch * (aerated[side] + 0.08 * lung[side])]
    # Pneumonia: larger, patchier airspace disease.
    patch = _airspace_patch(rng, u, v, centre, 0.06, texture, 0.45)
    return [patch * (aerated[side] + 0.05 * lung[side])]
