"""bench/text_cache.py --quick on the tiny model: the report's format and arithmetic, the batched mode's single
encoder call per step and its bit-identical features, never the speed ratios' values."""

import re
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
NUMBER = r"([0-9]+\.[0-9]+)"
MODES = ("per-miss", "batched", "off")


def test_quick_benchmark_reports_both_streams_three_modes_and_ratios(tiny_bench_overrides, tmp_path):
    command = [sys.executable, str(REPO / "bench" / "text_cache.py"), "--quick", "--threads", "1"]
    result = subprocess.run(
        [*command, *tiny_bench_overrides], cwd=tmp_path, capture_output=True, text=True, timeout=240
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert "batch 4, 32 px, 2 steps (+1 warm-up), 2 repeats" in out

    for kind in ("unique", "pool"):
        repeat_line = rf"^{kind} repeat (\d)/2 \(([\w-]+) first\): per-miss {NUMBER}, batched {NUMBER}, off {NUMBER}"
        repeats = re.findall(repeat_line, out, re.M)
        assert [(index, first) for index, first, *_ in repeats] == [("1", "per-miss"), ("2", "batched")]
        mode_summary = rf" {NUMBER} ms/step \({NUMBER} encoder calls, {NUMBER} ms encoding\)"
        summary = re.search(rf"^{kind}:" + ",".join(f" {mode}{mode_summary}" for mode in MODES) + "$", out, re.M)
        assert summary, out
        values = [float(value) for value in summary.groups()]
        medians = {mode: values[3 * i : 3 * i + 3] for i, mode in enumerate(MODES)}
        for position, mode in enumerate(MODES, start=2):
            assert medians[mode][0] == pytest.approx(statistics.median(float(r[position]) for r in repeats), abs=0.06)
        assert medians["batched"][1] <= 1.0 < medians["per-miss"][1]  # one call per batch of misses
        assert medians["off"][1] == 1.0
        identical = re.search(
            rf"^{kind} cached features, batched vs per-miss: (\d+) captions, bit-identical: yes", out, re.M
        )
        assert identical and int(identical.group(1)) > 0
        for other in ("batched", "off"):
            ratio = re.search(rf"^ratio {kind}, per-miss / {other} step time: {NUMBER}$", out, re.M)
            assert float(ratio.group(1)) == pytest.approx(medians["per-miss"][0] / medians[other][0], abs=0.01)
    assert list(tmp_path.iterdir()) == []  # nothing written where it ran
