"""The schedule every in-training evaluation shares: every N optimizer steps, and once more at the end of fit."""

from __future__ import annotations

import lightning as L

from callbacks.evaluation_failures import run_keeping_training_alive


class PeriodicCallback(L.Callback):
    """Calls ``run(trainer, module)`` at steps N, 2N, ... and at the end of fit, at most once per global step
    (gradient accumulation ends several batches on one step). ``every_n_steps=0``: only at the end.

    A failing ``run`` never loses the run: see ``callbacks.evaluation_failures`` (``collective = False`` for an
    evaluation that never syncs across processes)."""

    collective = True

    def __init__(self, every_n_steps: int) -> None:
        self.every_n_steps = every_n_steps
        self._last_run_step = -1

    def run(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        raise NotImplementedError

    def _run_once_per_step(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if trainer.global_step != self._last_run_step:
            self._last_run_step = trainer.global_step
            run_keeping_training_alive(self, trainer, module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if self.every_n_steps > 0 and step > 0 and step % self.every_n_steps == 0:
            self._run_once_per_step(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        self._run_once_per_step(trainer, pl_module)

    def state_dict(self) -> dict[str, int]:
        """The step last evaluated: a run resumed after it neither repeats nor skips that evaluation."""
        return {"last_run_step": self._last_run_step}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        self._last_run_step = int(state_dict["last_run_step"])
