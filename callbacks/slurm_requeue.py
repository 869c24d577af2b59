"""SLURM's time-limit signal: process 0 writes last.ckpt at the next batch end, alone, and requeues the job.

Lightning's own handler (``SLURMEnvironment(auto_requeue=True)``, which train.py turns off) saves from inside the
signal handler, wherever each process happens to be, through ``trainer.save_checkpoint``, which ends in a barrier:
processes signalled at different moments (or one not signalled at all) pair that barrier with unrelated collectives
or wait forever, and a state dumped mid-step mixes two steps. Here the handler only notes the signal. At the end of
the next training or validation batch, process 0 writes last.ckpt with ``save_alone`` (no collective; it holds the
whole state) and runs ``scontrol requeue <job id>``; other processes ignore the signal. SLURM then stops the job
(SIGTERM: Lightning's interruption, and last.ckpt is written once more) and starts it again under the same job id,
and train.py resumes from the last.ckpt of the run folder ``slurm-<job id>``.
"""

from __future__ import annotations

import logging
import signal
import subprocess

import lightning as L
from lightning.pytorch.trainer.states import TrainerFn

from callbacks.last_checkpoint import LastCheckpoint

log = logging.getLogger(__name__)

REQUEUE_SIGNAL = signal.SIGUSR1  # scripts/slurm_train.sbatch: --signal=SIGUSR1@120


class SlurmRequeue(L.Callback):
    """On ``REQUEUE_SIGNAL``: last.ckpt from ``last`` (process 0, at a batch end), then ``scontrol requeue``, once."""

    def __init__(self, last: LastCheckpoint, job_id: str) -> None:
        self.last = last
        self.job_id = job_id
        self._signalled = False
        self._requeued = False
        self._previous_handler = None

    def _note_signal(self, signum, frame) -> None:
        self._signalled = True  # nothing else in a signal handler: it runs between any two bytecodes

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # Every process: SIGUSR1's default action would end a process that has no handler.
        self._previous_handler = signal.signal(REQUEUE_SIGNAL, self._note_signal)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self._previous_handler is not None:
            signal.signal(REQUEUE_SIGNAL, self._previous_handler)
            self._previous_handler = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._save_and_requeue_if_signalled(trainer)

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if trainer.state.fn == TrainerFn.FITTING and not trainer.sanity_checking:
            self._save_and_requeue_if_signalled(trainer)

    def _save_and_requeue_if_signalled(self, trainer: L.Trainer) -> None:
        if not self._signalled or self._requeued or not trainer.is_global_zero:
            return
        self._requeued = True
        self.last.write(trainer)
        log.warning(
            "SLURM time-limit signal: wrote %s at step %d; requeueing job %s",
            self.last.path,
            trainer.global_step,
            self.job_id,
        )
        try:
            finished = subprocess.run(["scontrol", "requeue", self.job_id], capture_output=True, text=True)
        except FileNotFoundError:
            log.error("scontrol is not on PATH: job %s was not requeued (last.ckpt is written)", self.job_id)
            return
        if finished.returncode != 0:
            log.error("scontrol requeue %s failed (%d): %s", self.job_id, finished.returncode, finished.stderr.strip())
