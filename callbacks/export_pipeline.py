"""At the end of training, write a diffusers StableDiffusionPipeline folder that any diffusers user can load, and,
for a model with LoRA adapters, the adapters as diffusers LoRA weights beside their base pipeline."""

from __future__ import annotations

from pathlib import Path

import lightning as L


class ExportPipelineCallback(L.Callback):
    def __init__(self, folder: str | Path, lora_folder: str | Path | None = None) -> None:
        """``folder``: the pipeline, adapters merged in; ``lora_folder`` (default ``<folder>_lora``): the base
        pipeline and ``pytorch_lora_weights.safetensors``, written only when the model has adapters."""
        self.folder = Path(folder)
        self.lora_folder = (
            Path(lora_folder) if lora_folder is not None else self.folder.with_name(f"{self.folder.name}_lora")
        )

    def on_train_end(self, trainer, pl_module) -> None:
        if trainer.is_global_zero:
            pl_module.export_pipeline(self.folder)
            if pl_module.adapted:
                pl_module.export_lora(self.lora_folder)
