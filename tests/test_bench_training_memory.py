"""bench/training_memory.py --quick end to end: per-GPU DDP state from the parameters the module really trains."""

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_training_memory_counts_every_part_and_the_trained_state_of_each_variant(tmp_path):
    result = subprocess.run(
        [sys.executable, str(REPO / "bench" / "training_memory.py"), "--quick", "--json"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = {row["variant"]: row for row in json.loads(result.stdout)}
    assert set(rows) == {"frozen", "learnable"}
    for row in rows.values():
        parts = row["parameters"]
        assert row["trained_parameters"] == sum(parts[name] for name in row["trained_parts"])
        assert row["total_bytes"] == 4 * sum(parts.values()) + 16 * row["trained_parameters"]
    assert rows["frozen"]["trained_parts"] == ["unet"]
    assert rows["learnable"]["trained_parts"] == ["unet", "text_encoder"]
    assert rows["learnable"]["total_bytes"] > rows["frozen"]["total_bytes"]
