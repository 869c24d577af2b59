"""The process settings every entry script (train.py, evaluate.py, study.py) needs before torch, transformers or
diffusers load; applied when this module is imported, so the scripts import it first.

1. OpenMP waiting. torch's CPU wheels use GNU OpenMP (libgomp), which reads its environment once, when torch
   loads it. Its waiting threads spin, then sleep: unset, for 300,000 iterations (~10 ms on a recent x86 core:
   longer than a step's gaps between parallel regions, so a dedicated machine never pays a wake-up, but where other
   processes hold the cores a thread spins on for a partner that is not running: steps several to 30x slower);
   OMP_WAIT_POLICY=PASSIVE sleeps at once (safe when shared, but every parallel region pays a wake-up: 15 % of an
   autoencoder step and 37 % of a tiny model's diffusion step on a quiet 2-core machine); ACTIVE never sleeps.
   No single setting serves both machines (bench/busy_machine.py), so the choice is made when the script starts:
   ``WAITING_WHEN_FREE`` (ACTIVE: on a quiet 2-core machine the fastest on both measured steps; bounded spins of
   10,000 and 100,000 iterations lost up to 13 % and 9 %, and beside a process that arrives later ACTIVE lost less
   than they did: 1.4x against 1.9x and 5.5x) if other processes use less than ``BUSY_CORES`` of the CPUs while this
   one waits 0.2 s, else ``WAITING_WHEN_BUSY``.
   A user's own OMP_WAIT_POLICY or GOMP_SPINCOUNT wins (and nothing is measured); processes a script starts
   inherit its choice.
2. Dependency messages that say nothing about a run are filtered, each by its own text (``NOISE_WARNINGS``,
   ``NOISE_LOG_RECORDS``); every other warning still shows. What the filtered eval-mode warning would say, each
   stage's "parts" line says (callbacks/parts_summary.py).
"""

from __future__ import annotations

import logging
import os
import re
import time
import warnings
from collections.abc import MutableMapping

WAIT_VARIABLES = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")
WAITING_WHEN_FREE = {"OMP_WAIT_POLICY": "ACTIVE"}
WAITING_WHEN_BUSY = {"OMP_WAIT_POLICY": "PASSIVE"}
BUSY_CORES = 0.5  # CPU time other processes use, in cores, from which waiting threads sleep at once

# Python warnings: (category, regular expression matching the start of the message), and why it is no news here.
NOISE_WARNINGS = (
    # Lightning 2.6 still uses torch's deprecated LeafSpec (torch >= 2.10); nothing for us to change.
    (FutureWarning, r"`isinstance\(treespec, LeafSpec\)` is deprecated"),
    # torchdata's StatefulDataLoader calls a torch function deprecated since torch 2.10; nothing for us to change.
    (UserWarning, "'set_vital' is deprecated"),
    # The frozen parts (VAE, text encoder) and EMA copies stay in eval mode on purpose: each stage's "parts" line.
    (UserWarning, r"Found \d+ module\(s\) in eval mode at the start of training"),
)
# Log records: (logger name, regular expression matching the start of the message).
NOISE_LOG_RECORDS = (
    # transformers offers torchvision for image processors; nothing here uses one (no safety checker).
    ("transformers.utils.import_utils", r"`\w+ImageProcessor` requires torchvision \(not installed\)"),
    # Lightning's advertisement for its hosted logger.
    ("lightning.pytorch.utilities.rank_zero", "💡 Tip: For seamless cloud logging"),
)


def busy_cores(interval: float = 0.2) -> float | None:
    """Cores' worth of CPU time the machine's processes use while this one sleeps ``interval`` seconds (Linux's
    /proc/stat, steal time included: a hypervisor's other guests count too); None where it cannot be read."""

    def busy_and_total() -> tuple[int, int]:
        with open("/proc/stat") as stat:
            user, nice, system, idle, iowait, irq, softirq, steal = map(int, stat.readline().split()[1:9])
        busy = user + nice + system + irq + softirq + steal
        return busy, busy + idle + iowait

    try:
        busy_before, total_before = busy_and_total()
        time.sleep(interval)
        busy_after, total_after = busy_and_total()
    except (OSError, ValueError):
        return None
    cpus = os.cpu_count() or 1  # /proc/stat adds up every CPU of the machine
    return cpus * (busy_after - busy_before) / max(1, total_after - total_before)


def default_openmp_waiting(environment: MutableMapping[str, str], others_busy_cores: float | None) -> str:
    """Apply ``WAITING_WHEN_FREE`` or ``WAITING_WHEN_BUSY`` unless the user chose; returns what was decided and why."""
    chosen = [f"{variable}={environment[variable]}" for variable in WAIT_VARIABLES if variable in environment]
    if chosen:
        return f"{' '.join(chosen)} (set before this script started)"
    free = others_busy_cores is not None and others_busy_cores < BUSY_CORES
    waiting = WAITING_WHEN_FREE if free else WAITING_WHEN_BUSY
    environment.update(waiting)
    setting = " ".join(f"{key}={value}" for key, value in waiting.items())
    seen = "unknown" if others_busy_cores is None else f"{others_busy_cores:.1f} cores"
    return f"{setting} (other processes' CPU use at start: {seen}; set OMP_WAIT_POLICY or GOMP_SPINCOUNT to choose)"


class _DropMessages(logging.Filter):
    def __init__(self, pattern: str) -> None:
        super().__init__()
        self.pattern = re.compile(pattern)

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.pattern.match(record.getMessage())


def silence_dependency_noise() -> None:
    """Filter ``NOISE_WARNINGS`` and ``NOISE_LOG_RECORDS`` (loggers are configured by name: the libraries need not
    be loaded yet, and their import-time messages are caught too)."""
    for category, message in NOISE_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
    for logger, message in NOISE_LOG_RECORDS:
        logging.getLogger(logger).addFilter(_DropMessages(message))


OPENMP_WAITING = default_openmp_waiting(
    os.environ, None if any(variable in os.environ for variable in WAIT_VARIABLES) else busy_cores()
)
silence_dependency_noise()
