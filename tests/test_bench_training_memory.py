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


def test_pixart_sigma_with_t5_xxl_fits_an_80_gib_gpu_only_with_the_text_encoder_frozen(tmp_path):
    result = subprocess.run(
        [sys.executable, str(REPO / "bench" / "training_memory.py"), "--backbone", "pixart", "--json"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = {(row["variant"], row["frozen_weights"]): row for row in json.loads(result.stdout)}
    assert set(rows) == {(variant, dtype) for variant in ("frozen", "learnable") for dtype in ("fp32", "bf16")}
    parameters = {"transformer": 610_856_096, "text_encoder": 4_762_310_656, "vae": 83_653_863}  # published counts
    for (variant, dtype), row in rows.items():
        assert row["parameters"] == parameters
        assert row["trained_parts"] == (["transformer"] if variant == "frozen" else ["transformer", "text_encoder"])
        trained = sum(parameters[name] for name in row["trained_parts"])
        frozen = sum(parameters.values()) - trained
        assert row["trained_parameters"] == trained
        assert row["total_bytes"] == 20 * trained + {"fp32": 4, "bf16": 2}[dtype] * frozen
    gib = 2**30
    # T5-XXL trained in full: 20 bytes x 4.76 B parameters alone is 95 GB, past an 80 GiB A100/H100, within an H200.
    assert 20 * parameters["text_encoder"] > 80 * gib
    assert all(80 * gib < rows["learnable", dtype]["total_bytes"] < 141e9 for dtype in ("fp32", "bf16"))
    assert rows["frozen", "fp32"]["total_bytes"] < 40 * gib and rows["frozen", "bf16"]["total_bytes"] < 25 * gib
