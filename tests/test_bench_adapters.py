"""bench/adapters.py --quick end to end: LoRA against full training of each part, from the module's real runs."""

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STATE_BYTES = 16  # gradient 4 + AdamW moments 8 + EMA 4 per trained parameter (bench/training_memory.py)


def test_lora_trains_fewer_weights_and_writes_smaller_checkpoints_than_full_training(tmp_path, tiny_bench_overrides):
    result = subprocess.run(
        [sys.executable, str(REPO / "bench" / "adapters.py"), "--quick", "--threads", "1", "--json"]
        + tiny_bench_overrides,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    output = json.loads(result.stdout)
    rows = {row["preset"].removeprefix("experiment/"): row for row in output["rows"]}
    assert rows["lora_unet"]["trained_parts"] == ["unet"] and rows["lora_unet"]["adapted_parts"] == ["unet"]
    assert rows["lora_text_encoder"]["adapted_parts"] == ["text_encoder"]
    # Rank 8 on a c-wide transformer block with 32-wide text: attn1 4 x 8(c + c), attn2 2 x 8(c + c) + 2 x 8(32 + c),
    # 112c + 512 in all; the tiny UNet has three such blocks at c = 16 and its mid block at c = 32.
    assert rows["lora_unet"]["trained_parameters"] == 3 * (112 * 16 + 512) + (112 * 32 + 512)
    # Its CLIP encoder: q, k, v, out projections 32 x 32 in 2 layers, 4 x 8(32 + 32) each, beside the full UNet.
    full_unet = rows["frozen_text_encoder"]["trained_parameters"]
    assert rows["lora_text_encoder"]["trained_parameters"] == full_unet + 2 * 4 * 8 * (32 + 32)
    for row in rows.values():
        assert row["step_seconds"] > 0 and row["peak_rss_above_resting_bytes"] > 0
        assert row["training_state_bytes"] == STATE_BYTES * row["trained_parameters"]
        # A checkpoint holds the trained weights, their EMA and both AdamW moments: 16 bytes per trained parameter,
        # plus fully trained parts' untrained tensors and the file's bookkeeping (well under a MiB here).
        state = STATE_BYTES * row["trained_parameters"]
        assert state <= row["checkpoint_bytes"] < state + 2**20
    comparisons = {row["part"]: row for row in output["comparisons"]}
    assert set(comparisons) == {"unet", "text_encoder"}
    for row in comparisons.values():
        assert 0 < row["trained_parameter_ratio"] < 1
        assert 0 < row["checkpoint_size_ratio"] < 1
        assert row["step_time_ratio"] > 0 and row["peak_memory_ratio"] > 0
    unet = comparisons["unet"]
    assert unet["trained_parameter_ratio"] == (
        rows["lora_unet"]["trained_parameters"] / rows["frozen_text_encoder"]["trained_parameters"]
    )
