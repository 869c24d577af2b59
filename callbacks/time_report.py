"""Where a training stage's time went, from Lightning's SimpleProfiler: one line for the run's summary, and the
per-hook table in ``<run>/profiles/`` (the profiler writes it when the trainer tears down).

The profiler times each of Lightning's hooks; only the ones that never run inside another timed one are added up
(the batch, the loaders' next batch, the validation steps, each callback's hooks), so the parts sum to at most the
stage's time and the rest is reported as "other" (set-up, loggers, teardown, the loop's own work).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from pathlib import Path

from lightning.pytorch.profilers import SimpleProfiler

# Action names (Lightning's) and the part each counts to; callbacks are parts by their class name.
PARTS = {
    "run_training_batch": "training steps",  # forward, backward, optimizer and EMA (in optimizer_step)
    "[_TrainingEpochLoop].train_dataloader_next": "training data",
    "[_EvaluationLoop].val_next": "validation",
    "[Strategy]SingleDeviceStrategy.validation_step": "validation",
    "[Strategy]DDPStrategy.validation_step": "validation",
}
CALLBACK_ACTION = re.compile(r"^\[Callback\](\w+).*\.(\w+)$")
NESTED_HOOKS = ("on_save_checkpoint", "on_load_checkpoint", "state_dict", "load_state_dict")  # inside other hooks


def stage_profiler(run_dir: Path, stage: str) -> SimpleProfiler:
    """A profiler that writes its per-hook table to ``<run_dir>/profiles/<fn>-<stage>.txt``, not to the console."""
    return SimpleProfiler(dirpath=run_dir / "profiles", filename=stage)


def time_by_part(profiler: SimpleProfiler) -> Counter[str]:
    """Seconds per part: ``PARTS`` and each callback class (progress bars together)."""
    seconds: Counter[str] = Counter()
    for action, durations in profiler.recorded_durations.items():
        callback = CALLBACK_ACTION.match(action)
        if action in PARTS:
            part = PARTS[action]
        elif callback and callback.group(2) not in NESTED_HOOKS:
            part = "progress bar" if callback.group(1).endswith("ProgressBar") else callback.group(1)
        else:
            continue
        seconds[part] += math.fsum(durations)
    return seconds


def describe_time(profiler: SimpleProfiler, total_seconds: float) -> str:
    """``training steps 420 s (1200 x 0.350 s), FIDCallback 70 s, ..., other 12 s``, largest first."""
    seconds = time_by_part(profiler)
    batches = len(profiler.recorded_durations.get("run_training_batch", ()))  # this fit's, also when resumed
    parts = []
    for part, spent in seconds.most_common():
        each = f" ({batches} x {spent / batches:.3f} s)" if part == "training steps" else ""
        parts.append(f"{part} {spent:.0f} s{each}")
    parts.append(f"other {max(0.0, total_seconds - seconds.total()):.0f} s")
    return ", ".join(parts)
