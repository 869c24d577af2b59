"""Whole radiographs: a frontal image with its findings and true boxes, or a lateral view, as 8-bit grey.

Why a module of its own: this is where anatomy and findings meet the output image: the drawing canvas (at least
_MIN_DRAWN_WIDTH wide so small images come out anti-aliased), the layers summed into one density, each
finding's box measured on the layer it added, and exposure and noise applied last.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
from PIL import Image

from datamodules.synthetic.anatomy import (
    EDGE,
    LUNG_DARKNESS,
    air_column,
    body_outline,
    clavicles,
    dome_level,
    lung_depth,
    mediastinal_border,
    pulmonary_vessels,
    ribs,
    sample_anatomy,
    smooth_noise,
    soft_step,
)
from datamodules.synthetic.findings import Finding, draw_finding, sample_findings

_MIN_DRAWN_WIDTH = 128  # smaller images are drawn at this width and reduced


def _support_box(layer: np.ndarray, fraction: float = 0.1) -> tuple[int, int, int, int] | None:
    """Pixel box (x, y, w, h) of where a drawn layer reaches `fraction` of its peak: its true extent."""
    magnitude = np.abs(layer)
    peak = float(magnitude.max())
    if peak <= 0.02:
        return None
    rows, cols = np.nonzero(magnitude >= fraction * peak)
    return int(cols.min()), int(rows.min()), int(cols.max() - cols.min() + 1), int(rows.max() - rows.min() + 1)


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
    density = density * (1 + 0.05 * smooth_noise(rng, shape, 4)) * rng.uniform(0.93, 1.05)
    density = density + 0.01 * rng.standard_normal(shape, dtype=np.float32)
    return np.round(255 * np.clip(density, 0, 1)).astype(np.uint8)


def render_frontal(rng: np.random.Generator, resolution: int, view: str) -> tuple[np.ndarray, list[Finding]]:
    """A frontal radiograph (uint8, portrait, short side = resolution) and its findings with boxes."""
    size, u, v = _image_grid(rng, resolution)
    shape = (v.shape[0], u.shape[1])
    findings = sample_findings(rng)
    cardiomegaly = [f.severity for f in findings if f.category == "Cardiomegaly"]
    heart_scale = (1.25, 1.35, 1.45)[cardiomegaly[0]] if cardiomegaly else 1.0
    anatomy = sample_anatomy(rng, view, heart_scale)
    offset = u - anatomy.midline
    d = np.abs(offset)
    borders = {side: mediastinal_border(v, anatomy, side) for side in ("right", "left")}
    mediastinum = soft_step(np.minimum(borders["left"] - offset, borders["right"] + offset), EDGE)
    mediastinum = mediastinum * soft_step(anatomy.base_v["left"] - v, 0.04)
    heart = mediastinum * soft_step(v - anatomy.heart_v + 0.9 * anatomy.heart_height, 0.05)
    markings = 0.13 * pulmonary_vessels(rng, u, v, anatomy)
    darkness = LUNG_DARKNESS * (1 - 0.2 * np.clip((v - anatomy.hilum_v) / 0.4, 0, 1))  # lower lungs denser
    depth = {side: lung_depth(u, v, anatomy, side) for side in ("right", "left")}
    air = {side: air_column(value) for side, value in depth.items()}
    all_air = air["right"] + air["left"]
    body, thickness = body_outline(u, v, anatomy)
    spine = soft_step(0.03 - d, 0.012) * (0.8 + 0.2 * np.cos(2 * np.pi * v / 0.045))
    trachea = soft_step(0.017 - d, 0.01) * soft_step(anatomy.hilum_v - 0.05 - v, 0.05)
    diaphragm = np.where(offset < 0, dome_level(u, anatomy, "right"), dome_level(u, anatomy, "left"))
    flank = np.clip(d - anatomy.lung_outer, 0, None)  # beside the lungs the abdomen's top edge is vague
    abdomen = soft_step(v - diaphragm - flank, EDGE + 2 * flank)  # complements the lungs' lower edge
    abdomen = abdomen * soft_step(anatomy.lung_outer + 0.03 - d, 0.1)
    bubble = soft_step(1 - np.hypot((offset - 0.18) / 0.05, (v - anatomy.base_v["left"] - 0.04) / 0.025), 0.4)
    solid = np.maximum(abdomen, mediastinum * (0.8 + 0.2 * heart))  # heart and liver merge at the diaphragm
    density = body * (0.36 + 0.14 * thickness + 0.24 * solid)
    density += body * (0.04 * spine * (1 - 0.6 * heart) - 0.08 * trachea - 0.07 * bubble)
    density += ribs(u, v, anatomy) * (0.015 + 0.045 * all_air) + 0.1 * clavicles(u, v, anatomy) * body
    density -= all_air * (darkness - markings)
    texture = smooth_noise(rng, shape, 32) if findings else np.zeros(shape, np.float32)
    placed = []
    for finding in findings:
        if finding.category == "Cardiomegaly":
            layers = [heart]
        else:
            layers = draw_finding(rng, finding, u, v, anatomy, depth, markings, texture)
            for layer in layers:
                density += layer
        boxes = tuple(box for box in (_support_box(_resize(layer, size)) for layer in layers) if box is not None)
        if boxes:
            placed.append(replace(finding, boxes=boxes))
    return _finish(rng, density, size), placed


def render_lateral(rng: np.random.Generator, resolution: int) -> np.ndarray:
    """A plausible lateral view: sternum to the image's left, vertebral column to the right, raised arms
    on top, one large air space with the heart in front and the diaphragm sloping down to the back."""
    size, u, v = _image_grid(rng, resolution)
    shift = rng.uniform(-0.03, 0.03)
    u = u + shift
    front, back = 0.1 + 0.3 * (v - 0.55) ** 2, 0.93 - 0.2 * (v - 0.5) ** 2
    trunk = soft_step(u - front, 0.02) * soft_step(back - u, 0.03)
    dome = 0.63 + 0.17 * ((u - 0.15) / 0.7) ** 2
    lung_shape = 0.3 * (1 - np.hypot((u - 0.5) / 0.33, (v - 0.47) / 0.42))
    air = air_column(np.minimum(np.minimum(lung_shape, dome - v), u - front - 0.05))
    heart = soft_step(1 - np.hypot((u - 0.32) / 0.17, (v - 0.64) / 0.16), 0.3)
    column = np.abs(u - 0.79 + 0.1 * (v - 0.5) ** 2)
    vertebrae = soft_step(np.cos(2 * np.pi * (v / 0.056 + shift)) + 0.7, 0.4)  # bodies with disc spaces
    spine = soft_step(0.045 - column, 0.015) * (0.5 + 0.5 * vertebrae)
    trachea = soft_step(0.02 - np.abs(u - 0.5 - 0.17 * v), 0.015) * soft_step(0.36 - v, 0.04)
    arms = soft_step(0.17 - v - 0.3 * (u - 0.5) ** 2, 0.08)
    sternum = np.exp(-(((u - front - 0.02) / 0.008) ** 2)) * soft_step(0.6 - v, 0.05)
    abdomen = soft_step(v - dome, 0.02)
    density = trunk * (0.48 + 0.18 * abdomen + 0.1 * arms + 0.16 * spine + 0.06 * sternum - 0.04 * trachea)
    density -= 0.3 * air * (1 - 0.6 * heart)
    return _finish(rng, density, size)
