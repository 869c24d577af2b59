"""Running a bench script end to end the way a user does: its own process, from an empty folder."""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_bench(script: str, *args: str, cwd: Path, env: dict[str, str] | None = None, timeout: int = 240) -> str:
    """``python bench/<script> <args>`` in ``cwd``; its stdout, after asserting it exited 0 (stderr shown if not)."""
    result = subprocess.run(
        [sys.executable, str(REPO / "bench" / script), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout
