"""Write an image grid to the run folder and to whichever image-capable loggers are active (W&B, TensorBoard)."""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger
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


def log_image(trainer: L.Trainer, key: str, image: Image.Image, caption: str, out_dir: Path) -> Path | None:
    """Save ``image`` as a PNG named after key and step, and send it to the image loggers (rank 0 only)."""
    if not trainer.is_global_zero:
        return None
    step = trainer.global_step
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{key.replace('/', '_')}_step{step:06d}.png"
    image.save(path)
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            logger.log_image(key=key, images=[image], caption=[caption], step=step)
        elif isinstance(logger, TensorBoardLogger):
            logger.experiment.add_image(key, np.asarray(image), step, dataformats="HWC")
    return path
