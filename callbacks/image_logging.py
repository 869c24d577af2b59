"""Write a picture (a metrics.pictures grid) to the run folder and to the active image loggers (W&B, TensorBoard)."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import numpy as np
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger
from PIL import Image


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
