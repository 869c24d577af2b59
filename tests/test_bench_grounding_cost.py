"""bench/grounding_cost.py --quick on the tiny model: the report's format and arithmetic, never the costs' values
(speed targets are printed by bench scripts, not asserted in tests)."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
NUMBER = r"([0-9]+\.[0-9]+)"


def test_quick_benchmark_reports_the_end_to_end_cost_per_pair_and_the_metrics_cost_per_map_size(
    tiny_bench_overrides, tmp_path
):
    command = [sys.executable, str(REPO / "bench" / "grounding_cost.py"), "--quick", "--threads", "1"]
    result = subprocess.run(
        [*command, *tiny_bench_overrides], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout

    assert re.search(r"^model: .+, 32 px, N=4 / K=2, layers all, batch 8, device cpu, torch threads 1$", out, re.M)
    line = re.search(
        rf"^end to end: (\d+) pairs in {NUMBER} s: {NUMBER} s/pair "
        rf"\(image loading \+ heatmaps {NUMBER} s/pair, metrics {NUMBER} s/pair\)$",
        out,
        re.M,
    )
    assert line, out
    pairs, seconds, per_pair, heatmaps, metrics = int(line.group(1)), *map(float, line.groups()[1:])
    assert pairs == 2  # --quick times 2 pairs after the warm-up pair
    assert per_pair == pytest.approx(seconds / pairs, abs=1e-3)
    assert heatmaps + metrics == pytest.approx(per_pair, abs=2e-4) and metrics > 0 and heatmaps > 0
    minutes = float(re.search(rf"^all 1162 MS-CXR pairs at this cost: {NUMBER} min$", out, re.M).group(1))
    assert minutes == pytest.approx(1162 * per_pair / 60, abs=0.1)

    rows = re.findall(
        rf"^metrics alone, heatmap (\d+) px -> mask (\d+) px \((\d+) values\): paper_code {NUMBER} s, "
        rf"biovil {NUMBER} s, method {NUMBER} s; all {NUMBER} s/pair \(median of 1\)"
        r"(; budget 0.050 s: (?:met|NOT met))?$",
        out,
        re.M,
    )
    assert [(int(h), int(m), int(v)) for h, m, v, *_ in rows] == [
        (8, 64, 64 * 64),
        (16, 128, 128 * 128),
        (64, 64, 4096),
    ]
    assert [bool(row[-1]) for row in rows] == [False, False, True]  # the budget is for a 64 x 64 map
    for *_, paper_code, biovil, method, together, _ in rows:
        assert min(map(float, (paper_code, biovil, method, together))) > 0
    assert list(tmp_path.iterdir()) == []  # nothing written where it ran
