"""A run survives interruption: SIGTERM or a crash at any moment leaves a checkpoint that resumes to the
uninterrupted run's weights and EMA bit for bit, and a checkpoint never unpickles code."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import train
from callbacks.fidelity import FIDCallback
from callbacks.grounding import GroundingCallback
from callbacks.sample_grid import SampleGridCallback
from lightning_modules.latent_diffusion import LatentDiffusionModule

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
    """The real signal from outside, to a train.py process."""
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

    def reached_step_4() -> bool:  # older step checkpoints are pruned (train.checkpoints_total_limit)
        return any(int(path.stem[4:]) >= 4 for path in (tmp_path / "runs").glob("*/checkpoints/step*.ckpt"))

    while not reached_step_4():
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


def send_sigterm_to_myself() -> None:
    """What a scheduler does, at a moment of the test's choosing (Lightning's handler only sets a flag)."""
    if signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, signal.SIG_IGN, None):
        pytest.fail("Lightning's SIGTERM handler is not installed: the signal would kill the test process")
    os.kill(os.getpid(), signal.SIGTERM)


class Crash(RuntimeError):
    """An error inside a training step, after it drew its noise and timesteps (a bad batch, a device error)."""


def crash_in_training_step(monkeypatch: pytest.MonkeyPatch, step: int) -> None:
    original = LatentDiffusionModule.diffusion_loss

    def drawn_then_crashed(self, *args, **kwargs):
        loss = original(self, *args, **kwargs)
        if self.trainer.training and self.global_step == step:  # not the validation loss
            raise Crash(f"crashed inside the training step at global step {step}")
        return loss

    monkeypatch.setattr(LatentDiffusionModule, "diffusion_loss", drawn_then_crashed)


def interrupt_at(monkeypatch: pytest.MonkeyPatch, moment: str, step: int) -> None:
    """Send SIGTERM once, at ``moment`` of global step ``step``: inside a training step, inside a validation
    (not its last batch), or inside an in-training evaluation (the sample grid, grounding, FID); or crash inside a
    training step (not a signal: an exception, after the step's random draws)."""
    if moment == "crash in a training step":
        crash_in_training_step(monkeypatch, step)
        return
    sent = []

    def wrap(cls, name: str, due) -> None:
        original = getattr(cls, name)

        def patched(self, *args, **kwargs):
            if not sent and due(self):
                sent.append(True)
                send_sigterm_to_myself()
            return original(self, *args, **kwargs)

        monkeypatch.setattr(cls, name, patched)

    if moment == "training step":
        wrap(LatentDiffusionModule, "training_step", lambda module: module.global_step == step)
    elif moment == "validation":
        wrap(
            LatentDiffusionModule,
            "validation_step",
            lambda module: module.global_step == step and not module.trainer.sanity_checking,
        )
    else:
        evaluation = {"sample grid": SampleGridCallback, "grounding": GroundingCallback, "FID": FIDCallback}[moment]
        wrap(evaluation, "run", lambda callback: True)


def final_state(run_dir: Path) -> dict:
    return torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)


def training_state_differences(straight: dict, resumed: dict) -> list[str]:
    """What differs between two final checkpoints: the step, any training weight, the EMA (bit for bit)."""
    differences = [] if resumed["global_step"] == straight["global_step"] else ["global_step"]
    for key, value in straight["state_dict"].items():
        if not torch.equal(value, resumed["state_dict"].get(key, torch.empty(0))):
            differences.append(f"weight {key}")
    for key, value in straight["ema"].items():
        other = resumed["ema"].get(key)
        if isinstance(value, dict):
            same = value.keys() == other.keys() and all(torch.equal(value[k], other[k]) for k in value)
        elif isinstance(value, list):
            same = len(value) == len(other) and all(torch.equal(a, b) for a, b in zip(value, other, strict=True))
        else:
            same = value == other
        if not same:
            differences.append(f"ema {key}")
    return differences


def interrupted_resume_differences(
    overrides: list[str],
    interruptions: list[tuple[str, int, int]],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    compare=training_state_differences,
) -> dict[str, list[str]]:
    """Train straight, then once per (moment, step, stop) interrupted there and resumed from its last.ckpt: per
    interruption, the first differences ``compare(straight, resumed)`` finds between the final states (none when
    the resume is exact). Checks that each interrupted run stopped at ``stop``, between validation batches for the
    "validation" moment."""
    straight = final_state(train.main([*overrides, f"run_dir={tmp_path / 'straight'}"])["run_dir"])
    differences = {}
    for moment, step, stop in interruptions:
        run_dir = [f"run_dir={tmp_path / moment.replace(' ', '-')}-{step}"]
        with monkeypatch.context() as patch:
            interrupt_at(patch, moment, step)
            expected = (
                (Crash, "crashed") if moment.startswith("crash") else (SystemExit, rf"\[interrupted\] at step {stop};")
            )
            with pytest.raises(expected[0], match=expected[1]):
                train.main([*overrides, *run_dir])
        (stopped,) = Path(run_dir[0].removeprefix("run_dir=")).glob("*/checkpoints/last.ckpt")
        stopped_state = torch.load(stopped, weights_only=True)
        assert stopped_state["global_step"] == stop
        if moment == "validation":  # really between validation batches: one of the two done
            val_progress = stopped_state["loops"]["fit_loop"]["epoch_loop.val_loop.batch_progress"]
            assert val_progress["current"]["completed"] == 1 and not val_progress["is_last_batch"]
        resumed = train.main([*overrides, *run_dir, "resume=last"])["run_dir"]
        differences[f"{moment} at step {step}"] = compare(straight, final_state(resumed))[:3]
    return differences


INTERRUPTIONS = [  # (moment, global step when SIGTERM arrives, step the run stops at)
    ("training step", 4, 5),  # a plain step
    ("validation", 2, 2),  # between validation batches, while the EMA weights are evaluated
    ("sample grid", 3, 3),  # inside in-training evaluations
    ("grounding", 3, 3),
    ("FID", 3, 3),
    ("crash in a training step", 4, 4),  # last.ckpt: the step before, with that step's random state
]


def test_sigterm_at_any_moment_resumes_to_the_straight_run_bit_for_bit(tiny_training_overrides, tmp_path, monkeypatch):
    overrides = [
        *tiny_training_overrides,
        "trainer.max_steps=6",
        "train.checkpointing_steps=100",  # resumes start from the interruption's last.ckpt only
        "trainer.val_check_interval=2",
        "trainer.limit_val_batches=2",
        "callbacks.sample_grid.every_n_steps=3",
        "callbacks.grounding.enabled=true",
        "callbacks.grounding.every_n_steps=3",
        "callbacks.grounding.num_items=2",
        "callbacks.grounding.num_inference_steps=2",
        "callbacks.grounding.last_k_steps=2",
        "callbacks.fidelity.enabled=true",
        "callbacks.fidelity.every_n_steps=3",
        "callbacks.fidelity.num_images=4",
        "fidelity.batch_size=2",
        "fidelity.diversity.num_prompts=1",
        "callbacks.export_pipeline=false",
        "train.ucg_probability=0.5",
        "train.ema_decay=0.9",  # the EMA moves visibly within 6 steps
        "train.learning_rate.unet=1e-3",
        "data.batch_size=2",  # the 3 validation images make 2 batches: a SIGTERM can fall between them
    ]
    differences = interrupted_resume_differences(overrides, INTERRUPTIONS, tmp_path, monkeypatch)
    assert differences == {moment: [] for moment in differences}
