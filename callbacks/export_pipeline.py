"""At the end of training, write a diffusers StableDiffusionPipeline folder that any diffusers user can load."""

from __future__ import annotations

from pathlib import Path

import lightning as L


class ExportPipelineCallback(L.Callback):
    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)

    def on_train_end(self, trainer, pl_module) -> None:
        if trainer.is_global_zero:
            pl_module.export_pipeline(self.folder)
