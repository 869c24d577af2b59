"""train.checkpoints_total_limit: only the newest k step checkpoints stay (plus last.ckpt), across a resume too."""

import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import train
from callbacks.last_checkpoint import save_alone
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


def test_last_ckpt_holds_the_final_state_before_the_loggers_finish(tiny_training_overrides, tmp_path, monkeypatch):
    """A W&B finish that hangs until the job is killed: the kill lands after fit, inside finish_loggers. last.ckpt
    must already hold the final state (step 3, past the last step checkpoint at 2), bit for bit."""
    overrides = [*tiny_training_overrides, "trainer.max_steps=3"]
    finished = run(overrides, "train.checkpointing_steps=2", f"run_dir={tmp_path / 'finished'}")["run_dir"]

    def killed_while_finishing(loggers) -> None:
        raise KeyboardInterrupt("killed while W&B was finishing")

    monkeypatch.setattr(train, "finish_loggers", killed_while_finishing)
    with pytest.raises(KeyboardInterrupt):
        run(overrides, "train.checkpointing_steps=2", f"run_dir={tmp_path / 'killed'}")
    (killed,) = (tmp_path / "killed").iterdir()
    assert checkpoint_names(killed) == ["last.ckpt", "step000002.ckpt"]
    final, survived = (torch.load(run / "checkpoints" / "last.ckpt", weights_only=True) for run in (finished, killed))
    assert survived["global_step"] == final["global_step"] == 3
    for key in ("state_dict", "ema", "optimizer_states", "lr_schedulers", "rng_states", "loops"):
        assert same(survived[key], final[key]), key


def same(a, b) -> bool:
    """Equal bit for bit, through the nested dicts and lists of a checkpoint."""
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[key], b[key]) for key in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(map(same, a, b))
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    return a == b


def write_run(root: Path, name: str, started: float, last_written: float | None) -> Path:
    """A run folder as train.py leaves it: config.yaml written at its (last) start, maybe a last.ckpt."""
    folder = root / name
    (folder / "checkpoints").mkdir(parents=True)
    (folder / "config.yaml").write_text("seed: 42\n")
    os.utime(folder / "config.yaml", (started, started))
    if last_written is not None:
        (folder / "checkpoints" / "last.ckpt").write_bytes(b"checkpoint")
        os.utime(folder / "checkpoints" / "last.ckpt", (last_written, last_written))
    return folder


@pytest.fixture
def no_run_name(monkeypatch: pytest.MonkeyPatch) -> None:
    """make_run_dir names the run in the environment (for the processes Lightning spawns): undone after the test."""
    monkeypatch.setenv(train.RUN_NAME_VARIABLE, "unset")
    monkeypatch.delenv(train.RUN_NAME_VARIABLE)


def test_resume_last_never_silently_continues_another_run(tmp_path, no_run_name):
    """The newest run (started last) stopped before its first checkpoint; an older run has a last.ckpt."""
    older = write_run(tmp_path, "20250101-120000-000000", started=1_000, last_written=2_000)
    newer = write_run(tmp_path, "20250102-090000-000000", started=3_000, last_written=None)
    cfg = load_config([], [f"run_dir={tmp_path}", "resume=last"])
    with pytest.raises(FileNotFoundError) as error:
        train.make_run_dir(cfg)
    message = str(error.value)
    assert f"the newest run, {newer}" in message and str(older / "checkpoints" / "last.ckpt") in message
    assert train.RUN_NAME_VARIABLE not in os.environ


def test_resume_last_takes_the_newest_run_even_if_another_wrote_its_last_ckpt_later(tmp_path, no_run_name):
    """Run A still training in the background writes last.ckpt after run B (started later) stopped:
    resume=last continues B, the run started last, not whichever last.ckpt is newest."""
    write_run(tmp_path, "a", started=1_000, last_written=5_000)
    newer = write_run(tmp_path, "b", started=3_000, last_written=4_000)
    assert train.make_run_dir(load_config([], [f"run_dir={tmp_path}", "resume=last"])) == newer
    assert os.environ[train.RUN_NAME_VARIABLE] == "b"  # the processes Lightning spawns continue B too


def test_a_failed_resume_leaves_the_runs_last_ckpt_untouched(tiny_training_overrides):
    """A resume that fails while restoring (here: other trained parts) must not overwrite last.ckpt with the
    unrestored model, as an on-exception save did."""
    first = run(tiny_training_overrides, "trainer.max_steps=2")
    last = first["run_dir"] / "checkpoints" / "last.ckpt"
    before = last.read_bytes()
    with pytest.raises(ValueError, match="checkpoint trained parts"):
        run(tiny_training_overrides, "trainer.max_steps=4", "model.trainable=[unet,text_encoder]", "resume=last")
    assert last.read_bytes() == before


def test_a_write_interrupted_midway_leaves_the_previous_last_ckpt(tmp_path, monkeypatch):
    """The new state goes to a temporary file beside last.ckpt and is renamed over it only once complete."""
    last = tmp_path / "checkpoints" / "last.ckpt"
    state = {"global_step": 4, "loops": {"fit_loop": {"state_dict": {}}}}
    trainer = SimpleNamespace(
        is_global_zero=True, _checkpoint_connector=SimpleNamespace(dump_checkpoint=lambda **_: state)
    )
    save_alone(trainer, last)
    before = last.read_bytes()

    def killed_while_writing(checkpoint, handle) -> None:
        handle.write(b"half a checkpoint")
        raise KeyboardInterrupt("killed while writing")

    state["global_step"] = 6
    monkeypatch.setattr(torch, "save", killed_while_writing)
    with pytest.raises(KeyboardInterrupt):
        save_alone(trainer, last)
    assert last.read_bytes() == before
    assert torch.load(last, weights_only=True)["global_step"] == 4
