"""Embedded synthetic chest X-ray dataset, written exactly in the MIMIC-CXR-JPG + reports + MS-CXR layout.

Why: tests, demos and CPU smoke runs need images, reports and grounding boxes without credentialed
PhysioNet access. The files have exactly the layout, columns and value conventions of the distributed
datasets, so the one real-data reader (datamodules.mimic, datamodules.mscxr) reads them unchanged.

Each study gets one frontal radiograph (PA or AP) drawn from vectorised coordinate grids (body outline,
air-filled lungs, heart and mediastinum, ribs, clavicles, spine, diaphragm domes), 0-2 findings from the
8 MS-CXR categories drawn at an anatomically plausible place with their true bounding boxes, a MIMIC-style
report naming them, a CheXpert row and MS-CXR rows. About 10% of studies also get a lateral image so a view
filter has something to drop. Same (n, resolution, seed) gives identical bytes for every file.

    python -m datamodules.synthetic --out /tmp/synthetic --n 1000 --resolution 256 --seed 0
"""

from __future__ import annotations

import argparse
import csv
import gzip
import io
import math
import shutil
import tempfile
import textwrap
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from datamodules.mimic import CHEXPERT_LABELS, CHEXPERT_STEM, METADATA_STEM, REQUIRED_COLUMNS, SPLIT_STEM
from datamodules.mscxr import MS_CXR_CATEGORIES
from datamodules.mscxr import MS_CXR_COLUMNS as MS_CXR_BASE_COLUMNS

METADATA_COLUMNS = (
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
)
SPLIT_COLUMNS = REQUIRED_COLUMNS[SPLIT_STEM]
CHEXPERT_COLUMNS = ("subject_id", "study_id", *CHEXPERT_LABELS)
MS_CXR_COLUMNS = (*MS_CXR_BASE_COLUMNS, "split")  # the v1.1.0 layout
METADATA_FILE = f"{METADATA_STEM}.csv.gz"
SPLIT_FILE = f"{SPLIT_STEM}.csv.gz"
CHEXPERT_FILE = f"{CHEXPERT_STEM}.csv.gz"
MS_CXR_FILE = "MS_CXR_Local_Alignment_v1.1.0.csv"
JPEG_QUALITY = 95

_MS_CXR_SPLIT = {"train": "train", "validate": "val", "test": "test"}
_VIEW_CODE = {"PA": "postero-anterior", "AP": "antero-posterior", "LATERAL": "lateral"}
_ORIENTATION = {"PA": "Erect", "AP": "Recumbent", "LATERAL": "Erect"}
# Patient's right is the image's left (radiological convention).
_IMAGE_SIGN = {"right": -1.0, "left": 1.0}
_EDGE = 0.006  # soft-edge width of anatomical outlines, in image-width units
_MIN_DRAWN_WIDTH = 128  # smaller images are drawn at this width and reduced

# --------------------------------------------------------------------------------------------------------
# Study plan: ids, subjects, splits, views (all from one layout generator, so independent of rendering).


@dataclass(frozen=True)
class _Image:
    dicom_id: str
    view_position: str  # PA | AP | LATERAL | "" (a metadata row with an empty ViewPosition)
    view: str  # what was drawn: PA | AP | LATERAL


@dataclass(frozen=True)
class _Study:
    subject_id: int
    study_id: int
    split: str
    images: tuple[_Image, ...]  # the frontal image first
    study_date: int
    study_time: float

    @property
    def procedure(self) -> str:
        """PerformedProcedureStepDescription, also the report's EXAMINATION line."""
        if self.images[0].view == "AP":
            return "CHEST (PORTABLE AP)"
        return "CHEST (PA AND LAT)" if len(self.images) > 1 else "CHEST (PA)"

    @property
    def folder(self) -> str:
        subject = str(self.subject_id)
        return f"files/p{subject[:2]}/p{subject}/s{self.study_id}"


def _pick(rng: np.random.Generator, options: Sequence[str]) -> str:
    return options[int(rng.integers(len(options)))]


def _dicom_id(rng: np.random.Generator) -> str:
    return "-".join(f"{part:08x}" for part in rng.integers(0, 2**32, size=5, dtype=np.uint64))


def _plan_studies(rng: np.random.Generator, n: int) -> list[_Study]:
    """Subjects with 1-2 studies, an 80/10/10 split by subject (every split non-empty), ~10% laterals."""
    subject_of_study: list[int] = []
    for _ in range(n):
        second_study = n >= 10 and subject_of_study and rng.random() < 0.2
        if second_study and subject_of_study.count(subject_of_study[-1]) == 1:
            subject_of_study.append(subject_of_study[-1])
        else:
            subject_of_study.append(len(set(subject_of_study)))
    n_subjects = subject_of_study[-1] + 1
    subject_ids = 10_000_000 + rng.choice(10_000_000, size=n_subjects, replace=False)
    study_ids = 50_000_000 + rng.choice(10_000_000, size=n, replace=False)
    n_held_out = max(1, round(0.1 * n_subjects))
    order = rng.permutation(n_subjects)
    subject_split = {int(s): "train" for s in order[2 * n_held_out :]}
    subject_split |= {int(s): "validate" for s in order[:n_held_out]}
    subject_split |= {int(s): "test" for s in order[n_held_out : 2 * n_held_out]}
    lateral_studies = np.sort(rng.choice(n, size=max(1, round(0.1 * n)), replace=False))
    n_empty_view = 0 if len(lateral_studies) < 2 else 1 if len(lateral_studies) < 10 else 2
    empty_view_studies = set(lateral_studies[:n_empty_view].tolist())
    studies = []
    for index in range(n):
        has_lateral = index in lateral_studies
        frontal = "PA" if has_lateral or rng.random() < 0.6 else "AP"
        images = [_Image(_dicom_id(rng), frontal, frontal)]
        if has_lateral:
            lateral_position = "" if index in empty_view_studies else "LATERAL"
            images.append(_Image(_dicom_id(rng), lateral_position, "LATERAL"))
        year, month, day = rng.integers(2110, 2190), rng.integers(1, 13), rng.integers(1, 29)
        seconds = rng.uniform(0, 86_400)
        hhmmss = int(seconds // 3600) * 10_000 + int(seconds % 3600 // 60) * 100 + seconds % 60
        studies.append(
            _Study(
                subject_id=int(subject_ids[subject_of_study[index]]),
                study_id=int(study_ids[index]),
                split=subject_split[subject_of_study[index]],
                images=tuple(images),
                study_date=int(year * 10_000 + month * 100 + day),
                study_time=round(float(hhmmss), 3),
            )
        )
    return studies


# --------------------------------------------------------------------------------------------------------
# Findings: what is drawn, and how the report names it.


@dataclass(frozen=True)
class _Finding:
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


def _sample_findings(rng: np.random.Generator) -> list[_Finding]:
    """0-2 distinct MS-CXR categories per frontal image, ~35% normal, each with laterality and zone."""
    count = int(rng.choice(3, p=[0.35, 0.4, 0.25]))
    findings = []
    for index in rng.choice(len(MS_CXR_CATEGORIES), size=count, replace=False):
        category = MS_CXR_CATEGORIES[int(index)]
        side = "bilateral" if category in ("Cardiomegaly", "Edema") else _pick(rng, ("right", "left"))
        zone = _FIXED_ZONE.get(category) or _pick(rng, ("upper", "middle", "lower"))
        findings.append(_Finding(category, side, zone, severity=int(rng.integers(0, 3))))
    return findings


# --------------------------------------------------------------------------------------------------------
# Rendering: densities (bright = attenuating, about 0..1) on broadcast float32 grids u (1, W) and v (H, 1)
# in image-relative units; d is the distance from the midline towards one of the patient's sides.

_LUNG_DARKNESS = 0.32  # how much a full air column lowers the density


@dataclass(frozen=True)
class _Anatomy:
    midline: float
    apex_v: float
    base_v: dict[str, float]  # costophrenic-angle level per patient side (the right dome sits higher)
    apex_d: float  # distance of a lung apex from the midline
    lung_outer: float  # lateral lung edge from the midline
    dome_height: float
    heart_v: float  # level of the heart's widest point
    heart_height: float
    heart_reach: dict[str, float]  # how far the cardiac border bulges from the midline, per patient side
    knob_v: float  # aortic knob level
    hilum_v: float
    rib_spacing: float
    rib_phase: float
    body_half_width: float


def _sample_anatomy(rng: np.random.Generator, view: str, heart_scale: float) -> _Anatomy:
    apex_v = rng.uniform(0.09, 0.13)
    base_right = rng.uniform(0.7, 0.76)
    heart = heart_scale * (1.06 if view == "AP" else 1.0)  # the heart projects larger on AP films
    return _Anatomy(
        midline=0.5 + rng.uniform(-0.015, 0.015),
        apex_v=apex_v,
        base_v={"right": base_right, "left": base_right + rng.uniform(0.01, 0.035)},
        apex_d=rng.uniform(0.14, 0.17),
        lung_outer=rng.uniform(0.37, 0.41),
        dome_height=rng.uniform(0.05, 0.08),
        heart_v=base_right - rng.uniform(0.05, 0.08),
        heart_height=rng.uniform(0.14, 0.17) * min(heart, 1.15),
        heart_reach={"right": rng.uniform(0.08, 0.1) * heart, "left": rng.uniform(0.18, 0.21) * heart},
        knob_v=apex_v + rng.uniform(0.13, 0.16),
        hilum_v=apex_v + rng.uniform(0.25, 0.29),
        rib_spacing=rng.uniform(0.075, 0.085),
        rib_phase=rng.uniform(0, 1),
        body_half_width=rng.uniform(0.44, 0.47),
    )


def _soft_step(x: np.ndarray, width: float) -> np.ndarray:
    """0 below -width/2, 1 above +width/2, a smooth cubic ramp between: anti-aliased outlines."""
    s = x * (1.0 / width)
    s += 0.5
    np.clip(s, 0.0, 1.0, out=s)
    squared = s * s
    s *= -2.0
    s += 3.0
    s *= squared
    return s


def _round_profile(t: np.ndarray, reach: float) -> np.ndarray:
    """A quarter circle rising from 0 at t=0 to 1 at t=reach: the rounded outline of a lung apex."""
    return np.sqrt(1.0 - (1.0 - np.clip(t / reach, 0.0, 1.0)) ** 2)


def _mediastinal_border(v: np.ndarray, anatomy: _Anatomy, side: str) -> np.ndarray:
    """Per row, how far the mediastinum (trachea, aortic knob, heart) reaches from the midline on one side."""
    above = anatomy.heart_height * (1.3 if side == "left" else 0.9)  # the right atrium starts lower
    extent = np.where(v > anatomy.heart_v, np.float32(1.6 * anatomy.heart_height), np.float32(above))
    cardiac = np.clip(1 - ((v - anatomy.heart_v) / extent) ** 2, 0, 1) ** 0.7
    border = 0.045 + (anatomy.heart_reach[side] - 0.045) * cardiac
    if side == "left":
        border = border + 0.035 * np.exp(-(((v - anatomy.knob_v) / 0.03) ** 2))
    return border


def _lung_depth(
    u: np.ndarray, v: np.ndarray, anatomy: _Anatomy, side: str, shrink: float = 0.0, apex_drop: float = 0.0
) -> np.ndarray:
    """Signed depth inside one lung (width units): rounded apex, convex lateral wall, mediastinum medially,
    diaphragm dome below. `shrink`/`apex_drop` give the collapsed lung of a pneumothorax."""
    d = _IMAGE_SIGN[side] * (u - anatomy.midline)
    base = anatomy.base_v[side]
    apex = anatomy.apex_v + apex_drop
    t = (v - apex) / (base - apex)
    d_in = anatomy.apex_d - (anatomy.apex_d - 0.04) * _round_profile(t, 0.3)
    d_in = np.maximum(d_in, _mediastinal_border(v, anatomy, side))
    d_out = anatomy.apex_d + (anatomy.lung_outer - shrink - anatomy.apex_d) * _round_profile(t, 0.6)
    return np.minimum(np.minimum(d - d_in, d_out - d), np.minimum(_dome(u, anatomy, side) - v, v - apex))


def _dome(u: np.ndarray, anatomy: _Anatomy, side: str) -> np.ndarray:
    """Per column, the level of one hemidiaphragm: flat under the heart, lowest at the costophrenic angle."""
    d = _IMAGE_SIGN[side] * (u - anatomy.midline)
    peak = 0.5 * (0.06 + anatomy.lung_outer)
    bump = np.clip(1 - (np.clip(d - peak, 0, None) / (anatomy.lung_outer - peak)) ** 2, 0, 1)
    return anatomy.base_v[side] - anatomy.dome_height * bump


def _air(depth: np.ndarray) -> np.ndarray:
    """Air column through a lung: thin at its edges, full a few percent inside them (a rounded look)."""
    return _soft_step(depth, _EDGE) * (0.35 + 0.65 * np.sqrt(np.clip(depth / 0.08, 0, 1)))


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], cells: int) -> np.ndarray:
    """Band-limited noise in [-1, 1]: a coarse random grid upsampled bicubically."""
    coarse = Image.fromarray(rng.standard_normal((cells, cells)).astype(np.float32))
    field = np.asarray(coarse.resize((shape[1], shape[0]), Image.Resampling.BICUBIC))
    return field / max(float(np.abs(field).max()), 1e-6)


def _pulmonary_vessels(rng: np.random.Generator, u: np.ndarray, v: np.ndarray, anatomy: _Anatomy) -> np.ndarray:
    """Lung markings: vessel trees branching out of each hilum, thinner and fainter towards the periphery.

    Drawn at a fixed, larger canvas and reduced, so they look the same (anti-aliased) at every resolution.
    """
    shape = (v.shape[0], u.shape[1])
    canvas_width = int(np.clip(2 * shape[1], 256, 512))
    canvas_height = round(canvas_width * shape[0] / shape[1])
    canvas = Image.new("F", (canvas_width, canvas_height), 0.0)
    draw = ImageDraw.Draw(canvas)

    hila = np.zeros(shape, dtype=np.float32)
    trunks = {"x": [], "y": [], "angle": []}
    for side in ("right", "left"):
        sign = _IMAGE_SIGN[side]
        border = float(_mediastinal_border(np.asarray(anatomy.hilum_v), anatomy, side))
        hilum_u = anatomy.midline + sign * (border + 0.02)
        hila += np.exp(-(((u - hilum_u) / 0.03) ** 2 + ((v - anatomy.hilum_v - 0.02) / 0.06) ** 2))
        downward = np.linspace(-1.3, 1.1, 5) + rng.uniform(-0.15, 0.15, 5)  # 0 = straight lateral
        trunks["x"] += [(anatomy.midline + sign * (border + 0.005)) * canvas_width] * 5
        trunks["y"] += list(anatomy.hilum_v * canvas_height + 0.02 * downward * canvas_width)
        trunks["angle"] += list(downward if sign > 0 else np.pi - downward)
    x, y, angle = (np.array(trunks[key]) for key in ("x", "y", "angle"))
    length, width = rng.uniform(0.06, 0.09, len(x)) * canvas_width, 0.016 * canvas_width
    for level in range(4):  # every branch is a wiggly 3-segment polyline that forks in two
        headings = angle[:, None] + rng.normal(0, 0.15, (len(x), 3)).cumsum(axis=1)
        xs = x[:, None] + np.cumsum(np.cos(headings) * length[:, None] / 3, axis=1)
        ys = y[:, None] + np.cumsum(np.sin(headings) * length[:, None] / 3, axis=1)
        shades = rng.uniform(0.6, 1.0, len(x)) * 0.6**level
        for start_x, start_y, line_x, line_y, shade in zip(x, y, xs, ys, shades, strict=True):
            points = [(start_x, start_y), *zip(line_x.tolist(), line_y.tolist(), strict=True)]
            draw.line(points, fill=float(shade), width=max(1, round(width)), joint="curve")
        forks = np.tile([-1.0, 1.0], len(x)) * rng.uniform(0.2, 0.6, 2 * len(x))
        x, y, angle = np.repeat(xs[:, -1], 2), np.repeat(ys[:, -1], 2), np.repeat(headings[:, -1], 2) + forks
        length, width = np.repeat(length, 2) * rng.uniform(0.6, 0.85, len(forks)), width * 0.65
    vessels = np.asarray(canvas.resize((shape[1], shape[0]), Image.Resampling.BILINEAR))
    return vessels + 0.5 * hila


def _ribs(u: np.ndarray, v: np.ndarray, anatomy: _Anatomy) -> np.ndarray:
    """Posterior rib arcs (rising from the spine, then curving down laterally) plus fainter anterior ones."""
    d = np.abs(u - anatomy.midline)
    posterior = (v + 0.35 * d - 2.0 * d**2) / anatomy.rib_spacing + anatomy.rib_phase
    anterior = (v + 0.5 * d) / (anatomy.rib_spacing * 1.3) + anatomy.rib_phase
    bands = np.clip((np.cos(2 * np.pi * posterior) - 0.2) / 0.8, 0, 1) ** 0.5
    bands = bands + 0.35 * np.clip((np.cos(2 * np.pi * anterior) - 0.4) / 0.6, 0, 1)
    cage = _soft_step(d - 0.04, 0.03) * _soft_step(anatomy.lung_outer + 0.05 - d, 0.03)
    return bands * cage * _soft_step(v - anatomy.apex_v + 0.05, 0.03) * _soft_step(anatomy.base_v["left"] - v, 0.08)


def _body(u: np.ndarray, v: np.ndarray, anatomy: _Anatomy) -> tuple[np.ndarray, np.ndarray]:
    """Soft body outline (neck, sloping shoulders, chest wall) and a tissue-thickness profile across it."""
    d = np.abs(u - anatomy.midline)
    shoulder_line = 0.1 * np.clip((d - 0.09) / 0.4, 0, 1) ** 0.7  # top edge of the shoulders
    chest_wall = np.maximum(anatomy.body_half_width + 0.03 * v, 0.6 - 1.2 * np.clip(v - 0.12, 0, None))
    body = _soft_step(v - shoulder_line, 0.03) * _soft_step(chest_wall - d, 0.03)
    thickness = np.sqrt(np.clip(1 - (d / chest_wall) ** 2, 0, 1))
    return body, thickness


def _clavicles(u: np.ndarray, v: np.ndarray, anatomy: _Anatomy) -> np.ndarray:
    """Two bright S-curved bands from the sternal ends out over the lung apices."""
    d = np.abs(u - anatomy.midline)
    along = np.clip((d - 0.04) / 0.28, 0, 1)
    centre = anatomy.apex_v + 0.04 - 0.07 * along + 0.025 * np.sin(np.pi * along)
    return np.exp(-(((v - centre) / 0.013) ** 2)) * _soft_step(d - 0.04, 0.02) * _soft_step(0.33 - d, 0.04)


def _support_box(layer: np.ndarray, fraction: float = 0.1) -> tuple[int, int, int, int] | None:
    """Pixel box (x, y, w, h) of where a drawn layer reaches `fraction` of its peak: its true extent."""
    magnitude = np.abs(layer)
    peak = float(magnitude.max())
    if peak <= 0.02:
        return None
    rows, cols = np.nonzero(magnitude >= fraction * peak)
    return int(cols.min()), int(rows.min()), int(cols.max() - cols.min() + 1), int(rows.max() - rows.min() + 1)


def _zone_centre(rng: np.random.Generator, anatomy: _Anatomy, side: str, zone: str) -> tuple[float, float]:
    """(u, v) of the middle of a lung zone, jittered; lower zones of the left lung sit lateral to the heart."""
    t = {"upper": 0.25, "middle": 0.5, "lower": 0.74, "base": 0.8}[zone] + rng.uniform(-0.04, 0.04)
    v = anatomy.apex_v + t * (anatomy.base_v[side] - anatomy.apex_v)
    inner = float(_mediastinal_border(np.asarray(v), anatomy, side))
    outer = anatomy.apex_d + (anatomy.lung_outer - anatomy.apex_d) * float(_round_profile(np.asarray(t), 0.6))
    d = inner + (outer - inner) * rng.uniform(0.4, 0.6)
    return anatomy.midline + _IMAGE_SIGN[side] * d, v


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
    return _soft_step(envelope + patchiness * texture - 0.4, 0.9) * _soft_step(envelope - 0.1, 0.15)


def _draw_finding(
    rng: np.random.Generator,
    finding: _Finding,
    u: np.ndarray,
    v: np.ndarray,
    anatomy: _Anatomy,
    depth: dict[str, np.ndarray],
    markings: np.ndarray,
    texture: np.ndarray,
) -> list[np.ndarray]:
    """The density layers (one per box) a finding adds inside the lungs (`depth` per side). Lung air lowers
    the density by `air * (darkness - markings)`; fluid or tissue filling a fraction of it adds that back,
    dense ones a little more."""
    category, side, severity = finding.category, finding.side, finding.severity
    air = {key: _air(value) for key, value in depth.items()}
    aerated = {key: value * (_LUNG_DARKNESS - markings) for key, value in air.items()}
    lung = {key: _soft_step(value, _EDGE) for key, value in depth.items()}
    if category == "Pleural Effusion":  # as dense as the abdomen below, with a meniscus
        d = _IMAGE_SIGN[side] * (u - anatomy.midline)
        height = (0.07, 0.12, 0.18)[severity] + rng.uniform(-0.01, 0.01)
        lateral = np.clip((d - 0.1) / (anatomy.lung_outer - 0.1), 0, 1)
        meniscus = anatomy.base_v[side] - height - 0.07 * lateral**2  # fluid climbs the lateral chest wall
        fluid = _soft_step(v - meniscus, 0.03) * (0.8 + 0.2 * _soft_step(v - meniscus - 0.05, 0.1))
        return [fluid * (aerated[side] + 0.24 * lung[side])]
    if category == "Pneumothorax":  # air without lung: darker, no vessel markings, a thin pleural line
        width = (0.045, 0.07, 0.1)[severity]
        extent = anatomy.apex_v + (0.35, 0.45, 0.55)[severity] * (anatomy.base_v[side] - anatomy.apex_v)
        upper = _soft_step(extent - v, 0.05)
        collapsed = _lung_depth(u, v, anatomy, side, shrink=width, apex_drop=0.7 * width)
        rim = _soft_step(-collapsed, _EDGE) * upper * air[side]
        lateral_part = _IMAGE_SIGN[side] * (u - anatomy.midline) > anatomy.apex_d - 0.04
        pleural_line = np.exp(-((collapsed / 0.004) ** 2)) * (air[side] > 0.5) * upper * lateral_part
        return [-rim * (0.14 + markings) + 0.12 * pleural_line]
    if category == "Edema":  # bilateral perihilar haze, one layer per lung
        strength = (0.6, 0.7, 0.8)[severity]
        layers = []
        for lung_side in ("right", "left"):
            du = _IMAGE_SIGN[lung_side] * (u - anatomy.midline) - _mediastinal_border(v, anatomy, lung_side)
            haze = np.exp(-(((du - 0.03) / 0.11) ** 2 + ((v - anatomy.hilum_v) / 0.15) ** 2))
            layers.append(strength * haze * (0.8 + 0.2 * texture) * aerated[lung_side])
        return layers
    if category == "Atelectasis":  # a plate-like band at the base
        cu, cv = _zone_centre(rng, anatomy, side, "base")
        angle = rng.uniform(-0.3, 0.3) * _IMAGE_SIGN[side]
        along = (u - cu) * math.cos(angle) + (v - cv) * math.sin(angle)
        across = -(u - cu) * math.sin(angle) + (v - cv) * math.cos(angle)
        half_length, thickness = rng.uniform(0.08, 0.12), rng.uniform(0.012, 0.018)
        band = np.exp(-((across / thickness) ** 2)) * _soft_step(half_length - np.abs(along), 0.05)
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


def _image_grid(rng: np.random.Generator, resolution: int) -> tuple[tuple[int, int], np.ndarray, np.ndarray]:
    """The output size (width = resolution, height = width * U(1.0, 1.2): portrait) and pixel-centre coordinates
    of the canvas drawn on, at least _MIN_DRAWN_WIDTH wide so that small images come out anti-aliased."""
    aspect = rng.uniform(1.0, 1.2)
    drawn_width = max(resolution, _MIN_DRAWN_WIDTH)
    drawn_height = round(drawn_width * aspect)
    u = ((np.arange(drawn_width, dtype=np.float32) + 0.5) / drawn_width)[None, :]
    v = ((np.arange(drawn_height, dtype=np.float32) + 0.5) / drawn_height)[:, None]
    return (resolution, round(resolution * aspect)), u, v


def _resize(field: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A float field brought to size (width, height); reductions average (anti-aliasing)."""
    if field.shape == (size[1], size[0]):
        return field
    return np.asarray(Image.fromarray(field.astype(np.float32)).resize(size, Image.Resampling.BILINEAR))


def _finish(rng: np.random.Generator, density: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Output size, exposure, smooth intensity variation and quantum noise; 8-bit grey."""
    density = _resize(density, size)
    shape = density.shape
    density = density * (1 + 0.05 * _smooth_noise(rng, shape, 4)) * rng.uniform(0.93, 1.05)
    density = density + 0.01 * rng.standard_normal(shape, dtype=np.float32)
    return np.round(255 * np.clip(density, 0, 1)).astype(np.uint8)


def _render_frontal(rng: np.random.Generator, resolution: int, view: str) -> tuple[np.ndarray, list[_Finding]]:
    """A frontal radiograph (uint8, portrait, short side = resolution) and its findings with boxes."""
    size, u, v = _image_grid(rng, resolution)
    shape = (v.shape[0], u.shape[1])
    findings = _sample_findings(rng)
    cardiomegaly = [f.severity for f in findings if f.category == "Cardiomegaly"]
    heart_scale = (1.25, 1.35, 1.45)[cardiomegaly[0]] if cardiomegaly else 1.0
    anatomy = _sample_anatomy(rng, view, heart_scale)
    offset = u - anatomy.midline
    d = np.abs(offset)
    borders = {side: _mediastinal_border(v, anatomy, side) for side in ("right", "left")}
    mediastinum = _soft_step(np.minimum(borders["left"] - offset, borders["right"] + offset), _EDGE)
    mediastinum = mediastinum * _soft_step(anatomy.base_v["left"] - v, 0.04)
    heart = mediastinum * _soft_step(v - anatomy.heart_v + 0.9 * anatomy.heart_height, 0.05)
    markings = 0.13 * _pulmonary_vessels(rng, u, v, anatomy)
    darkness = _LUNG_DARKNESS * (1 - 0.2 * np.clip((v - anatomy.hilum_v) / 0.4, 0, 1))  # lower lungs denser
    depth = {side: _lung_depth(u, v, anatomy, side) for side in ("right", "left")}
    air = {side: _air(value) for side, value in depth.items()}
    all_air = air["right"] + air["left"]
    body, thickness = _body(u, v, anatomy)
    spine = _soft_step(0.03 - d, 0.012) * (0.8 + 0.2 * np.cos(2 * np.pi * v / 0.045))
    trachea = _soft_step(0.017 - d, 0.01) * _soft_step(anatomy.hilum_v - 0.05 - v, 0.05)
    diaphragm = np.where(offset < 0, _dome(u, anatomy, "right"), _dome(u, anatomy, "left"))
    flank = np.clip(d - anatomy.lung_outer, 0, None)  # beside the lungs the abdomen's top edge is vague
    abdomen = _soft_step(v - diaphragm - flank, _EDGE + 2 * flank)  # complements the lungs' lower edge
    abdomen = abdomen * _soft_step(anatomy.lung_outer + 0.03 - d, 0.1)
    bubble = _soft_step(1 - np.hypot((offset - 0.18) / 0.05, (v - anatomy.base_v["left"] - 0.04) / 0.025), 0.4)
    solid = np.maximum(abdomen, mediastinum * (0.8 + 0.2 * heart))  # heart and liver merge at the diaphragm
    density = body * (0.36 + 0.14 * thickness + 0.24 * solid)
    density += body * (0.04 * spine * (1 - 0.6 * heart) - 0.08 * trachea - 0.07 * bubble)
    density += _ribs(u, v, anatomy) * (0.015 + 0.045 * all_air) + 0.1 * _clavicles(u, v, anatomy) * body
    density -= all_air * (darkness - markings)
    texture = _smooth_noise(rng, shape, 32) if findings else np.zeros(shape, np.float32)
    placed = []
    for finding in findings:
        if finding.category == "Cardiomegaly":
            layers = [heart]
        else:
            layers = _draw_finding(rng, finding, u, v, anatomy, depth, markings, texture)
            for layer in layers:
                density += layer
        boxes = tuple(box for box in (_support_box(_resize(layer, size)) for layer in layers) if box is not None)
        if boxes:
            placed.append(replace(finding, boxes=boxes))
    return _finish(rng, density, size), placed


def _render_lateral(rng: np.random.Generator, resolution: int) -> np.ndarray:
    """A plausible lateral view: sternum to the image's left, vertebral column to the right, raised arms
    on top, one large air space with the heart in front and the diaphragm sloping down to the back."""
    size, u, v = _image_grid(rng, resolution)
    shift = rng.uniform(-0.03, 0.03)
    u = u + shift
    front, back = 0.1 + 0.3 * (v - 0.55) ** 2, 0.93 - 0.2 * (v - 0.5) ** 2
    trunk = _soft_step(u - front, 0.02) * _soft_step(back - u, 0.03)
    dome = 0.63 + 0.17 * ((u - 0.15) / 0.7) ** 2
    lung_shape = 0.3 * (1 - np.hypot((u - 0.5) / 0.33, (v - 0.47) / 0.42))
    air = _air(np.minimum(np.minimum(lung_shape, dome - v), u - front - 0.05))
    heart = _soft_step(1 - np.hypot((u - 0.32) / 0.17, (v - 0.64) / 0.16), 0.3)
    column = np.abs(u - 0.79 + 0.1 * (v - 0.5) ** 2)
    vertebrae = _soft_step(np.cos(2 * np.pi * (v / 0.056 + shift)) + 0.7, 0.4)  # bodies with disc spaces
    spine = _soft_step(0.045 - column, 0.015) * (0.5 + 0.5 * vertebrae)
    trachea = _soft_step(0.02 - np.abs(u - 0.5 - 0.17 * v), 0.015) * _soft_step(0.36 - v, 0.04)
    arms = _soft_step(0.17 - v - 0.3 * (u - 0.5) ** 2, 0.08)
    sternum = np.exp(-(((u - front - 0.02) / 0.008) ** 2)) * _soft_step(0.6 - v, 0.05)
    abdomen = _soft_step(v - dome, 0.02)
    density = trunk * (0.48 + 0.18 * abdomen + 0.1 * arms + 0.16 * spine + 0.06 * sternum - 0.04 * trachea)
    density -= 0.3 * air * (1 - 0.6 * heart)
    return _finish(rng, density, size)


# --------------------------------------------------------------------------------------------------------
# Reports.

_SIZE = ("small", "moderate", "large")
_GRADE = ("mild", "moderate", "severe")
_LOBE = {
    ("right", "upper"): "right upper lobe",
    ("right", "middle"): "right middle lobe",
    ("right", "lower"): "right lower lobe",
    ("left", "upper"): "left upper lobe",
    ("left", "middle"): "lingula",
    ("left", "lower"): "left lower lobe",
}
_ZONE = {"upper": "upper lung", "middle": "mid lung", "lower": "lower lung"}
# Impression phrases (the MS-CXR label_text); each names its category with one of method.md's query words.
_IMPRESSION_TEMPLATES = {
    "Atelectasis": (
        "{Side} basilar atelectasis",
        "Linear atelectasis at the {side} lung base",
        "Plate-like atelectasis in the {side} lower lobe",
        "Minimal {side} basal atelectasis",
    ),
    "Cardiomegaly": (
        "{Grade} cardiomegaly",
        "{Grade} enlargement of the cardiac silhouette",
        "The cardiac silhouette is {grade}ly enlarged",
    ),
    "Consolidation": (
        "{Lobe_adj} consolidation",
        "Focal consolidation in the {lobe}",
        "Dense consolidation in the {side} {zone}",
    ),
    "Edema": ("{Grade} pulmonary edema", "{Grade} perihilar edema", "{Grade} interstitial pulmonary edema"),
    "Lung Opacity": (
        "Hazy {side} {zone} opacity",
        "Ill-defined opacity in the {side} {zone}",
        "Patchy opacities in the {lobe}",
        "Faint opacification of the {side} {zone}",
    ),
    "Pleural Effusion": (
        "{Size} {side} pleural effusion",
        "{Side} pleural effusion, {size} in size",
        "{Size} {side} effusion with blunting of the costophrenic angle",
    ),
    "Pneumonia": (
        "{Lobe_adj} pneumonia",
        "Pneumonia in the {lobe}",
        "Findings concerning for {side} {zone} pneumonia",
    ),
    "Pneumothorax": (
        "{Size} {side} apical pneumothorax",
        "{Side} apical pneumothorax",
        "{Size} {side} pneumothorax at the apex",
    ),
}
_FINDINGS_TEMPLATES = {
    "Atelectasis": (
        "There is linear atelectasis at the {side} lung base.",
        "Streaky {side} basilar opacity is compatible with atelectasis.",
    ),
    "Cardiomegaly": ("The heart is {grade}ly enlarged.", "There is {grade} cardiomegaly."),
    "Consolidation": (
        "There is focal consolidation in the {lobe}.",
        "A dense consolidation is seen in the {side} {zone}.",
    ),
    "Edema": (
        "There is {grade} perihilar haziness consistent with pulmonary edema.",
        "Vascular congestion with {grade} interstitial edema.",
    ),
    "Lung Opacity": (
        "There is a hazy opacity in the {side} {zone}.",
        "Ill-defined opacities are seen in the {lobe}.",
    ),
    "Pleural Effusion": (
        "There is a {size} {side} pleural effusion.",
        "Blunting of the {side} costophrenic angle reflects a {size} effusion.",
    ),
    "Pneumonia": (
        "Patchy airspace disease in the {lobe} is concerning for pneumonia.",
        "Findings in the {side} {zone} are compatible with pneumonia.",
    ),
    "Pneumothorax": (
        "There is a {size} {side} apical pneumothorax.",
        "A {side} apical pleural line is seen with a {size} pneumothorax.",
    ),
}
# Explicit negations, and the CheXpert columns they set to 0.0.
_NEGATIONS = (
    ("No pleural effusion or pneumothorax.", ("Pleural Effusion", "Pneumothorax")),
    ("No pleural effusion.", ("Pleural Effusion",)),
    ("No pneumothorax.", ("Pneumothorax",)),
    ("No focal consolidation.", ("Consolidation",)),
    ("Heart size is normal.", ("Cardiomegaly",)),
    ("No pulmonary edema.", ("Edema",)),
    ("No evidence of pneumonia.", ("Pneumonia",)),
)
_NORMAL_IMPRESSIONS = (
    "No acute cardiopulmonary process.",
    "No acute intrathoracic process.",
    "Normal chest radiograph.",
)
_INDICATIONS = (
    "___F with cough",
    "___M with shortness of breath",
    "___F with fever and productive cough",
    "___M with chest pain",
    "___-year-old woman with dyspnea",
    "___-year-old man, preoperative evaluation",
)
_REPORT_WIDTH = 78
_KEEP_TOGETHER = "\x00"  # stands in for spaces inside a finding phrase so wrapping never splits it


def _fill(template: str, finding: _Finding) -> str:
    zone = finding.zone if finding.zone in _ZONE else "lower"
    words = {
        "side": finding.side,
        "zone": _ZONE[zone],
        "lobe": _LOBE.get((finding.side, zone), ""),
        "lobe_adj": "lingular" if (finding.side, zone) == ("left", "middle") else _LOBE.get((finding.side, zone)),
        "size": _SIZE[finding.severity],
        "grade": _GRADE[finding.severity],
    }
    words |= {key.capitalize(): str(value).capitalize() for key, value in words.items()}
    text = template.format(**words)
    return text[0].upper() + text[1:]


def _wrap(sentences: Iterable[str]) -> list[str]:
    """MIMIC-style lines: wrapped at ~78 characters with a leading space, finding phrases never split."""
    paragraph = "  ".join(sentences)
    lines = textwrap.wrap(paragraph, _REPORT_WIDTH, break_long_words=False, break_on_hyphens=False)
    return [" " + line.replace(_KEEP_TOGETHER, " ") for line in lines]


def _write_report(
    rng: np.random.Generator, study: _Study, findings: list[_Finding]
) -> tuple[str, list[str], dict[str, float]]:
    """Report text, each finding's label phrase (as it appears in the report), and CheXpert labels."""
    frontal = study.images[0].view
    if frontal == "AP":
        technique = "AP portable upright view of the chest."
    elif len(study.images) > 1:
        technique = "PA and lateral views of the chest provided."
    else:
        technique = "Single frontal view of the chest provided."
    has_impression = rng.random() >= 0.1
    present = {finding.category for finding in findings}
    labels = {category: 1.0 for category in present}
    phrases = [_fill(_pick(rng, _IMPRESSION_TEMPLATES[f.category]), f) for f in findings]
    kept = [phrase.replace(" ", _KEEP_TOGETHER) + "." for phrase in phrases]
    absent_negations = [(text, cols) for text, cols in _NEGATIONS if not present & set(cols)]
    chosen = rng.choice(len(absent_negations), size=min(len(absent_negations), 2), replace=False)
    negations = [absent_negations[int(i)] for i in sorted(chosen)]
    for _, columns in negations:
        labels |= {column: 0.0 for column in columns}
    if not findings:
        labels["No Finding"] = 1.0
        body = [technique, _pick(rng, ("The lungs are clear.", "Lungs are clear bilaterally."))]
        body += [text for text, _ in negations] + ["The cardiomediastinal silhouette is within normal limits."]
        impression = [_pick(rng, _NORMAL_IMPRESSIONS)]
    else:
        described = (
            kept if not has_impression else [_fill(_pick(rng, _FINDINGS_TEMPLATES[f.category]), f) for f in findings]
        )
        body = [technique, *described, *(text for text, _ in negations)]
        impression = kept
    lines = [
        " " * 33 + "FINAL REPORT",
        f" EXAMINATION:  {study.procedure}",
        " ",
        f" INDICATION:  {_pick(rng, _INDICATIONS)}",
        " ",
        " COMPARISON:  ___",
        " ",
        " FINDINGS:",
        " ",
        *_wrap(body),
    ]
    if has_impression:
        if len(impression) > 1 and rng.random() < 0.5:
            numbered = [f" {i}. {text.replace(_KEEP_TOGETHER, ' ')}" for i, text in enumerate(impression, 1)]
        else:
            numbered = _wrap(impression)
        lines += [" ", " IMPRESSION:", " ", *numbered]
    return "\n".join(lines) + "\n", phrases, labels


# --------------------------------------------------------------------------------------------------------
# Files.


def _csv_bytes(columns: Sequence[str], rows: Iterable[dict]) -> bytes:
    """CSV text in `columns` order; a column a row lacks is an empty cell (CheXpert's "not mentioned")."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n", extrasaction="raise")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue().encode()


def _save_jpeg(path: Path, pixels: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, format="JPEG", quality=JPEG_QUALITY)


def _write_study(
    rng: np.random.Generator, study: _Study, out_dir: Path, resolution: int, tables: dict[str, list[dict]]
) -> None:
    """Draw and save a study's images and report; append its rows to the tables (keyed by file name)."""
    for image in study.images:
        if image.view == "LATERAL":
            pixels = _render_lateral(rng, resolution)
        else:
            pixels, findings = _render_frontal(rng, resolution, image.view)
        relative_path = f"{study.folder}/{image.dicom_id}.jpg"
        _save_jpeg(out_dir / relative_path, pixels)
        height, width = pixels.shape
        ids = {"dicom_id": image.dicom_id, "subject_id": study.subject_id, "study_id": study.study_id}
        tables[METADATA_FILE].append(
            ids
            | {
                "PerformedProcedureStepDescription": study.procedure,
                "ViewPosition": image.view_position,
                "Rows": height,
                "Columns": width,
                "StudyDate": study.study_date,
                "StudyTime": f"{study.study_time:.3f}",
                "ProcedureCodeSequence_CodeMeaning": study.procedure,
                "ViewCodeSequence_CodeMeaning": _VIEW_CODE[image.view],
                "PatientOrientationCodeSequence_CodeMeaning": _ORIENTATION[image.view],
            }
        )
        tables[SPLIT_FILE].append(ids | {"split": study.split})
        if image.view == "LATERAL":
            continue
        report, phrases, labels = _write_report(rng, study, findings)
        (out_dir / f"{study.folder}.txt").write_text(report)
        labels = {column: f"{value:.1f}" for column, value in labels.items()}
        tables[CHEXPERT_FILE].append({"subject_id": study.subject_id, "study_id": study.study_id} | labels)
        for finding, phrase in zip(findings, phrases, strict=True):
            tables[MS_CXR_FILE].extend(
                {"dicom_id": image.dicom_id, "category_name": finding.category, "label_text": phrase}
                | {"path": relative_path, "x": x, "y": y, "w": w, "h": h}
                | {"image_width": width, "image_height": height, "split": _MS_CXR_SPLIT[study.split]}
                for x, y, w, h in finding.boxes
            )


def generate_synthetic_dataset(out_dir: Path, n: int, resolution: int, seed: int) -> Path:
    """Write n synthetic studies in the MIMIC-CXR-JPG + reports + MS-CXR layout into out_dir; return it."""
    if n < 3:
        raise ValueError(f"n must be at least 3 studies (one per split), got {n}")
    if resolution < 32:
        raise ValueError(f"resolution must be at least 32 px, got {resolution}")
    if seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    layout_seed, *study_seeds = np.random.SeedSequence(seed).spawn(n + 1)
    columns = {
        METADATA_FILE: METADATA_COLUMNS,
        SPLIT_FILE: SPLIT_COLUMNS,
        CHEXPERT_FILE: CHEXPERT_COLUMNS,
        MS_CXR_FILE: MS_CXR_COLUMNS,
    }
    tables: dict[str, list[dict]] = {name: [] for name in columns}
    for study, study_seed in zip(_plan_studies(np.random.default_rng(layout_seed), n), study_seeds, strict=True):
        _write_study(np.random.default_rng(study_seed), study, out_dir, resolution, tables)
    for name, rows in tables.items():
        table = _csv_bytes(columns[name], rows)
        # gzip with mtime=0 and no stored file name, so the bytes depend only on the content.
        (out_dir / name).write_bytes(gzip.compress(table, mtime=0) if name.endswith(".gz") else table)
    return out_dir


def ensure_synthetic_dataset(cache_dir: Path, n: int, resolution: int, seed: int) -> Path:
    """`cache_dir/synthetic-n{n}-r{resolution}-s{seed}`, generated first if absent.

    Generation happens in a temporary sibling folder renamed into place when complete, so an interrupted run
    never leaves a folder that looks finished, and concurrent callers (e.g. DDP ranks) each get a whole one.
    """
    cache_dir = Path(cache_dir)
    target = cache_dir / f"synthetic-n{n}-r{resolution}-s{seed}"
    if target.is_dir():
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=cache_dir))
    try:
        generate_synthetic_dataset(scratch, n, resolution, seed)
        scratch.rename(target)
    except OSError:
        if not target.is_dir():  # a concurrent caller finishing first is fine; anything else is not
            raise
    finally:
        if scratch.exists():
            shutil.rmtree(scratch)
    return target


def _summary(out_dir: Path, seconds: float) -> str:
    with gzip.open(out_dir / METADATA_FILE, "rt") as file:
        views = Counter(row["ViewPosition"] or "(empty)" for row in csv.DictReader(file))
    with gzip.open(out_dir / CHEXPERT_FILE, "rt") as file:
        rows = list(csv.DictReader(file))
    findings = Counter(c for row in rows for c in MS_CXR_CATEGORIES if row[c] == "1.0")
    normal = sum(row["No Finding"] == "1.0" for row in rows)
    per_category = ", ".join(f"{c} {findings[c]}" for c in MS_CXR_CATEGORIES)
    view_counts = ", ".join(f"{view} {count}" for view, count in sorted(views.items()))
    return (
        f"{out_dir}: {len(rows)} studies, {sum(views.values())} images ({view_counts}); "
        f"normal {normal}; findings: {per_category}; {seconds:.1f} s"
    )


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder to write the dataset into")
    parser.add_argument("--n", type=int, default=1000, help="number of studies")
    parser.add_argument("--resolution", type=int, default=256, help="short side of every image in pixels")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    generate_synthetic_dataset(args.out, args.n, args.resolution, args.seed)
    print(_summary(args.out, time.perf_counter() - start))


if __name__ == "__main__":
    main()
