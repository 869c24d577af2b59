"""Two CPU processes (DDP over gloo): each rank draws its own timesteps and noise, and a resumed run replays both."""

import shutil
from pathlib import Path

import torch

from tests.test_ddp import DDP, REPO, run_with_timeout

# train.py with the UNet's training calls recorded per rank (Lightning relaunches this very script for rank 1).
RECORDING_SCRIPT = """
import os, sys
from pathlib import Path
sys.path.insert(0, {repo!r})
import torch
from diffusers import UNet2DConditionModel

record = Path(sys.argv[1])
forward = UNet2DConditionModel.forward

def recording_forward(self, sample, timestep, *args, **kwargs):
    if torch.is_grad_enabled():  # a training step (validation and sampling run without autograd)
        with open(record / f"timesteps-rank{{os.environ.get('LOCAL_RANK', '0')}}.txt", "a") as handle:
            handle.write(" ".join(str(t) for t in timestep.tolist()) + "\\n")
    return forward(self, sample, timestep, *args, **kwargs)

UNet2DConditionModel.forward = recording_forward
import train
train.main(sys.argv[2:])
"""


def run_recorded(script: Path, record: Path, overrides: list[str], cwd: Path, timeout: float = 300) -> None:
    """The recording script in a subprocess, killed and failed past ``timeout`` s (a hang)."""
    record.mkdir(parents=True, exist_ok=True)
    run_with_timeout([str(script), str(record), *overrides], cwd, timeout)


def timesteps(record: Path, rank: int) -> list[str]:
    return (record / f"timesteps-rank{rank}.txt").read_text().splitlines()


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def test_ranks_draw_their_own_timesteps_and_a_resumed_run_replays_every_rank(tiny_training_overrides, tmp_path):
    script = tmp_path / "recorded_train.py"
    script.write_text(RECORDING_SCRIPT.format(repo=str(REPO)))
    overrides = [
        *[o for o in tiny_training_overrides if not o.startswith("run_dir")],
        *DDP,
        "run_dir=runs",
        "trainer.max_steps=6",
        "train.checkpointing_steps=3",
        "trainer.val_check_interval=100",
        "callbacks.sample_grid.every_n_steps=0",
        "callbacks.export_pipeline=false",
        "train.ucg_probability=0.5",
        "train.learning_rate.unet=1e-3",
    ]
    run_recorded(script, tmp_path / "straight-draws", overrides, tmp_path / "straight")
    (straight,) = (tmp_path / "straight" / "runs").iterdir()
    rank0, rank1 = timesteps(tmp_path / "straight-draws", 0), timesteps(tmp_path / "straight-draws", 1)
    assert len(rank0) == len(rank1) == 6
    assert all(a != b for a, b in zip(rank0, rank1, strict=True)), "both ranks drew the same timesteps"

    saved = load(straight / "checkpoints" / "step000003.ckpt")["rng_states"]["per_rank"]
    assert len(saved) == 2 and not torch.equal(saved[0]["generator"], saved[1]["generator"])

    twin = tmp_path / "twin" / "runs" / "run"
    (twin / "checkpoints").mkdir(parents=True)
    shutil.copy(straight / "config.yaml", twin / "config.yaml")
    shutil.copy(straight / "checkpoints" / "step000003.ckpt", twin / "checkpoints" / "stopped.ckpt")
    resume = f"resume={twin / 'checkpoints' / 'stopped.ckpt'}"
    run_recorded(script, tmp_path / "resumed-draws", [*overrides, resume], tmp_path / "twin")
    for rank in (0, 1):
        assert timesteps(tmp_path / "resumed-draws", rank) == timesteps(tmp_path / "straight-draws", rank)[3:]

    final_straight, final_resumed = (
        load(straight / "checkpoints" / "last.ckpt"),
        load(twin / "checkpoints" / "last.ckpt"),
    )
    assert final_resumed["global_step"] == final_straight["global_step"] == 6
    for key, value in final_straight["state_dict"].items():
        assert torch.equal(value, final_resumed["state_dict"][key]), key
    for key, value in final_straight["ema"]["weights"].items():
        assert torch.equal(value, final_resumed["ema"]["weights"][key]), key
    for ours, theirs in zip(
        final_straight["rng_states"]["per_rank"], final_resumed["rng_states"]["per_rank"], strict=True
    ):
        assert ours["generator_device"] == theirs["generator_device"] == "cpu"
        assert torch.equal(ours["generator"], theirs["generator"]) and torch.equal(ours["torch"], theirs["torch"])
