"""The process settings every entry script (train.py, evaluate.py, study.py) needs before torch, transformers or
diffusers load; applied when this module is imported, so the scripts import it first.

1. OpenMP waiting. torch's CPU wheels use GNU OpenMP (libgomp), which reads its environment once, when torch
   loads it. Its waiting threads spin, then sleep: unset, for 300,000 iterations (milliseconds: longer than a
   step's gaps between parallel regions, so a dedicated machine never pays a wake-up, but on a shared one a thread
   spins on for a partner that another process has taken the core from); OMP_WAIT_POLICY=PASSIVE sleeps at once
   (every parallel region pays a futex wake-up: 37 % of a tiny model's step on a quiet 2-core machine); ACTIVE
   never sleeps. A bounded GOMP_SPINCOUNT spins across a step's short gaps and sleeps in the long ones.
   ``WAITING_DEFAULT`` is applied unless the user set either of ``WAIT_VARIABLES`` (theirs wins);
   ``python bench/busy_machine.py`` measures every candidate quiet and beside a competing process and prints
   which one to choose (docs/results.md, "A shared CPU").
2. Dependency messages that say nothing about this run are filtered, each by its own text (``NOISE``); every other
   warning still shows. What the filtered eval-mode warning would say, train.py says in its "[model]" line.
"""

from __future__ import annotations

import logging
import os
import re
import warnings
from collections.abc import MutableMapping

WAIT_VARIABLES = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")
WAITING_DEFAULT = {"GOMP_SPINCOUNT": "10000"}

# Python warnings: (category, regular expression matching the start of the message), and why it is no news here.
NOISE_WARNINGS = (
    # Lightning 2.6 still uses torch's deprecated LeafSpec (torch >= 2.10); nothing for us to change.
    (FutureWarning, r"`isinstance\(treespec, LeafSpec\)` is deprecated"),
    # torchdata's StatefulDataLoader calls a torch function deprecated since torch 2.10; nothing for us to change.
    (UserWarning, "'set_vital' is deprecated"),
    # The frozen parts (VAE, text encoder) and EMA copies stay in eval mode on purpose: train.py's "[model]" line.
    (UserWarning, r"Found \d+ module\(s\) in eval mode at the start of training"),
)
# Log records: (logger name, regular expression matching the start of the message).
NOISE_LOG_RECORDS = (
    # transformers offers torchvision for image processors; nothing here uses one (no safety checker).
    ("transformers.utils.import_utils", r"`\w+ImageProcessor` requires torchvision \(not installed\)"),
    # Lightning's advertisement for its hosted logger.
    ("lightning.pytorch.utilities.rank_zero", "💡 Tip: For seamless cloud logging"),
)


def default_openmp_waiting(environment: MutableMapping[str, str]) -> None:
    """``WAITING_DEFAULT`` unless the user chose how OpenMP threads wait."""
    if not any(variable in environment for variable in WAIT_VARIABLES):
        environment.update(WAITING_DEFAULT)


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


default_openmp_waiting(os.environ)
silence_dependency_noise()
