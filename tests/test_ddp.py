"""Two CPU processes (DDP over gloo) with the grounding and FID callbacks: no hang, same metrics, files written once."""

import csv
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from safetensors.torch import load_file

from callbacks.data_report import DATA_REPORT_FILE
from configs import ConfigError, load_config
from datamodules.synthetic import ensure_synthetic_dataset
from metrics.fidelity_evaluation import held_out_selection
from train import build_datamodule, trainer_for

REPO = Path(__file__).resolve().parents[1]
DDP = ["trainer.accelerator=cpu", "trainer.devices=2", "trainer.strategy=ddp"]


def start_script(arguments: list[str], cwd: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    """A Python script in a subprocess of its own process group (the DDP ranks Lightning launches join it), with
    ``env`` added to this process's environment."""
    cwd.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}  # two processes on two cores
    env.pop("CXR_DIFFUSION_RUN_NAME", None)
    return subprocess.Popen(
        [sys.executable, *arguments],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def wait_for(process: subprocess.Popen, timeout: float, succeed: bool = True) -> subprocess.CompletedProcess:
    """Its outcome; past ``timeout`` seconds the whole process group is killed and the test fails: a hang is an
    error, never a blocked CI job. ``succeed``: whether it must exit 0 (else it must fail)."""
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        pytest.fail(f"{process.args[1]} did not finish in {timeout} s (a hang?)\n{stdout[-2000:]}{stderr[-4000:]}")
    assert (process.returncode == 0) == succeed, stdout[-2000:] + stderr[-4000:]
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def run_with_timeout(
    arguments: list[str], cwd: Path, timeout: float, env: dict[str, str] | None = None, succeed: bool = True
) -> subprocess.CompletedProcess:
    """``start_script`` then ``wait_for``."""
    return wait_for(start_script(arguments, cwd, env), timeout, succeed)


def run_train(overrides: list[str], cwd: Path, timeout: float = 600) -> Path:
    """train.py in a subprocess with a timeout (``run_with_timeout``); returns its run folder."""
    run_with_timeout([str(REPO / "train.py"), *overrides], cwd, timeout)
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
    assert "grounding/paper_code/iou" in single and any(key.startswith("fid/") for key in single)
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


def test_first_two_process_run_on_new_data_sets_up_without_a_hang(tiny_overrides, tmp_path):
    """An empty cache and the default in-training M: process 0 trains and caches the VAE, trains the domain
    classifier and computes the FID reference (with its half-vs-half FID) while process 1 waits. None of that may
    enter a collective, or the two processes wait on each other forever (issue 11, section 0)."""
    root = ensure_synthetic_dataset(tmp_path / "data", n=80, resolution=48, seed=0)  # 9 held-out images: M/2 = 4
    overrides = [
        *[o for o in tiny_overrides if not o.startswith(("data.root", "model.vae.pretrained", "logger.wandb"))],
        f"data.root={root}",
        "model.vae.pretrained=auto",  # the autoencoder stage runs first, from the empty cache
        "autoencoder.max_steps=2",
        "autoencoder.batch_size=4",
        "autoencoder.val_batches=1",
        "trainer.max_steps=2",
        "callbacks.fidelity.every_n_steps=0",  # the default M (callbacks.fidelity.num_images=32), at the end
        "callbacks.grounding.every_n_steps=0",
        "callbacks.grounding.num_items=4",
        "callbacks.attention_heatmaps.every_n_steps=0",
        "callbacks.attention_heatmaps.num_items=2",
        "logger.wandb.mode=offline",
        "run_dir=runs",
        *DDP,
    ]
    cfg = load_config([], overrides)
    assert cfg.callbacks.fidelity.num_images == load_config([], []).callbacks.fidelity.num_images
    assert len(held_out_selection(cfg, root, cfg.callbacks.fidelity.num_images)) // 2 >= 2

    run_dir = run_train(overrides, tmp_path / "run", timeout=120)

    (reference,) = (Path(cfg.data.cache_dir) / "fid_reference").glob("*.pt")
    assert math.isfinite(torch.load(reference, weights_only=True)["real_halves_fid"])  # frechet_distance ran
    with open(run_dir / "diffusion" / "metrics.csv") as handle:
        logged = {key for row in csv.DictReader(handle) for key, value in row.items() if value}
    assert "fid/domain@9" in logged and "grounding/paper_code/iou" in logged
    assert (run_dir / "pipeline" / "model_index.json").is_file()


def ddp_training_overrides(tiny_training_overrides: list[str], *extra: str) -> list[str]:
    kept = [o for o in tiny_training_overrides if not o.startswith(("run_dir", "trainer.max_steps"))]
    return [*kept, "run_dir=runs", "trainer.max_steps=2", "callbacks.sample_grid.every_n_steps=0", *DDP, *extra]


def trained_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert checkpoint["global_step"] == 2
    return checkpoint["state_dict"]


@pytest.mark.parametrize(
    ("trainable", "part", "unused"),
    [("[unet,text_encoder]", "text_encoder", "pooler."), ("[unet,vae]", "vae", ("decoder.", "post_quant_conv."))],
)
def test_two_processes_train_a_bert_text_encoder_or_the_vae(
    tiny_training_overrides, tiny_bert_dir, tiny_model_dir, tmp_path, trainable, part, unused
):
    """DDP stops at the first step if a trained parameter gets no gradient (BERT's pooler, the VAE's decoder);
    those are left out of training, the rest of the part trains (issue 11, section 2)."""
    overrides = ddp_training_overrides(
        tiny_training_overrides,
        f"model.trainable={trainable}",
        f"model.text_encoder.pretrained={tiny_bert_dir}",
        "model.text_encoder.use_attention_mask=true",
    )
    weights = trained_weights(run_train(overrides, tmp_path, timeout=120))

    source = tiny_bert_dir / "model.safetensors" if part == "text_encoder" else tiny_model_dir / "vae"
    initial = load_file(source if source.suffix else source / "diffusion_pytorch_model.safetensors")
    changed = {name: not torch.equal(weights[f"{part}.{name}"], value) for name, value in initial.items()}
    assert changed and all(not moved for name, moved in changed.items() if name.startswith(unused))
    assert all(moved for name, moved in changed.items() if name.endswith(".weight") and not name.startswith(unused))


def test_a_process_whose_batch_is_all_unreadable_still_takes_the_step(
    tiny_training_overrides, synthetic_root, tmp_path
):
    """Process 1's first batch holds only corrupt JPEGs while process 0's is fine: both take every step, and the
    run finishes instead of process 0 waiting forever in the gradient all-reduce (issue 11, section 4)."""
    root = tmp_path / "data"
    shutil.copytree(synthetic_root, root)
    overrides = ddp_training_overrides(tiny_training_overrides, f"data.root={root}")
    datamodule = build_datamodule(load_config([], overrides), root, batch_size=4)
    first_batches = [next(iter(datamodule.train_loader(world_size=2, rank=rank))) for rank in (0, 1)]
    corrupt = set(first_batches[1]["dicom_id"])
    assert len(corrupt) == 4 and not corrupt & set(first_batches[0]["dicom_id"])
    for image in root.rglob("*.jpg"):
        if image.stem in corrupt:
            image.write_bytes(b"not a JPEG")

    run_dir = run_train(overrides, tmp_path / "run", timeout=120)

    trained_weights(run_dir)  # two steps on both processes
    report = json.loads((run_dir / DATA_REPORT_FILE).read_text())
    assert {sample_id for sample_id, _ in report["training_loader"]["samples"]} == corrupt


def test_every_trainer_preset_runs_a_strategy_these_tests_run():
    """No untested presets: the two-process tests run DDP exactly as trainer/cpu_ddp sets it (FSDP was removed:
    Lightning refuses it without CUDA, so it could not be tested here; see docs/clusters.md)."""
    presets = sorted(path.stem for path in (REPO / "configs" / "trainer").glob("*.yaml"))
    assert presets == ["cpu_ddp", "ddp", "gpu"]
    assert {load_config([f"trainer/{name}"]).trainer.strategy for name in presets} <= {"ddp", "auto"}
    cpu_ddp = load_config(["trainer/cpu_ddp"]).trainer
    assert [f"trainer.{key}={cpu_ddp[key]}" for key in ("accelerator", "devices", "strategy")] == DDP
