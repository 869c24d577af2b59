"""Two CPU processes (DDP over gloo) with the grounding and FID callbacks: no hang, same metrics, files written once."""

import csv
import os
import socket
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch

from configs import ConfigError, load_config
from train import build_datamodule, trainer_for

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


class RecordDraws(L.LightningModule):
    """Writes which samples each process trained on, with their loss weights; learns nothing."""

    def __init__(self, out: Path) -> None:
        super().__init__()
        self.out, self.weight = out, torch.nn.Parameter(torch.zeros(1))

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        with open(self.out / f"rank{self.global_rank}.txt", "a") as handle:
            for dicom_id, weight in zip(batch["dicom_id"], batch["loss_weight"].tolist(), strict=True):
                handle.write(f"{self.current_epoch} {batch_idx} {dicom_id} {weight}\n")
        return (self.weight * 0).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_two_processes_train_on_every_sample_exactly_once_per_epoch(tiny_overrides, tmp_path, monkeypatch):
    """The trainer and datamodule that train.py builds, under real DDP: no re-sharding, no loss, no repeat."""
    with socket.socket() as probe:  # Lightning would leave its rendezvous settings in this process's environment
        probe.bind(("127.0.0.1", 0))
        monkeypatch.setenv("MASTER_PORT", str(probe.getsockname()[1]))
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    cfg = load_config([], [*tiny_overrides, "data.views=[PA]", "trainer.max_epochs=2", "trainer.max_steps=-1"])
    datamodule = build_datamodule(cfg, cfg.data.root, batch_size=4)
    total = len(datamodule.split_dataset(cfg.data.splits.train))
    assert total % 2, "the check needs a count that two processes cannot split evenly"
    overrides = {"accelerator": "cpu", "devices": 2, "strategy": "ddp_spawn", "limit_val_batches": 0}
    trainer = trainer_for(cfg, tmp_path / "run", [], [], enable_checkpointing=False, **overrides)
    trainer.fit(RecordDraws(tmp_path), datamodule=datamodule)

    rows = {rank: [line.split() for line in (tmp_path / f"rank{rank}.txt").read_text().splitlines()] for rank in (0, 1)}
    for epoch in ("0", "1"):
        counted = [d for rank in (0, 1) for e, _, d, weight in rows[rank] if e == epoch and float(weight) > 0]
        assert len(counted) == len(set(counted)) == total
    assert any(float(weight) == 0 for rank in (0, 1) for *_, weight in rows[rank])  # the evening-out repeat
    steps = [{(epoch, step) for epoch, step, *_ in rows[rank]} for rank in (0, 1)]
    assert steps[0] == steps[1]  # every process takes the same steps: DDP never waits on a missing one


def test_lightning_may_not_reshard_the_datamodules_sampler(tiny_overrides, tmp_path):
    cfg = load_config([], [*tiny_overrides, "trainer.use_distributed_sampler=true"])
    with pytest.raises(ConfigError, match="use_distributed_sampler must stay false"):
        trainer_for(cfg, tmp_path, [], [])
