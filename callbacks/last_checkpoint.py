"""last.ckpt: the newest state a run can resume from, never absent once written, and written by process 0 alone.

Lightning's OnExceptionCheckpoint deletes its file in teardown after every successful fit, so train.py had to write
last.ckpt again after the loggers finished: a W&B finish that hung, or a kill in that window, left no last.ckpt.
Here the file is only ever replaced, atomically (a temporary file beside it, then a rename: a kill mid-write leaves
the previous one), at each ``every_n_train_steps`` step (before that step's stepNNNNNN.ckpt, so it is never older
than a step checkpoint), at the end of training (after every end-of-training evaluation, inside fit, so before the
loggers finish), and when training stops on an exception or SIGTERM.

An exception inside a training batch, before its optimizer step, leaves the weights, the optimizer and the random
states (``lightning_modules/rng.py``) at the previous step, but the data loader has already handed out the batch:
its saved position would skip that batch on resume. So the file then holds the loader's position at the end of the
previous batch, and a resumed run takes the interrupted batch again, as the uninterrupted run did.

``trainer.save_checkpoint`` ends in a barrier, so a save that only some processes reach (one process crashed; SLURM's
signal) waits forever. ``save_alone`` has process 0 dump the state and write it without any collective: under DDP
every process holds the same weights, optimizer and loop state, and the module keeps every process's random state
from the last step boundary (``lightning_modules/rng.py``). This holds for DDP and single-device training (the
strategies ``configs/trainer`` ships), not for sharded strategies, whose state is spread over the processes.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Checkpoint


def data_position(trainer: L.Trainer) -> list[dict] | None:
    """The training loaders' saved positions, as the fit loop puts them in a checkpoint (None: no stateful loader)."""
    loader = trainer.fit_loop._combined_loader
    return copy.deepcopy(loader._state_dicts()) if loader is not None else None


def save_alone(trainer: L.Trainer, path: Path, position: list[dict] | None = None) -> None:
    """Process 0 dumps the trainer's full state (with the loaders at ``position`` if given) and atomically replaces
    ``path``; other processes do nothing."""
    if not trainer.is_global_zero:
        return
    checkpoint = trainer._checkpoint_connector.dump_checkpoint(weights_only=False)  # what save_checkpoint writes
    fit_loop_state = checkpoint["loops"]["fit_loop"]["state_dict"]
    if position is not None and "combined_loader" in fit_loop_state:
        fit_loop_state["combined_loader"] = position
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    with open(partial, "wb") as handle:
        torch.save(checkpoint, handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(partial, path)


class LastCheckpoint(Checkpoint):
    """Keeps ``path`` (last.ckpt) at the run's newest resumable state; see the module docstring for when.

    On an exception it writes only once training has started: an error while setting up or restoring (a refused
    checkpoint, mismatched trained parts) would otherwise overwrite the run's last.ckpt with an unrestored model.
    """

    def __init__(self, path: str | Path, every_n_train_steps: int | None) -> None:
        self.path = Path(path)
        self.every_n_train_steps = every_n_train_steps or 0  # None or 0: only at the end and on an exception
        self._training_started = False
        self._written_at_step = -1
        self._position_after_last_batch: list[dict] | None = None
        self._step_of_batch_in_progress: int | None = None  # the global step when the current batch began

    def write(self, trainer: L.Trainer, position: list[dict] | None = None) -> None:
        save_alone(trainer, self.path, position)
        self._written_at_step = trainer.global_step

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._training_started = True
        self._position_after_last_batch = data_position(trainer)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._step_of_batch_in_progress = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        due = self.every_n_train_steps > 0 and step > 0 and step % self.every_n_train_steps == 0
        if due and step != self._written_at_step:  # gradient accumulation ends several batches on one step
            self.write(trainer)
        self._step_of_batch_in_progress = None
        self._position_after_last_batch = data_position(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.write(trainer)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if not self._training_started:
            return
        before_its_step = self._step_of_batch_in_progress == trainer.global_step  # in a batch, not yet stepped
        self.write(trainer, self._position_after_last_batch if before_its_step else None)
