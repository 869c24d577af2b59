"""bench/data_throughput.py --quick on the tiny model: the report's format and arithmetic, never the ratios' values
(speed targets are printed by bench scripts, not asserted in tests)."""

import re
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
NUMBER = r"([0-9]+\.[0-9]+)"
SIDES = ("folder", "shards", "latents")


def test_quick_benchmark_reports_three_sides_and_their_ratios(tiny_bench_overrides, tmp_path):
    overrides = [*tiny_bench_overrides, f"data.cache_dir={tmp_path / 'cache'}", "data.batch_size=4"]
    command = [sys.executable, str(REPO / "bench" / "data_throughput.py"), "--quick", "--threads", "1", *overrides]
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout

    prepared = re.search(r"\((\d+) images prepared with latents", out)
    assert prepared and int(prepared.group(1)) == 37  # the 34 train + 3 validate images of the synthetic set
    repeat_line = rf"^repeat (\d)/2 \((\w+) first\): folder {NUMBER}, shards {NUMBER}, latents {NUMBER} training"
    repeats = re.findall(repeat_line, out, re.M)
    assert [(index, first) for index, first, *_ in repeats] == [("1", "folder"), ("2", "shards")]
    medians = {}
    for name in ("training", "loader only"):
        line = re.search(rf"^{name}: folder {NUMBER} images/s, shards {NUMBER} images/s, latents {NUMBER}", out, re.M)
        medians[name] = dict(zip(SIDES, map(float, line.groups()), strict=True))
        assert all(value > 0 for value in medians[name].values())
    for position, side in enumerate(SIDES, start=2):
        assert medians["training"][side] == pytest.approx(
            statistics.median(float(r[position]) for r in repeats), abs=0.06
        )
    cached = float(
        re.search(
            rf"^ratio training, cached latents / folder: {NUMBER} \(goal >= 2.0: (met|not met)\)", out, re.M
        ).group(1)
    )
    assert cached == pytest.approx(medians["training"]["latents"] / medians["training"]["folder"], abs=0.01)
    loader = float(re.search(rf"^ratio loader only, shards / folder: {NUMBER}$", out, re.M).group(1))
    assert loader == pytest.approx(medians["loader only"]["shards"] / medians["loader only"]["folder"], abs=0.01)
