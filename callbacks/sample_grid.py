"""Sample images for fixed validation prompts during training: the first thing a user looks at on the dashboard."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import lightning as L

from callbacks.image_logging import log_image
from callbacks.periodic import PeriodicCallback
from metrics.pictures import image_grid


class SampleGridCallback(PeriodicCallback):
    """Every ``every_n_steps`` optimizer steps and at the end of training, on rank 0, with a fixed seed."""

    collective = False  # rank 0 alone, no sync: a failure is always caught (callbacks.evaluation_failures)

    def __init__(
        self,
        prompts: Sequence[str],
        out_dir: str | Path,
        every_n_steps: int = 500,
        num_inference_steps: int = 25,
        guidance_scale: float = 4.0,
        seed: int = 0,
    ) -> None:
        super().__init__(every_n_steps)
        self.prompts, self.out_dir = list(prompts), Path(out_dir)
        self.num_inference_steps, self.guidance_scale, self.seed = num_inference_steps, guidance_scale, seed
        self.written: list[Path] = []

    def run(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        images = module.sample(self.prompts, self.num_inference_steps, self.guidance_scale, seed=self.seed)
        caption = f"step {trainer.global_step}, {self.num_inference_steps} DDIM steps, guidance {self.guidance_scale}"
        path = log_image(trainer, "samples", image_grid(images, self.prompts), caption, self.out_dir)
        self.written.append(path)
