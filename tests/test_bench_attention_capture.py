"""bench/attention_capture.py --quick on the tiny model, end to end: capture on/off ratios that follow from the printed
seconds, both callbacks called (the heatmap grid written every call), and the N / 4N memory runs' ratios."""

import re
import subprocess
import sys
from pathlib import Path

from tests.rounding import follows_from_rounded

REPO = Path(__file__).resolve().parents[1]
NUMBER = r"([0-9]+\.[0-9]+)"


def test_quick_benchmark_reports_capture_ratio_callback_costs_and_flat_memory(tiny_bench_overrides, tmp_path):
    command = [sys.executable, str(REPO / "bench" / "attention_capture.py"), "--quick", *tiny_bench_overrides]
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout

    capture = re.search(
        rf"x 2 DDIM steps, .*capture off {NUMBER} s \({NUMBER} CPU-s\), on {NUMBER} s \({NUMBER} CPU-s\) "
        rf"-> {NUMBER}x wall, {NUMBER}x CPU \(goal <= 1.3x\)$",
        out,
        re.M,
    )
    assert capture, out
    off_wall, off_cpu, on_wall, on_cpu, wall_ratio, cpu_ratio = map(float, capture.groups())
    assert min(off_wall, on_wall, off_cpu, on_cpu) > 0
    assert follows_from_rounded(wall_ratio, on_wall, off_wall) and follows_from_rounded(cpu_ratio, on_cpu, off_cpu), out
    assert 0.3 < wall_ratio < 10  # capture adds work to the same sampling loop: neither free nor a different job

    for name in ("GroundingCallback", "AttentionHeatmapCallback"):
        call = re.search(rf"^{name} call: 2 pairs, last 1 of 2 DDIM steps, batch \d+: {NUMBER} s", out, re.M)
        assert call and float(call.group(1)) > 0, out
    assert "heatmap grids written: 2 of 2 calls" in out  # warm-up and the one timed repeat

    runs = re.findall(
        rf"^grounding evaluation of (\d+) pairs: peak RSS (\d+) MB, tracemalloc peak {NUMBER} MB", out, re.M
    )
    assert [int(items) for items, *_ in runs] == [2, 8]
    (_, rss_n, py_n), (_, rss_4n, py_4n) = ((int(a), int(b), float(c)) for a, b, c in runs)
    memory = re.search(rf"^memory 4N/N: RSS {NUMBER}x, Python objects {NUMBER}x \(goal: flat, 1.0x\)$", out, re.M)
    assert memory, out
    rss_ratio, python_ratio = map(float, memory.groups())
    assert follows_from_rounded(rss_ratio, rss_4n, rss_n, value_half_unit=0.5), out
    assert follows_from_rounded(python_ratio, py_4n, py_n), out
    assert 0.8 < rss_ratio < 1.5  # four times the pairs, about the same peak: evaluation streams its batches
    assert list(tmp_path.iterdir()) == []  # nothing written where it ran
