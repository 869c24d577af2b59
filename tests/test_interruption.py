"""A run survives interruption (SIGTERM leaves a resumable checkpoint) and never unpickles code from a checkpoint."""

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import train

REPO = Path(__file__).resolve().parents[1]


class RunsCodeWhenUnpickled:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_checkpoint_that_would_run_code_is_refused(tiny_training_overrides, tmp_path):
    marker = tmp_path / "code-ran"
    evil = tmp_path / "evil" / "run" / "checkpoints" / "last.ckpt"
    evil.parent.mkdir(parents=True)
    torch.save({"state_dict": {}, "payload": RunsCodeWhenUnpickled(marker)}, evil)
    with pytest.raises(ValueError, match="refusing to load checkpoint"):
        train.main([*tiny_training_overrides, f"resume={evil}"])
    assert not marker.exists()


def test_sigterm_mid_run_leaves_a_checkpoint_that_resumes(tiny_training_overrides, tmp_path):
    overrides = [
        *tiny_training_overrides,
        "trainer.max_steps=100000",
        "callbacks.export_pipeline=false",
        "callbacks.sample_grid.every_n_steps=0",
        "trainer.val_check_interval=1000",
    ]
    process = subprocess.Popen(
        [sys.executable, str(REPO / "train.py"), *overrides],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.monotonic() + 240
    while not list((tmp_path / "runs").glob("*/checkpoints/step000004.ckpt")):
        assert process.poll() is None and time.monotonic() < deadline, "training did not reach step 4"
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=120)
    assert process.returncode != 0 and "[interrupted]" in output
    (last,) = (tmp_path / "runs").glob("*/checkpoints/last.ckpt")
    stopped_at = torch.load(last, map_location="cpu", weights_only=True)["global_step"]
    assert stopped_at >= 4

    outputs = train.main([*overrides, "trainer.max_steps=" + str(stopped_at + 2), "resume=last"])
    assert outputs["run_dir"] == last.parent.parent
    assert torch.load(outputs["checkpoint"], map_location="cpu", weights_only=True)["global_step"] == stopped_at + 2
