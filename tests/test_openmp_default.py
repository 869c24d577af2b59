"""The entry scripts choose how OpenMP's threads wait (configs/process_defaults.py) before torch is imported:
libgomp reads its environment once, when torch loads it. A user's own OMP_WAIT_POLICY or GOMP_SPINCOUNT wins,
and the default is not added beside it (GOMP_SPINCOUNT would override the spin count that a policy implies)."""

import json
import os
import subprocess
import sys
from pathlib import Path

from configs.process_defaults import WAIT_VARIABLES, WAITING_DEFAULT

REPO = Path(__file__).resolve().parents[1]

# Imports each entry script with an import hook that records the wait variables when torch is first imported, then
# stops the import there (nothing heavy is loaded).
PROBE = """
import importlib.abc, json, os, sys

VARIABLES = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")

class TorchImported(Exception):
    pass

class Probe(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "torch":
            seen.append({key: os.environ[key] for key in VARIABLES if key in os.environ})
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


def test_entry_scripts_apply_the_waiting_default_before_torch_loads_and_the_user_wins():
    assert set(WAITING_DEFAULT) <= set(WAIT_VARIABLES)
    environment = {key: value for key, value in os.environ.items() if key not in WAIT_VARIABLES}
    result = subprocess.run(
        [sys.executable, "-c", PROBE], cwd=REPO, env=environment, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout.strip().splitlines()[-1]) == [
        ["train", {}, [WAITING_DEFAULT]],
        ["evaluate", {}, [WAITING_DEFAULT]],
        ["study", {}, [WAITING_DEFAULT]],
        ["train", {"OMP_WAIT_POLICY": "ACTIVE"}, [{"OMP_WAIT_POLICY": "ACTIVE"}]],
        ["evaluate", {"GOMP_SPINCOUNT": "5"}, [{"GOMP_SPINCOUNT": "5"}]],
    ]
