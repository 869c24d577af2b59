"""FID, classifier agreement and diversity during training, on the same dashboard and schedule as grounding."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import lightning as L
from omegaconf import DictConfig

from callbacks.evaluation_failures import agree_on_success
from callbacks.periodic import PeriodicCallback
from metrics.fidelity import FidelityMetrics
from metrics.fidelity_evaluation import FidelityEvaluation


class FIDCallback(PeriodicCallback):
    """Every ``every_n_steps`` optimizer steps and at the end of training: generate M images from held-out report
    captions (each process its share), compute the metrics synced over processes, log them from process 0. The
    processes agree that every share was generated before the sync, so a failure on one process is logged and
    skipped everywhere instead of leaving the others in the sync (``callbacks.evaluation_failures``).

    Setup (process 0 alone, the others wait at a barrier): the domain classifier is trained if missing and the real
    images' reference statistics are computed if not cached; only process 0 holds the reference. That work must
    never enter a collective (the others are at the barrier: a hang), see tests/test_collectives.py.
    """

    def __init__(self, evaluation: FidelityEvaluation, every_n_steps: int = 500) -> None:
        super().__init__(every_n_steps)
        self.evaluation = evaluation
        self.metrics: FidelityMetrics | None = None

    @classmethod
    def from_config(cls, cfg: DictConfig, root: Path) -> FIDCallback:
        """``fidelity.*`` settings with the in-training M, DDIM steps and schedule of ``callbacks.fidelity``."""
        schedule = cfg.callbacks.fidelity
        evaluation = FidelityEvaluation(cfg, root, schedule.num_images, schedule.num_inference_steps)
        return cls(evaluation, schedule.every_n_steps)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit" or self.metrics is not None:
            return
        # On the training device (the module is moved there only after setup, so not pl_module.device).
        device = trainer.strategy.root_device
        references = self.evaluation.reference(device) if trainer.is_global_zero else None
        trainer.strategy.barrier()  # the classifier cache exists for every process from here
        self.metrics = self.evaluation.build_metrics(references)

    def run(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        step = trainer.global_step
        if self.metrics is None:
            return
        started = time.perf_counter()
        error = None
        try:  # local generation; the processes agree it succeeded everywhere before the metrics sync
            shared = self.evaluation.update_share(pl_module, self.metrics, trainer.global_rank, trainer.world_size)
        except Exception as caught:  # noqa: BLE001 - reported after every process knows (agree_on_success)
            error = caught
        agree_on_success(error, pl_module.device)
        result = replace(shared, metrics=self.metrics.compute())
        seconds = time.perf_counter() - started
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(result.metrics, step=step)
            shown = ", ".join(f"{name}={value:.3f}" for name, value in result.metrics.items())
            print(f"[fidelity] step {step}: {shown} ({seconds:.1f} s)")
