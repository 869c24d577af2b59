"""The entry scripts choose how OpenMP's threads wait (configs/process_defaults.py) before torch is imported:
libgomp reads its environment once, when torch loads it. A bounded spin when the CPUs are free at start, sleeping at
once when other processes keep them busy; a user's own OMP_WAIT_POLICY or GOMP_SPINCOUNT wins, and no default is
added beside it (GOMP_SPINCOUNT would override the spin count that a policy implies)."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from configs.process_defaults import (
    BUSY_CORES,
    WAIT_VARIABLES,
    WAITING_WHEN_BUSY,
    WAITING_WHEN_FREE,
    busy_cores,
    default_openmp_waiting,
)

REPO = Path(__file__).resolve().parents[1]

# Imports each entry script with an import hook that records the wait variables (and the module's stated choice)
# when torch is first imported, then stops the import there (nothing heavy is loaded).
PROBE = """
import importlib.abc, json, os, sys

VARIABLES = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")

class TorchImported(Exception):
    pass

class Probe(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "torch":
            stated = sys.modules["configs.process_defaults"].OPENMP_WAITING
            seen.append([{key: os.environ[key] for key in VARIABLES if key in os.environ}, stated])
            raise TorchImported

sys.meta_path.insert(0, Probe())
cases = [(script, {}) for script in ("train", "evaluate", "study")]
cases += [("train", {"OMP_WAIT_POLICY": "ACTIVE"}), ("evaluate", {"GOMP_SPINCOUNT": "5"})]
results = []
for script, user in cases:
    for key in VARIABLES:
        os.environ.pop(key, None)
    os.environ.update(user)
    for loaded in [m for m in sys.modules if m in ("train", "evaluate", "study") or m.startswith("configs")]:
        del sys.modules[loaded]
    seen = []
    try:
        __import__(script)
    except TorchImported:
        pass
    results.append([script, user, seen])
print(json.dumps(results))
"""


def test_entry_scripts_choose_before_torch_loads_and_the_user_wins():
    environment = {key: value for key, value in os.environ.items() if key not in WAIT_VARIABLES}
    result = subprocess.run(
        [sys.executable, "-c", PROBE], cwd=REPO, env=environment, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads(result.stdout.strip().splitlines()[-1])
    for script, no_user_value, [(variables, stated)] in results[:3]:  # the machine's load decides which default
        assert no_user_value == {} and variables in (WAITING_WHEN_FREE, WAITING_WHEN_BUSY), script
        assert stated.startswith(" ".join(f"{key}={value}" for key, value in variables.items()) + " (other"), stated
    assert results[3:] == [
        [
            "train",
            {"OMP_WAIT_POLICY": "ACTIVE"},
            [[{"OMP_WAIT_POLICY": "ACTIVE"}, "OMP_WAIT_POLICY=ACTIVE (set before this script started)"]],
        ],
        [
            "evaluate",
            {"GOMP_SPINCOUNT": "5"},
            [[{"GOMP_SPINCOUNT": "5"}, "GOMP_SPINCOUNT=5 (set before this script started)"]],
        ],
    ]


def test_the_default_follows_other_processes_cpu_use_and_never_overrides_the_user():
    free, busy, unknown, user = {}, {}, {}, {"OMP_WAIT_POLICY": "ACTIVE"}
    assert "0.1 cores" in default_openmp_waiting(free, 0.1) and free == WAITING_WHEN_FREE
    assert "1.5 cores" in default_openmp_waiting(busy, 1.5) and busy == WAITING_WHEN_BUSY
    assert "unknown" in default_openmp_waiting(unknown, None) and unknown == WAITING_WHEN_BUSY  # the safe side
    default_openmp_waiting(user, 0.0)
    assert user == {"OMP_WAIT_POLICY": "ACTIVE"}
    assert 0 < BUSY_CORES < 1


def test_busy_cores_sees_a_competing_process():
    competitor = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)
        assert busy_cores(0.5) >= 0.7  # one busy-loop process: a core's worth (more if the machine is shared)
    finally:
        competitor.kill()
        competitor.wait()
