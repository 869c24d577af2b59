"""train.checkpoints_total_limit: only the newest k step checkpoints stay (plus last.ckpt), across a resume too."""

from pathlib import Path

import pytest
import torch

import train
from configs import ConfigError, load_config


def checkpoint_names(run_dir: Path) -> list[str]:
    return sorted(path.name for path in (run_dir / "checkpoints").glob("*.ckpt"))


def run(overrides: list[str], *extra: str) -> dict[str, Path]:
    return train.main(
        [
            *overrides,
            "train.checkpointing_steps=1",
            "callbacks.sample_grid.every_n_steps=0",
            "callbacks.export_pipeline=false",
            *extra,
        ]
    )


def test_only_the_last_k_step_checkpoints_are_kept_and_resume_still_works(tiny_training_overrides):
    first = run(tiny_training_overrides, "train.checkpoints_total_limit=2", "trainer.max_steps=4")
    assert checkpoint_names(first["run_dir"]) == ["last.ckpt", "step000003.ckpt", "step000004.ckpt"]

    resumed = run(tiny_training_overrides, "train.checkpoints_total_limit=2", "trainer.max_steps=6", "resume=last")
    assert resumed["run_dir"] == first["run_dir"]
    # The callback's record of which files it wrote comes back with the checkpoint: the resumed run deletes the
    # first run's step 3 and 4 files as it writes steps 5 and 6.
    assert checkpoint_names(resumed["run_dir"]) == ["last.ckpt", "step000005.ckpt", "step000006.ckpt"]
    last = torch.load(resumed["checkpoint"], map_location="cpu", weights_only=True)
    assert last["global_step"] == 6
    step_six = torch.load(resumed["run_dir"] / "checkpoints" / "step000006.ckpt", map_location="cpu", weights_only=True)
    assert all(torch.equal(step_six["state_dict"][key], value) for key, value in last["state_dict"].items())


def test_no_limit_keeps_every_step_checkpoint(tiny_training_overrides):
    outputs = run(tiny_training_overrides, "train.checkpoints_total_limit=null", "trainer.max_steps=3")
    assert checkpoint_names(outputs["run_dir"]) == ["last.ckpt", *(f"step00000{step}.ckpt" for step in (1, 2, 3))]


@pytest.mark.parametrize("value", ["-1", "2.5", "true"])
def test_a_bad_limit_is_a_config_error(value):
    with pytest.raises(ConfigError, match="train.checkpoints_total_limit"):
        load_config([], [f"train.checkpoints_total_limit={value}"])
