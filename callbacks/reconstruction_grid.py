"""Show what the autoencoder stage has learnt: held-out images (top) over their reconstructions (bottom)."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch

from callbacks.image_logging import log_image
from metrics.pictures import image_grid


class ReconstructionGridCallback(L.Callback):
    def __init__(self, out_dir: str | Path) -> None:
        self.out_dir = Path(out_dir)

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking or pl_module.last_val_batch is None:
            return
        originals, reconstructions = pl_module.last_val_batch
        images = torch.cat([originals, reconstructions]).add(1).div(2)
        caption = f"step {trainer.global_step}: held-out images (top) and reconstructions (bottom)"
        log_image(
            trainer,
            "autoencoder/reconstructions",
            image_grid(images, columns=len(originals)),
            caption,
            self.out_dir,
        )
