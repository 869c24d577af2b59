"""bench/gpu_rehearsal.py: its smoke run on the CPU (--quick, tiny widths of the SD-2 structure) reports what a GPU
run will, with consistent arithmetic; and the batch search stops at the first out-of-memory batch."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

import gpu_rehearsal  # noqa: E402

NUMBER = r"([0-9]+\.[0-9]+)"


def test_quick_run_on_cpu_reports_throughput_memory_grounding_and_fid(tmp_path):
    command = [sys.executable, str(REPO / "bench" / "gpu_rehearsal.py"), "--quick", "--threads", "1"]
    result = subprocess.run(
        [*command, "--max-batch-size", "2"], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert "cached latents" in out and "bf16-mixed" in out and "device: CPU" in out

    rows = re.findall(rf"^\| (\d+) \| {NUMBER} \| {NUMBER} \| {NUMBER} \|$", out, re.M)
    assert [int(batch) for batch, *_ in rows] == [1, 2]  # doubling up to --max-batch-size
    assert all(float(rate) > 0 and float(peak) > 0 for _, rate, peak, _ in rows)
    best = re.search(rf"best training throughput: {NUMBER} images/s per device at batch (\d) \({NUMBER} GFLOP", out)
    rates = {int(batch): float(rate) for batch, rate, _, _ in rows}
    assert float(best.group(1)) == pytest.approx(max(rates.values()), abs=0.01)
    assert rates[int(best.group(2))] == pytest.approx(float(best.group(1)), abs=0.01)
    gflop_per_image = float(best.group(3))
    assert gflop_per_image > 0
    for _, rate, _, tflops in rows:
        assert float(tflops) == pytest.approx(float(rate) * gflop_per_image / 1000, abs=0.006)
    assert "largest batch that fits: 2 " in out and "--max-batch-size 2 reached, no OOM" in out

    grounding = re.search(rf"grounding: {NUMBER} s per pair \(2 pairs in one batch, N=50, K=40", out)
    fid = re.search(rf"FID: {NUMBER} images/s \(2 images, 2 DDIM steps, guidance 4", out)
    assert grounding and float(grounding.group(1)) > 0
    assert fid and float(fid.group(1)) > 0
    anchor = re.search(rf"36 images/s per A100; ours / anchor = {NUMBER}", out)
    goal = re.search(rf">= 100 images/s per H100/H200; ours / goal = {NUMBER}", out)
    assert float(anchor.group(1)) == pytest.approx(float(best.group(1)) / 36, abs=0.001)
    assert float(goal.group(1)) == pytest.approx(float(best.group(1)) / 100, abs=0.001)
    assert list(tmp_path.iterdir()) == []  # the model folder lived in a temporary directory


def test_batch_search_doubles_until_the_first_out_of_memory():
    tried = []

    def measure(batch_size: int) -> gpu_rehearsal.BatchResult:
        tried.append(batch_size)
        rate = None if batch_size >= 8 else 10.0 * batch_size
        return gpu_rehearsal.BatchResult(batch_size, rate, peak_bytes=batch_size)

    results = gpu_rehearsal.doubling_batch_sizes(measure, max_batch_size=1024)
    assert tried == [1, 2, 4, 8]
    assert [result.images_per_second for result in results] == [10.0, 20.0, 40.0, None]
    assert [r.batch_size for r in gpu_rehearsal.doubling_batch_sizes(measure, max_batch_size=3)] == [1, 2]


def test_out_of_memory_is_recognised_and_other_errors_are_not():
    assert gpu_rehearsal.out_of_memory(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert gpu_rehearsal.out_of_memory(RuntimeError("CUDA error: out of memory"))
    assert not gpu_rehearsal.out_of_memory(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
