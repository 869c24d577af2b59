"""The entry scripts set OpenMP's wait policy to PASSIVE before torch is imported (libgomp reads it once, when torch
loads it), unless the user set one: on a machine shared with another process, spinning threads multiply step
times (bench/busy_machine.py)."""

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# Imports each entry script with an import hook that records OMP_WAIT_POLICY when torch is first imported, then
# stops the import there (nothing heavy is loaded).
PROBE = """
import importlib.abc, json, os, sys

class TorchImported(Exception):
    pass

class Probe(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "torch":
            seen.append(os.environ.get("OMP_WAIT_POLICY"))
            raise TorchImported

sys.meta_path.insert(0, Probe())
results = {}
for script, user_value in [("train", None), ("evaluate", None), ("study", None), ("train", "ACTIVE")]:
    os.environ.pop("OMP_WAIT_POLICY", None)
    if user_value:
        os.environ["OMP_WAIT_POLICY"] = user_value
    for loaded in [m for m in sys.modules if m in ("train", "evaluate", "study")]:
        del sys.modules[loaded]
    seen = []
    try:
        __import__(script)
    except TorchImported:
        pass
    results[f"{script} {user_value}"] = seen
print(json.dumps(results))
"""


def test_entry_scripts_default_to_passive_waiting_before_torch_loads_and_the_user_wins():
    environment = {key: value for key, value in os.environ.items() if key != "OMP_WAIT_POLICY"}
    result = subprocess.run(
        [sys.executable, "-c", PROBE], cwd=REPO, env=environment, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout.strip().splitlines()[-1]) == {
        "train None": ["PASSIVE"],
        "evaluate None": ["PASSIVE"],
        "study None": ["PASSIVE"],
        "train ACTIVE": ["ACTIVE"],
    }
