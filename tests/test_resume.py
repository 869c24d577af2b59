"""Exact resume on CPU: a run stopped mid-epoch and resumed equals the uninterrupted run, step for step."""

import csv
import shutil
from pathlib import Path

import pytest
import torch

import train
from configs import load_config
from datamodules.prepare import prepare


def losses_by_step(run_dir: Path) -> dict[int, str]:
    with open(run_dir / "diffusion" / "metrics.csv") as handle:
        return {int(row["step"]): row["train/loss"] for row in csv.DictReader(handle) if row.get("train/loss")}


def checkpoint_state(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.mark.parametrize("source", ["folder", "shards with cached latents, 2 loader workers"])
def test_stopped_and_resumed_run_matches_the_straight_run(tiny_training_overrides, tmp_path, source):
    data = []
    if source != "folder":
        shards = tmp_path / "shards"
        prepare(load_config([], tiny_training_overrides), shards, with_latents=True, samples_per_shard=8)
        data = ["data.format=shards", f"data.shards={shards}", "data.num_workers=2"]
    overrides = [
        *tiny_training_overrides,
        *data,
        "trainer.max_steps=12",  # 34 training images in batches of 4: 9 batches an epoch, so this crosses one
        "train.checkpointing_steps=5",  # the stop: mid-epoch
        "trainer.val_check_interval=4",
        "train.ucg_probability=0.5",  # the RNG-driven parts of the objective must be replayed too
        "callbacks.sample_grid.every_n_steps=0",
        "callbacks.export_pipeline=false",
    ]
    straight = train.main(overrides)["run_dir"]

    twin = tmp_path / "twin" / "run"
    (twin / "checkpoints").mkdir(parents=True)
    shutil.copy(straight / "config.yaml", twin / "config.yaml")
    stop = twin / "checkpoints" / "stopped.ckpt"
    shutil.copy(straight / "checkpoints" / "step000005.ckpt", stop)
    assert checkpoint_state(stop)["global_step"] == 5
    resumed = train.main([*overrides, f"resume={stop}"])["run_dir"]
    assert resumed == twin

    straight_losses, resumed_losses = losses_by_step(straight), losses_by_step(twin)
    assert sorted(resumed_losses) == list(range(5, 12))
    assert {step: straight_losses[step] for step in resumed_losses} == resumed_losses

    final_straight = checkpoint_state(straight / "checkpoints" / "last.ckpt")
    final_resumed = checkpoint_state(twin / "checkpoints" / "last.ckpt")
    assert final_resumed["global_step"] == final_straight["global_step"] == 12
    for key, value in final_straight["state_dict"].items():
        assert torch.equal(value, final_resumed["state_dict"][key]), key
    ema_straight, ema_resumed = final_straight["ema"], final_resumed["ema"]
    assert ema_straight["optimization_step"] == ema_resumed["optimization_step"] == 12
    assert ema_straight["weights"].keys() == ema_resumed["weights"].keys()
    for key, value in ema_straight["weights"].items():
        assert torch.equal(value, ema_resumed["weights"][key]), key
