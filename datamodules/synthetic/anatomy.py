"""Drawing the normal chest: anatomy sampled per image and the density layers of body, lungs, heart and bones.

Why a module of its own: these are the vectorised primitives every radiograph and every finding is built from.
Densities (bright = attenuating, about 0..1) live on broadcast float32 grids u (1, W) and v (H, 1) in
image-relative units; d is the distance from the midline towards one of the patient's sides, and the patient's
right is the image's left (radiological convention).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIGN = {"right": -1.0, "left": 1.0}  # image direction of each patient side
EDGE = 0.006  # soft-edge width of anatomical outlines, in image-width units
LUNG_DARKNESS = 0.32  # how much a full air column lowers the density


@dataclass(frozen=True)
class Anatomy:
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


def sample_anatomy(rng: np.random.Generator, view: str, heart_scale: float) -> Anatomy:
    apex_v = rng.uniform(0.09, 0.13)
    base_right = rng.uniform(0.7, 0.76)
    heart = heart_scale * (1.06 if view == "AP" else 1.0)  # the heart projects larger on AP films
    return Anatomy(
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


def soft_step(x: np.ndarray, width: float) -> np.ndarray:
    """0 below -width/2, 1 above +width/2, a smooth cubic ramp between: anti-aliased outlines."""
    s = x * (1.0 / width)
    s += 0.5
    np.clip(s, 0.0, 1.0, out=s)
    squared = s * s
    s *= -2.0
    s += 3.0
    s *= squared
    return s


def round_profile(t: np.ndarray, reach: float) -> np.ndarray:
    """A quarter circle rising from 0 at t=0 to 1 at t=reach: the rounded outline of a lung apex."""
    return np.sqrt(1.0 - (1.0 - np.clip(t / reach, 0.0, 1.0)) ** 2)


def mediastinal_border(v: np.ndarray, anatomy: Anatomy, side: str) -> np.ndarray:
    """Per row, how far the mediastinum (trachea, aortic knob, heart) reaches from the midline on one side."""
    above = anatomy.heart_height * (1.3 if side == "left" else 0.9)  # the right atrium starts lower
    extent = np.where(v > anatomy.heart_v, np.float32(1.6 * anatomy.heart_height), np.float32(above))
    cardiac = np.clip(1 - ((v - anatomy.heart_v) / extent) ** 2, 0, 1) ** 0.7
    border = 0.045 + (anatomy.heart_reach[side] - 0.045) * cardiac
    if side == "left":
        border = border + 0.035 * np.exp(-(((v - anatomy.knob_v) / 0.03) ** 2))
    return border


def lung_depth(
    u: np.ndarray, v: np.ndarray, anatomy: Anatomy, side: str, shrink: float = 0.0, apex_drop: float = 0.0
) -> np.ndarray:
    """Signed depth inside one lung (width units): rounded apex, convex lateral wall, mediastinum medially,
    diaphragm dome below. `shrink`/`apex_drop` give the collapsed lung of a pneumothorax."""
    d = IMAGE_SIGN[side] * (u - anatomy.midline)
    base = anatomy.base_v[side]
    apex = anatomy.apex_v + apex_drop
    t = (v - apex) / (base - apex)
    d_in = anatomy.apex_d - (anatomy.apex_d - 0.04) * round_profile(t, 0.3)
    d_in = np.maximum(d_in, mediastinal_border(v, anatomy, side))
    d_out = anatomy.apex_d + (anatomy.lung_outer - shrink - anatomy.apex_d) * round_profile(t, 0.6)
    return np.minimum(np.minimum(d - d_in, d_out - d), np.minimum(dome_level(u, anatomy, side) - v, v - apex))


def dome_level(u: np.ndarray, anatomy: Anatomy, side: str) -> np.ndarray:
    """Per column, the level of one hemidiaphragm: flat under the heart, lowest at the costophrenic angle."""
    d = IMAGE_SIGN[side] * (u - anatomy.midline)
    peak = 0.5 * (0.06 + anatomy.lung_outer)
    bump = np.clip(1 - (np.clip(d - peak, 0, None) / (anatomy.lung_outer - peak)) ** 2, 0, 1)
    return anatomy.base_v[side] - anatomy.dome_height * bump


def air_column(depth: np.ndarray) -> np.ndarray:
    """Air column through a lung: thin at its edges, full a few percent inside them (a rounded look)."""
    return soft_step(depth, EDGE) * (0.35 + 0.65 * np.sqrt(np.clip(depth / 0.08, 0, 1)))


def smooth_noise(rng: np.random.Generator, shape: tuple[int, int], cells: int) -> np.ndarray:
    """Band-limited noise in [-1, 1]: a coarse random grid upsampled bicubically."""
    coarse = Image.fromarray(rng.standard_normal((cells, cells)).astype(np.float32))
    field = np.asarray(coarse.resize((shape[1], shape[0]), Image.Resampling.BICUBIC))
    return field / max(float(np.abs(field).max()), 1e-6)


def pulmonary_vessels(rng: np.random.Generator, u: np.ndarray, v: np.ndarray, anatomy: Anatomy) -> np.ndarray:
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
        sign = IMAGE_SIGN[side]
        border = float(mediastinal_border(np.asarray(anatomy.hilum_v), anatomy, side))
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


def ribs(u: np.ndarray, v: np.ndarray, anatomy: Anatomy) -> np.ndarray:
    """Posterior rib arcs (rising from the spine, then curving down laterally) plus fainter anterior ones."""
    d = np.abs(u - anatomy.midline)
    posterior = (v + 0.35 * d - 2.0 * d**2) / anatomy.rib_spacing + anatomy.rib_phase
    anterior = (v + 0.5 * d) / (anatomy.rib_spacing * 1.3) + anatomy.rib_phase
    bands = np.clip((np.cos(2 * np.pi * posterior) - 0.2) / 0.8, 0, 1) ** 0.5
    bands = bands + 0.35 * np.clip((np.cos(2 * np.pi * anterior) - 0.4) / 0.6, 0, 1)
    cage = soft_step(d - 0.04, 0.03) * soft_step(anatomy.lung_outer + 0.05 - d, 0.03)
    return bands * cage * soft_step(v - anatomy.apex_v + 0.05, 0.03) * soft_step(anatomy.base_v["left"] - v, 0.08)


def body_outline(u: np.ndarray, v: np.ndarray, anatomy: Anatomy) -> tuple[np.ndarray, np.ndarray]:
    """Soft body outline (neck, sloping shoulders, chest wall) and a tissue-thickness profile across it."""
    d = np.abs(u - anatomy.midline)
    shoulder_line = 0.1 * np.clip((d - 0.09) / 0.4, 0, 1) ** 0.7  # top edge of the shoulders
    chest_wall = np.maximum(anatomy.body_half_width + 0.03 * v, 0.6 - 1.2 * np.clip(v - 0.12, 0, None))
    body = soft_step(v - shoulder_line, 0.03) * soft_step(chest_wall - d, 0.03)
    thickness = np.sqrt(np.clip(1 - (d / chest_wall) ** 2, 0, 1))
    return body, thickness


def clavicles(u: np.ndarray, v: np.ndarray, anatomy: Anatomy) -> np.ndarray:
    """Two bright S-curved bands from the sternal ends out over the lung apices."""
    d = np.abs(u - anatomy.midline)
    along = np.clip((d - 0.04) / 0.28, 0, 1)
    centre = anatomy.apex_v + 0.04 - 0.07 * along + 0.025 * np.sin(np.pi * along)
    return np.exp(-(((v - centre) / 0.013) ** 2)) * soft_step(d - 0.04, 0.02) * soft_step(0.33 - d, 0.04)
