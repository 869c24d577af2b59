"""One image geometry (short-side resize, centre crop) shared by X-ray images and their grounding boxes.

Images and MS-CXR boxes both go through `CropGeometry`, so a box can never disagree with the pixels it
names. Coordinates are continuous pixel coordinates with the origin at the top-left corner of the
top-left pixel: pixel (column j, row i) covers [j, j+1) x [i, i+1) and has its centre at (j+0.5, i+0.5).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from PIL import Image

from datamodules.skips import SKIP_MISSING_IMAGE, SKIP_UNDECODABLE_IMAGE

Box = tuple[float, float, float, float]
# Real MIMIC-CXR-JPG images are about 3,000 x 3,000 pixels, the largest about 4,300 x 5,000 (21.5M): well inside.
# A header claiming more is a damaged file or a decompression bomb, refused before it is decoded.
MAX_DECODED_PIXELS = 50_000_000


@dataclass(frozen=True)
class CropGeometry:
    """Where an original image lands: resized so its short side is `resolution`, then centre-cropped square.

    The long side of the resized image is rounded to the nearest pixel, so the two axes may be scaled by
    slightly different factors; `transform_box` uses the per-axis factors, exactly as PIL resizes.
    """

    original_width: int
    original_height: int
    resized_width: int
    resized_height: int
    crop_left: int
    crop_top: int
    resolution: int

    @classmethod
    def for_image(cls, width: int, height: int, resolution: int) -> CropGeometry:
        if width <= 0 or height <= 0 or resolution <= 0:
            raise ValueError(f"image size and resolution must be positive, got {width}x{height} -> {resolution}")
        if width <= height:
            resized_width, resized_height = resolution, round(height * resolution / width)
        else:
            resized_width, resized_height = round(width * resolution / height), resolution
        return cls(
            original_width=width,
            original_height=height,
            resized_width=resized_width,
            resized_height=resized_height,
            crop_left=(resized_width - resolution) // 2,
            crop_top=(resized_height - resolution) // 2,
            resolution=resolution,
        )


class UnreadableImageError(OSError):
    """An image that cannot be used, whatever PIL raised: ``reason`` is a ``datamodules.skips`` reason."""

    def __init__(self, source: object, reason: str, detail: str) -> None:
        super().__init__(f"{source}: {reason} ({detail})")
        self.source, self.reason = source, reason


def load_grayscale_image(source: str | Path | BinaryIO) -> Image.Image:
    """Open an X-ray (a path or a binary stream) as 8-bit grayscale, fully decoded, or raise UnreadableImageError.

    The one way every reader opens an image, so all of them agree on what is unreadable: a missing file, and any
    failure to decode (truncated or corrupt data, PIL's ``DecompressionBombError``, which is not an OSError, and
    the odd SyntaxError or ValueError a damaged header gives). An image of more than MAX_DECODED_PIXELS is
    refused from its header, before any pixel is decoded.
    """
    try:
        with warnings.catch_warnings():  # PIL's own bomb warning: MAX_DECODED_PIXELS is the stricter bound
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(source) as image:
                if image.width * image.height > MAX_DECODED_PIXELS:
                    detail = f"{image.width} x {image.height} pixels exceed the bound of {MAX_DECODED_PIXELS:,}"
                    raise UnreadableImageError(source, SKIP_UNDECODABLE_IMAGE, detail)
                image.load()
                return image.convert("L")
    except UnreadableImageError:
        raise
    except FileNotFoundError as error:
        raise UnreadableImageError(source, SKIP_MISSING_IMAGE, str(error)) from error
    except Exception as error:  # noqa: BLE001 - any decoder failure means this one image is unusable
        raise UnreadableImageError(source, SKIP_UNDECODABLE_IMAGE, f"{type(error).__name__}: {error}") from error


def resize_center_crop(image: Image.Image, resolution: int) -> Image.Image:
    """Short side -> `resolution` (Lanczos, anti-aliased), then the central `resolution` square."""
    geometry = CropGeometry.for_image(image.width, image.height, resolution)
    resized = image.resize((geometry.resized_width, geometry.resized_height), Image.Resampling.LANCZOS)
    return resized.crop(
        (
            geometry.crop_left,
            geometry.crop_top,
            geometry.crop_left + resolution,
            geometry.crop_top + resolution,
        )
    )


def to_model_tensor(image: Image.Image) -> torch.Tensor:
    """Grayscale image -> 3 x H x W float tensor in [-1, 1] (the channel repeated for RGB-trained models)."""
    pixels = torch.from_numpy(np.asarray(image.convert("L"), dtype=np.float32))
    return (pixels / 127.5 - 1.0).unsqueeze(0).expand(3, -1, -1).contiguous()


def to_uint8_grayscale(pixel_values: torch.Tensor) -> Image.Image:
    """Inverse of `to_model_tensor`, for display: C x H x W (channels averaged) or H x W in [-1, 1] -> 'L'."""
    if pixel_values.ndim == 3:
        pixel_values = pixel_values.float().mean(dim=0)
    if pixel_values.ndim != 2:
        raise ValueError(f"expected a C x H x W or H x W tensor, got shape {tuple(pixel_values.shape)}")
    pixels = ((pixel_values.detach().float().cpu().clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8)
    return Image.fromarray(pixels.numpy(), mode="L")


def transform_box(geometry: CropGeometry, x: float, y: float, w: float, h: float) -> Box | None:
    """Map a box (x, y, w, h) in original pixels to model pixels through the resize and crop of `geometry`.

    The box is scaled per axis by resized/original size, shifted by the crop offset and clipped to the
    crop. Returns None when nothing of positive area is left (wholly cropped away, or degenerate input).
    """
    scale_x = geometry.resized_width / geometry.original_width
    scale_y = geometry.resized_height / geometry.original_height
    left = max(x * scale_x - geometry.crop_left, 0.0)
    top = max(y * scale_y - geometry.crop_top, 0.0)
    right = min((x + w) * scale_x - geometry.crop_left, float(geometry.resolution))
    bottom = min((y + h) * scale_y - geometry.crop_top, float(geometry.resolution))
    if right <= left or bottom <= top:
        return None
    return (left, top, right - left, bottom - top)


def box_mask(boxes: Iterable[Box], resolution: int, mask_size: int) -> torch.Tensor:
    """Union of boxes (x, y, w, h in model pixels of a `resolution` square) rasterised at `mask_size`^2.

    A mask pixel is inside a box when its centre lies in the half-open box [x, x+w) x [y, y+h), centres
    taken in model coordinates ((j + 0.5) * resolution / mask_size). This is exact and never dilates: a
    box covering whole model pixels gives exactly those pixels at mask_size == resolution, and the same
    area (up to the centre rule at the edges) at any other mask size. Returns a mask_size x mask_size bool
    tensor indexed [row, column].
    """
    centres = (np.arange(mask_size) + 0.5) * (resolution / mask_size)
    mask = np.zeros((mask_size, mask_size), dtype=bool)
    for x, y, w, h in boxes:
        in_columns = (centres >= x) & (centres < x + w)
        in_rows = (centres >= y) & (centres < y + h)
        mask |= np.outer(in_rows, in_columns)
    return torch.from_numpy(mask)
