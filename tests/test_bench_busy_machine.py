"""bench/busy_machine.py --quick end to end: each setting measured in its own process with the environment the
setting names (whatever the caller's OpenMP variables), and the printed ratios follow from the printed step times.
Never the ratios' values: how much a competitor slows a step is the machine's business."""

import os
import re

from tests.bench_runs import run_bench
from tests.rounding import follows_from_rounded

NUMBER = r"([0-9]+\.[0-9]+)"


def test_quick_benchmark_reports_quiet_busy_and_their_ratio_per_setting(tmp_path):
    caller = {**os.environ, "OMP_WAIT_POLICY": "ACTIVE", "OMP_NUM_THREADS": "1"}  # the bench must override these
    out = run_bench("busy_machine.py", "--quick", cwd=tmp_path, env=caller, timeout=240)
    assert "batch 4, 32 px, 1 steps (+1 warm-up) x 1 quiet/busy rounds" in out

    line = (
        rf"^(current|OMP_WAIT_POLICY=PASSIVE): (\d+) threads, OMP_WAIT_POLICY (unset|PASSIVE): quiet {NUMBER} s/step, "
        rf"busy {NUMBER} s/step -> busy/quiet {NUMBER}x \(rounds quiet/busy: {NUMBER}/{NUMBER}\)$"
    )
    rows = {name: rest for name, *rest in re.findall(line, out, re.M)}
    assert list(rows) == ["current", "OMP_WAIT_POLICY=PASSIVE"], out
    assert rows["current"][1] == "unset" and rows["OMP_WAIT_POLICY=PASSIVE"][1] == "PASSIVE"
    assert rows["current"][0] == rows["OMP_WAIT_POLICY=PASSIVE"][0]  # torch's default count, not the caller's 1
    assert int(rows["current"][0]) > 1 or len(os.sched_getaffinity(0)) == 1
    for _, _, quiet, busy, ratio, round_quiet, round_busy in rows.values():
        assert float(quiet) > 0 and float(busy) > 0
        assert (round_quiet, round_busy) == (quiet, busy)  # one round: its medians are the result
        assert follows_from_rounded(float(ratio), float(busy), float(quiet), value_half_unit=0.0005), out
    relative = re.search(rf"^OMP_WAIT_POLICY=PASSIVE / current: quiet {NUMBER}x, busy {NUMBER}x step time$", out, re.M)
    assert relative, out
    passive, current = rows["OMP_WAIT_POLICY=PASSIVE"], rows["current"]
    for printed, index in zip(map(float, relative.groups()), (2, 3), strict=True):
        assert follows_from_rounded(printed, float(passive[index]), float(current[index]), 0.0005), out
    assert list(tmp_path.iterdir()) == []
