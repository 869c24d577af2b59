"""bench/text_feature_cost.py --quick end to end: the default model's text-encoder FLOPs against a hand count of
MiniLM's matrix products, a text share that follows from the printed FLOPs, and the bytes per sample."""

import re

import pytest

from tests.bench_runs import run_bench

NUMBER = r"([0-9]+\.[0-9]+)"
TOKENS, HIDDEN, FEED_FORWARD, LAYERS = 77, 384, 1536, 6  # all-MiniLM-L6-v2 on one padded caption


def minilm_forward_flops() -> int:
    """2 FLOPs per multiply-add: per layer the Q, K, V and output projections, the two feed-forward products and
    the two attention products (scores and weighted values); plus the pooler."""
    projections = 2 * TOKENS * (4 * HIDDEN * HIDDEN + 2 * HIDDEN * FEED_FORWARD)
    attention = 2 * 2 * TOKENS * TOKENS * HIDDEN
    return LAYERS * (projections + attention) + 2 * HIDDEN * HIDDEN


def test_quick_benchmark_counts_the_default_models_flops_and_bytes(tmp_path):
    out = run_bench("text_feature_cost.py", "--quick", cwd=tmp_path, timeout=240)
    assert "SD 2 base" not in out
    name = re.escape("default (MiniLM, UNet [32,64,128], 64 px)")
    flops = re.search(rf"^{name}\s+{NUMBER}\s+{NUMBER}\s+{NUMBER}%$", out, re.M)
    assert flops, out
    text, unet, share = map(float, flops.groups())
    assert text == pytest.approx(minilm_forward_flops() / 1e9, abs=0.05)
    assert 0.1 < unet < text  # the small UNet's forward + backward on 16x16 latents costs less than MiniLM
    assert share == pytest.approx(100 * text / (text + unet), abs=3.0)  # from the 1-decimal GFLOP values
    sizes = re.search(rf"^{name}\s+(\d+)KB\s+(\d+)KB\s+(\d+)KB$", out, re.M)
    assert sizes, out
    # fp16 features of 77 x 384; fp32 mean + log-variance of 4 x 16 x 16 latents; 64 x 64 8-bit pixels
    assert [int(value) for value in sizes.groups()] == [round(TOKENS * HIDDEN * 2 / 1024), 8, 4]
    assert list(tmp_path.iterdir()) == []
