"""Two CPU processes (DDP over gloo) with the grounding and FID callbacks: no hang, same metrics, files written once."""

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def run_train(overrides: list[str], cwd: Path) -> Path:
    cwd.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # two processes on two cores
    env.pop("CXR_DIFFUSION_RUN_NAME", None)
    result = subprocess.run(
        [sys.executable, str(REPO / "train.py"), *overrides],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    (run_dir,) = (cwd / "runs").iterdir()
    return run_dir


def evaluation_metrics(run_dir: Path) -> dict[str, float]:
    with open(run_dir / "diffusion" / "metrics.csv") as handle:
        rows = list(csv.DictReader(handle))
    return {
        key: float(value)
        for row in rows
        for key, value in row.items()
        if value and key.startswith(("grounding/", "fid/", "agreement/", "diversity/")) and int(row["step"]) == 4
    }


def test_two_process_run_logs_the_same_evaluation_as_one_process(tiny_overrides, tmp_path):
    overrides = [
        *[o for o in tiny_overrides if not o.startswith(("run_dir", "logger.wandb"))],
        "trainer.max_steps=4",
        "train.learning_rate.unet=0",  # identical weights whatever the process count, so evaluations must agree
        "train.use_ema=false",
        "callbacks.grounding.every_n_steps=0",
        "callbacks.fidelity.every_n_steps=0",
        "callbacks.attention_heatmaps.every_n_steps=0",
        "fidelity.domain_classifier.steps=20",
        "logger.wandb.mode=offline",
    ]
    one = run_train([*overrides, "run_dir=runs"], tmp_path / "one")
    two = run_train(
        [*overrides, "run_dir=runs", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.strategy=ddp"],
        tmp_path / "two",
    )
    single, double = evaluation_metrics(one), evaluation_metrics(two)
    assert "grounding/iou" in single and any(key.startswith("fid/") for key in single)
    assert single.keys() == double.keys()
    for key, value in single.items():
        assert double[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key

    for run_dir in (one, two):  # every file once: one run folder, one W&B run, one grid per step
        assert len(list((run_dir / "wandb").glob("offline-run-*"))) == 1
        names = sorted(p.name for p in (run_dir / "images").iterdir())
        assert len(names) == len(set(names)) and any(name.startswith("samples_") for name in names)
    assert sorted(p.name for p in (one / "images").iterdir()) == sorted(p.name for p in (two / "images").iterdir())
