"""Pictures for people to look at: labelled grids of (N, C, H, W) images in [0, 1].

Why here: metric code writes pictures too (fidelity evaluation's samples.png), and the callbacks that log grids
sit above metrics, so the grid lives at the lowest room that draws one; callbacks and metrics both import it and
metric code never reaches up into callbacks/.
"""

from __future__ import annotations

import textwrap
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

TILE = 128


def image_grid(images: torch.Tensor, labels: Sequence[str] = (), columns: int = 4) -> Image.Image:
    """Tiles of (N, C, H, W) images in [0, 1], upscaled to a readable size, each with its label underneath."""
    images = images.detach().float().clamp(0, 1).cpu()
    rows = (len(images) + columns - 1) // columns
    label_height = 30 if labels else 0
    grid = Image.new("RGB", (columns * TILE, rows * (TILE + label_height)), "white")
    draw, font = ImageDraw.Draw(grid), ImageFont.load_default()
    for index, image in enumerate(images):
        array = (image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        tile = Image.fromarray(array.squeeze(-1) if array.shape[-1] == 1 else array).convert("RGB")
        x, y = (index % columns) * TILE, (index // columns) * (TILE + label_height)
        grid.paste(tile.resize((TILE, TILE), Image.Resampling.NEAREST), (x, y))
        if labels:
            text = "\n".join(textwrap.wrap(labels[index], 24)[:2])
            draw.multiline_text((x + 2, y + TILE + 2), text, fill="black", font=font, spacing=1)
    return grid
