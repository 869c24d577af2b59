"""train.py end to end on the tiny model: the run folder a user gets, skipped samples, the autoencoder stage, and a
console that says what matters."""

import csv
import json
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import train
from datamodules.mimic import build_mimic_index

REPO = Path(__file__).resolve().parents[1]


def metric_rows(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "diffusion" / "metrics.csv") as handle:
        return list(csv.DictReader(handle))


def test_train_script_leaves_checkpoint_config_metrics_samples_wandb_and_pipeline(tiny_overrides, tmp_path):
    overrides = [o for o in tiny_overrides if not o.startswith("logger.wandb")] + ["logger.wandb.mode=offline"]
    result = subprocess.run(
        [sys.executable, str(REPO / "train.py"), *overrides],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert "[done]" in result.stdout and str(run_dir) in result.stdout

    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert checkpoint["global_step"] == 3
    assert (run_dir / "checkpoints" / "step000002.ckpt").is_file()
    saved_config = (run_dir / "config.yaml").read_text()
    assert "max_steps: 3" in saved_config and "${" not in saved_config

    losses = [float(row["train/loss"]) for row in metric_rows(run_dir) if row.get("train/loss")]
    assert len(losses) == 3 and all(math.isfinite(loss) for loss in losses)
    rows = metric_rows(run_dir)
    assert any(row.get("val/loss") for row in rows)
    logged = {key for row in rows for key, value in row.items() if value}
    assert "grounding/paper_code/iou" in logged and any(key.startswith("fid/domain@") for key in logged)

    grids = sorted((run_dir / "images").glob("samples_step*.png"))
    assert [grid.name for grid in grids] == ["samples_step000002.png", "samples_step000003.png"]
    (wandb_run,) = (run_dir / "wandb").glob("offline-run-*")
    assert list(wandb_run.glob("*.wandb")), "the offline W&B run holds its history"
    assert list((wandb_run / "files" / "media" / "images").glob("samples_*.png"))
    assert (
        json.loads((run_dir / "pipeline" / "model_index.json").read_text())["_class_name"] == "StableDiffusionPipeline"
    )


def corrupted_copy(root: Path, destination: Path) -> tuple[Path, int]:
    """The dataset with one training image overwritten by garbage bytes."""
    shutil.copytree(root, destination)
    first = build_mimic_index(destination, split="train").samples["image_path"].iloc[0]
    Path(first).write_bytes(b"not a jpeg at all")
    return destination, 1


def test_an_unreadable_image_is_skipped_and_counted_not_fatal(tiny_training_overrides, synthetic_root, tmp_path):
    root, corrupted = corrupted_copy(synthetic_root, tmp_path / "data")
    overrides = [o for o in tiny_training_overrides if not o.startswith("data.root")]
    train.main(
        [
            *overrides,
            f"data.root={root}",
            "trainer.max_steps=10",
            "callbacks.sample_grid.every_n_steps=0",
            "callbacks.export_pipeline=false",
        ]
    )
    (run_dir,) = (tmp_path / "runs").iterdir()
    skipped = [float(row["data/skipped_samples"]) for row in metric_rows(run_dir) if row.get("data/skipped_samples")]
    assert skipped[-1] == corrupted  # the 10 steps of batch 4 pass every one of the 34 training images once


@pytest.mark.parametrize("stage", ["autoencoder"])
def test_autoencoder_stage_learns_reconstruction_and_is_cached_for_the_diffusion_stage(
    tiny_training_overrides, tmp_path, stage, capsys
):
    overrides = [o for o in tiny_training_overrides if not o.startswith("model.vae.pretrained")] + [
        "model.vae.pretrained=auto",
        "model.vae.block_out_channels=[16,16,16]",
        "autoencoder.max_steps=300",
        "autoencoder.batch_size=8",
        "autoencoder.learning_rate=2e-3",
        "autoencoder.val_batches=1",
    ]
    train.main([*overrides, f"stage={stage}"])
    (cached,) = (tmp_path / "cache" / "vae").iterdir()
    report = json.loads((cached / "training.json").read_text())
    assert report["val_reconstruction_mse_after"] < 0.5 * report["val_reconstruction_mse_before"]
    assert report["latent_scaling_factor"] > 0
    assert json.loads((cached / "config.json").read_text())["scaling_factor"] == report["latent_scaling_factor"]
    first_run = next((tmp_path / "runs").iterdir())
    assert list((first_run / "images").glob("autoencoder_reconstructions_step*.png"))

    capsys.readouterr()
    outputs = train.main([*overrides, "stage=all", "callbacks.export_pipeline=false"])
    assert "reusing the VAE trained on this data" in capsys.readouterr().out
    assert (cached / "training.json").read_text() == json.dumps(report, indent=2)
    assert outputs["checkpoint"].is_file()


# Dependency messages that say nothing about a run (configs/process_defaults.py), Lightning's summary table whose FLOPs
# read 0 and whose eval-mode count reads like a fault, and W&B's deprecation of an argument Lightning passes.
NOISE = [
    "Total FLOPs",
    "module(s) in eval mode at the start of training",
    "isinstance(treespec, LeafSpec)",
    "'set_vital' is deprecated",
    "requires torchvision (not installed)",
    "The anonymous setting has no effect",
    "litlogger",
]


def test_a_newcomers_console_shows_each_stage_in_one_line_and_no_dependency_noise(tiny_overrides, tmp_path):
    overrides = [o for o in tiny_overrides if not o.startswith(("logger.wandb", "model.vae.pretrained"))]
    overrides += ["logger.wandb.mode=offline", "model.vae.pretrained=auto", "model.vae.block_out_channels=[16,16,16]"]
    overrides += ["autoencoder.max_steps=2", "autoencoder.batch_size=4", "autoencoder.val_batches=1"]
    result = subprocess.run(
        [sys.executable, str(REPO / "train.py"), *overrides], cwd=tmp_path, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    console = result.stdout + result.stderr
    assert [line for line in console.splitlines() if any(noise in line for noise in NOISE)] == []
    assert "[autoencoder] parts: vae 75.5 K trained (train mode)" in console
    assert (
        "[diffusion] parts: unet 203 K trained (train mode); vae 75.5 K frozen (eval mode); text_encoder 19.2 K frozen "
        "(eval mode); ema 203 K frozen (eval mode); the frozen ones are in eval mode on purpose" in console
    )
    assert "[autoencoder] held-out reconstruction MSE" in console and "[done]" in result.stdout
    assert re.search(r"^\[openmp\] (GOMP_SPINCOUNT|OMP_WAIT_POLICY)=\w+ \(", result.stdout, re.M)  # said, with why
    # Where each stage's time went, in one line each, and Lightning's per-hook tables in the run folder.
    assert re.search(r"^\[autoencoder\] time: .*training steps \d+ s \(2 x [0-9.]+ s\)", console, re.M)
    fit_time = re.search(r"^\[diffusion\] time in fit: (.+)$", console, re.M)
    assert fit_time and "training steps" in fit_time.group(1) and "(3 x " in fit_time.group(1)
    assert all(part in fit_time.group(1) for part in ("FIDCallback", "GroundingCallback", "SampleGridCallback"))
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert {path.name for path in (run_dir / "profiles").iterdir()} >= {"fit-autoencoder.txt", "fit-diffusion.txt"}

    # The filters match those messages only: the same categories with other texts still show.
    probe = (
        "import configs.process_defaults, warnings\n"
        "warnings.warn('`isinstance(treespec, LeafSpec)` is deprecated', FutureWarning)\n"
        "warnings.warn('a future change that matters', FutureWarning)\n"
        "warnings.warn('Found 3 module(s) in eval mode at the start of training', UserWarning)\n"
        "warnings.warn('a user warning that matters', UserWarning)\n"
    )
    shown = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=60).stderr
    assert "a future change that matters" in shown and "a user warning that matters" in shown
    assert "LeafSpec" not in shown and "eval mode" not in shown
