"""Resuming mid-epoch on another number of processes (real gloo DDP): every sample still trains exactly once.

A checkpoint holds rank 0's loader position. Applied to each rank's new slice of the epoch after a change of world
size, that position would train some samples twice and others never (issue 20, item 5); the sampler instead splits
the epoch's remaining samples over the new processes. Each run is a subprocess with a timeout: a hang fails.
"""

from __future__ import annotations

import collections
from pathlib import Path

import pytest

from tests.test_ddp import REPO, run_with_timeout

# Fits a module that learns nothing and writes which samples each rank trained on (Lightning relaunches this very
# script for the other ranks under strategy=ddp).
RECORDING_SCRIPT = """
import sys
from pathlib import Path
sys.path.insert(0, {repo!r})
import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from callbacks.last_checkpoint import LastCheckpoint
from configs import load_config
from train import build_datamodule, trainer_for

out, devices, max_steps, max_epochs, resume, every, crash = sys.argv[1:8]
out, devices = Path(out), int(devices)


class RecordDraws(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))

    def training_step(self, batch, batch_idx):
        if crash != "-" and self.global_step == int(crash):
            raise RuntimeError("crashed inside the training step, before its optimizer step")
        with open(out / f"draws-rank{{self.global_rank}}.txt", "a") as handle:
            for sample_id, weight in zip(batch["dicom_id"], batch["loss_weight"].tolist(), strict=True):
                handle.write(f"{{self.current_epoch}} {{self.global_step}} {{sample_id}} {{weight}}\\n")
        return (self.weight * 0).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


cfg = load_config([], sys.argv[8:])
datamodule = build_datamodule(cfg, cfg.data.root, batch_size=cfg.data.batch_size)
saving = ModelCheckpoint(dirpath=out.parent / "checkpoints", filename="step{{step}}", every_n_train_steps=int(every),
                         save_top_k=-1, auto_insert_metric_name=False)
last = LastCheckpoint(out.parent / "checkpoints" / "last.ckpt", every_n_train_steps=0)
trainer = trainer_for(cfg, out, [saving, last], [], accelerator="cpu", devices=devices,
                      strategy="ddp" if devices > 1 else "auto", max_steps=int(max_steps), max_epochs=int(max_epochs),
                      limit_val_batches=0, enable_progress_bar=False, enable_model_summary=False)
try:
    trainer.fit(RecordDraws(), datamodule=datamodule, ckpt_path=None if resume == "-" else resume)
except RuntimeError:
    assert crash != "-"  # last.ckpt holds the state before the crashed batch
"""


def fit_recording(
    tmp_path: Path,
    phase: str,
    overrides: list[str],
    devices: int,
    max_steps: int,
    max_epochs: int,
    resume: str,
    every: int,
    crash: int | None = None,
) -> dict[int, list[tuple[int, int, str, float]]]:
    """One fit in a subprocess; returns {rank: [(epoch, global step, sample id, loss weight), ...]}."""
    script = tmp_path / "record_draws.py"
    script.write_text(RECORDING_SCRIPT.format(repo=str(REPO)))
    out = tmp_path / phase
    out.mkdir(parents=True)
    arguments = [str(out), str(devices), str(max_steps), str(max_epochs), resume, str(every), str(crash or "-")]
    run_with_timeout([str(script), *arguments, *overrides], tmp_path / "cwd", timeout=300)
    draws = {}
    for rank in range(devices):
        rows = [line.split() for line in (out / f"draws-rank{rank}.txt").read_text().splitlines()]
        draws[rank] = [(int(epoch), int(step), sample, float(weight)) for epoch, step, sample, weight in rows]
    return draws


def trained_counts(phases: list[dict], epoch: int) -> collections.Counter:
    """How often each sample trained (loss weight > 0) in ``epoch``, over all phases and ranks."""
    return collections.Counter(
        sample for draws in phases for rows in draws.values() for e, _, sample, w in rows if e == epoch and w > 0
    )


@pytest.mark.parametrize(
    ("before", "after", "crash"), [(2, 1, False), (1, 2, False), (1, 1, False), (1, 2, True)], ids=str
)
def test_a_mid_epoch_resume_on_any_number_of_processes_trains_every_sample_once(
    tiny_training_overrides, tmp_path, before, after, crash
):
    """Stopped 2 steps into epoch 1 (34 training samples in batches of 4: 9 steps an epoch on 1 process, 5 on 2),
    at a step checkpoint or by a crash inside the next batch (last.ckpt), and resumed: epochs 1 and 2 each train
    every sample once, and on the same processes exactly as a straight run."""
    overrides = [o for o in tiny_training_overrides if not o.startswith("run_dir")]
    overrides += [f"run_dir={tmp_path / 'runs'}", "data.num_workers=0"]
    stop = {1: 9, 2: 5}[before] + 2
    if crash:
        first = fit_recording(tmp_path, "before", overrides, before, -1, -1, "-", every=100, crash=stop)
        checkpoint = tmp_path / "checkpoints" / "last.ckpt"
    else:
        first = fit_recording(tmp_path, "before", overrides, before, stop, -1, "-", every=stop)
        checkpoint = tmp_path / "checkpoints" / f"step{stop}.ckpt"
    assert {step for rows in first.values() for _, step, *_ in rows} == set(range(stop))
    second = fit_recording(tmp_path, "after", overrides, after, -1, 3, str(checkpoint), every=100)

    total = 34
    for epoch in (0, 1, 2):  # before, across and after the resume (epoch 2 whole on the new number of processes)
        counts = trained_counts([first, second], epoch)
        twice = sum(count > 1 for count in counts.values())
        assert len(counts) == total and twice == 0, (
            f"epoch {epoch}: {total - len(counts)} of {total} samples never trained, {twice} trained more than once"
        )
    steps = [{(epoch, step) for epoch, step, *_ in rows} for rows in second.values()]
    assert all(ranks == steps[0] for ranks in steps)  # every process takes every step: DDP never waits
    if before == after == 1:
        straight = fit_recording(tmp_path, "straight", overrides, 1, -1, 3, "-", every=100)
        assert first[0] + second[0] == straight[0]
