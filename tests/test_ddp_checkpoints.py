"""Two CPU processes (DDP over gloo): a checkpoint that only process 0 writes, because another process crashed or
SLURM's time-limit signal came, never waits on the others, and resumes to the uninterrupted run bit for bit."""

import os
import signal
import sys
import time
from pathlib import Path

import torch

from tests.test_ddp import REPO, ddp_training_overrides, run_train, run_with_timeout, start_script, wait_for

CRASH_STEP = 3  # rank 1 raises inside the training step that starts at this global step

# train.py with rank 1 crashing mid-step, after its draws (Lightning relaunches this very script for rank 1).
CRASHING_SCRIPT = """
import sys
sys.path.insert(0, {repo!r})
from lightning_modules.latent_diffusion import LatentDiffusionModule

diffusion_loss = LatentDiffusionModule.diffusion_loss

def crash_on_rank_1(self, *args, **kwargs):
    loss = diffusion_loss(self, *args, **kwargs)
    if self.global_rank == 1 and self.trainer.training and self.global_step == {step}:
        raise RuntimeError("rank 1 crashed inside its training step")
    return loss

LatentDiffusionModule.diffusion_loss = crash_on_rank_1
import train
train.main(sys.argv[1:])
"""

# SLURM's scontrol, for the requeue: records the call and keeps the last.ckpt a requeued job would find (SLURM
# stops the job right after the requeue; this run goes on, so it stands in for the uninterrupted run too).
FAKE_SCONTROL = """#!{python}
import shutil, sys
with open({calls!r}, "a") as handle:
    handle.write(" ".join(sys.argv[1:]) + "\\n")
shutil.copy({last!r}, {kept!r})
"""


def overrides(tiny_training_overrides: list[str], max_steps: int) -> list[str]:
    return ddp_training_overrides(
        tiny_training_overrides,
        f"trainer.max_steps={max_steps}",
        "train.checkpointing_steps=2",
        "trainer.val_check_interval=100",
        "callbacks.export_pipeline=false",
        "train.ucg_probability=0.5",
        "train.learning_rate.unet=1e-3",
    )


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def training_state_differences(straight: dict, resumed: dict) -> list[str]:
    """Step, weights, EMA and every rank's random state: what differs bit for bit."""
    differences = [] if straight["global_step"] == resumed["global_step"] else ["global_step"]
    for name, weights in (("weight", "state_dict"), ("ema", "ema")):
        ours, theirs = (
            state[weights] if name == "weight" else state[weights]["weights"] for state in (straight, resumed)
        )
        differences += [f"{name} {key}" for key, value in ours.items() if not torch.equal(value, theirs[key])]
    for rank, (ours, theirs) in enumerate(
        zip(straight["rng_states"]["per_rank"], resumed["rng_states"]["per_rank"], strict=True)
    ):
        if not (torch.equal(ours["generator"], theirs["generator"]) and torch.equal(ours["torch"], theirs["torch"])):
            differences.append(f"rank {rank} random state")
    return differences


def test_a_process_crashing_mid_step_ends_the_run_and_process_0s_checkpoint_resumes_exactly(
    tiny_training_overrides, tmp_path
):
    """Rank 1 raises inside a training step; rank 0 is then waiting in that step's collectives. The run must end
    with the error (not hang in a save that only some processes reach), and rank 0's last.ckpt must hold the step
    before, with both ranks' random states, and resume to the uninterrupted run bit for bit."""
    run = overrides(tiny_training_overrides, max_steps=6)
    straight = load(run_train(run, tmp_path / "straight", timeout=300) / "checkpoints" / "last.ckpt")

    script = tmp_path / "crashing_train.py"
    script.write_text(CRASHING_SCRIPT.format(repo=str(REPO), step=CRASH_STEP))
    crashed = run_with_timeout([str(script), *run], tmp_path / "crashed", timeout=240, succeed=False)
    assert "rank 1 crashed inside its training step" in crashed.stdout + crashed.stderr
    (run_dir,) = (tmp_path / "crashed" / "runs").iterdir()
    stopped = load(run_dir / "checkpoints" / "last.ckpt")
    assert stopped["global_step"] == CRASH_STEP and len(stopped["rng_states"]["per_rank"]) == 2

    run_with_timeout([str(REPO / "train.py"), *run, "resume=last"], tmp_path / "crashed", timeout=300)
    assert training_state_differences(straight, load(run_dir / "checkpoints" / "last.ckpt")) == []


def test_slurm_time_limit_signal_saves_on_process_0_alone_requeues_and_the_requeued_job_resumes_exactly(
    tiny_training_overrides, tmp_path
):
    """SIGUSR1 to every process (as SLURM sends it): process 0 writes last.ckpt at a batch end without waiting on
    process 1 and calls `scontrol requeue <job id>`; the requeued job (same job id, SLURM_RESTART_COUNT=1, the same
    arguments) continues from that last.ckpt and ends where the uninterrupted run ended, bit for bit."""
    run = overrides(tiny_training_overrides, max_steps=8)
    job = tmp_path / "job"
    last = job / "runs" / "slurm-4242" / "checkpoints" / "last.ckpt"
    calls, kept = tmp_path / "scontrol-calls.txt", tmp_path / "requeued-last.ckpt"
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    scontrol = fake_bin / "scontrol"
    scontrol.write_text(FAKE_SCONTROL.format(python=sys.executable, calls=str(calls), last=str(last), kept=str(kept)))
    scontrol.chmod(0o755)
    slurm = {"SLURM_JOB_ID": "4242", "PATH": f"{fake_bin}{os.pathsep}{os.environ['PATH']}"}

    process = start_script([str(REPO / "train.py"), *run], job, env=slurm)
    deadline = time.monotonic() + 240
    while not last.is_file():  # step 2's checkpoint: training is under way, 6 steps to go
        assert process.poll() is None and time.monotonic() < deadline, "training did not reach step 2"
        time.sleep(0.1)
    os.killpg(process.pid, signal.SIGUSR1)  # both processes (the DDP rank Lightning launched is in the group)
    wait_for(process, timeout=240)  # nobody stopped the job: it ends normally, as the uninterrupted run
    assert calls.read_text().splitlines() == ["requeue 4242"]
    uninterrupted, at_requeue = load(last), load(kept)
    assert 2 <= at_requeue["global_step"] < 8 and len(at_requeue["rng_states"]["per_rank"]) == 2

    # The requeued job: SLURM stopped the first one right after the requeue, so its folder holds that last.ckpt.
    kept.replace(last)
    for later in (p for p in last.parent.glob("step*.ckpt") if int(p.stem[4:]) > at_requeue["global_step"]):
        later.unlink()
    requeued = run_with_timeout(
        [str(REPO / "train.py"), *run], job, timeout=300, env={**slurm, "SLURM_RESTART_COUNT": "1"}
    )
    assert f"[resume] requeued SLURM job: continuing from {last.relative_to(job)}" in requeued.stdout
    assert training_state_differences(uninterrupted, load(last)) == []
