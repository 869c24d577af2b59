"""At the end of training, write the backbone's diffusers pipeline folder (StableDiffusionPipeline,
PixArtSigmaPipeline) that any diffusers user can load, and, for a model with LoRA adapters, the adapters beside their
base pipeline in the form that pipeline loads (``generation.export_lora``: diffusers LoRA weights, or peft adapter
folders for PixArt, which diffusers has no LoRA loader for)."""

from __future__ import annotations

from pathlib import Path

import lightning as L


class ExportPipelineCallback(L.Callback):
    def __init__(self, folder: str | Path, lora_folder: str | Path | None = None) -> None:
        """``folder``: the pipeline, adapters merged in; ``lora_folder`` (default ``<folder>_lora``): the base
        pipeline and the adapter files, written only when the model has adapters."""
        self.folder = Path(folder)
        self.lora_folder = (
            Path(lora_folder) if lora_folder is not None else self.folder.with_name(f"{self.folder.name}_lora")
        )

    def on_train_end(self, trainer, pl_module) -> None:
        if trainer.is_global_zero:
            pl_module.export_pipeline(self.folder)
            if pl_module.adapted:
                pl_module.export_lora(self.lora_folder)
