"""An in-training evaluation never loses a finished run: what happens when one fails.

The policy, for every ``PeriodicCallback`` (grounding, attention heatmaps, fidelity):

- Bad data is not a failure: an MS-CXR pair whose image is missing or undecodable is skipped and counted, with
  its id, by the evaluation itself (``grounding.evaluation.evaluate_grounding``).
- Any other exception inside an evaluation is logged loudly (ERROR, with the traceback, naming the callback and
  the step), that evaluation's results are lost, and training goes on to its checkpoints and export.
- In a multi-process run an exception on one process must not leave the others waiting forever in a collective
  (a metric sync, a gather). So an evaluation that enters collectives (``collective = True``, the default) is
  caught only on a single process, or when it failed through ``agree_on_success``: every process calls that
  after its local work and before any sync, and if any of them failed all of them raise
  ``FailedOnSomeProcess`` at the same point, which is then caught everywhere. Evaluations that run on one
  process only and never sync (``collective = False``, e.g. the rank-0 heatmap panel) are always caught.
  An uncaught failure of a collective evaluation still ends a multi-process run, as before.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import lightning as L
import torch
import torch.distributed as dist

if TYPE_CHECKING:
    from callbacks.periodic import PeriodicCallback

log = logging.getLogger("cxr_diffusion.evaluation")


class FailedOnSomeProcess(RuntimeError):
    """Raised on every process at the same point once they agreed an evaluation failed: safe to catch on all."""


def agree_on_success(error: BaseException | None, device: torch.device | str) -> None:
    """Every process calls this after its local part of an evaluation (``error``: what it raised, or None) and
    before any sync. One all-reduce; if any process failed, raises FailedOnSomeProcess on every process."""
    succeeded = error is None
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        flag = torch.tensor([int(succeeded)], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        all_succeeded = bool(flag.item())
    else:
        all_succeeded = succeeded
    if not all_succeeded:
        where = f"{type(error).__name__}: {error}" if error is not None else "on another process"
        raise FailedOnSomeProcess(f"the evaluation failed ({where})") from error


def run_keeping_training_alive(callback: PeriodicCallback, trainer: L.Trainer, module: L.LightningModule) -> None:
    """``callback.run``, with a failure logged and training continuing wherever that cannot hang a process."""
    try:
        callback.run(trainer, module)
    except Exception as error:
        if callback.collective and trainer.world_size > 1 and not isinstance(error, FailedOnSomeProcess):
            raise  # other processes may wait in a collective this one never reaches: only ending the run frees them
        log.error(
            "[evaluation] %s FAILED at step %d and was skipped; training continues to its checkpoint and export. "
            "%s: %s",
            type(callback).__name__,
            trainer.global_step,
            type(error).__name__,
            error,
            exc_info=error,
        )
