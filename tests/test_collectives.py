"""Code that runs on one process of a DDP run never enters a collective (issue 11, section 0).

Process 0 of a real 2-process gloo group runs every rank-0-only path of training (FID reference with domain
classifier training from an empty cache, sample grid, attention heatmaps, pipeline export, W&B run id) with every
torch.distributed collective made to raise, while process 1 waits at a barrier as it does in training.
"""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import torch

from callbacks.attention_heatmaps import AttentionHeatmapCallback
from callbacks.export_pipeline import ExportPipelineCallback
from callbacks.sample_grid import SampleGridCallback
from configs import load_config
from datamodules.synthetic import ensure_synthetic_dataset
from lightning_modules.latent_diffusion import LatentDiffusionModule
from metrics.fidelity import FrechetDistance
from metrics.fidelity_evaluation import FidelityEvaluation
from tests.collectives import on_process_zero_of_two, run_forbidding_collectives
from train import wandb_run_id


def synced_fid() -> None:
    metric = FrechetDistance(2)
    metric.update(torch.randn(4, 2), real=True)
    metric.update(torch.randn(4, 2), real=False)
    metric.compute()


def fid_reference(cfg, root: Path) -> None:
    references = FidelityEvaluation(cfg, root, cfg.callbacks.fidelity.num_images).reference()
    assert references and all(
        reference.statistics.count >= 4 and math.isfinite(reference.real_halves_fid)
        for reference in references.values()
    )


def rank_zero_paths(overrides: list[str], root: str, out: str) -> dict[str, str]:
    cfg, root, out = load_config([], overrides), Path(root), Path(out)
    module = LatentDiffusionModule.from_config(cfg)
    trainer = SimpleNamespace(is_global_zero=True, global_step=0, loggers=[])
    samples = SampleGridCallback(["Moderate cardiomegaly."], out / "images", num_inference_steps=2)
    heatmaps = AttentionHeatmapCallback.from_config(cfg, root, out / "images")
    return run_forbidding_collectives(
        {
            "synced_fid": synced_fid,  # the guard's own check: a synced torchmetrics compute must be caught
            "fid_reference": lambda: fid_reference(cfg, root),
            "sample_grid": lambda: samples.run(trainer, module),
            "attention_heatmaps": lambda: heatmaps.run(trainer, module),
            "export_pipeline": lambda: ExportPipelineCallback(out / "pipeline").on_train_end(trainer, module),
            "wandb_run_id": lambda: wandb_run_id(out, "diffusion"),
        }
    )


def test_rank_zero_only_code_enters_no_collective(tiny_overrides, tmp_path):
    root = ensure_synthetic_dataset(tmp_path / "data", n=80, resolution=48, seed=0)  # 9 held-out images
    overrides = [*[o for o in tiny_overrides if not o.startswith("data.root")], f"data.root={root}"]
    outcomes = on_process_zero_of_two(rank_zero_paths, (overrides, str(root), str(tmp_path / "out")), tmp_path)

    assert "CollectiveInOneProcessCode" in outcomes.pop("synced_fid")  # the guard sees torchmetrics' sync
    assert outcomes == dict.fromkeys(outcomes, "ok"), "\n".join(f"{k}: {v}" for k, v in outcomes.items())
    assert (tmp_path / "out" / "pipeline" / "model_index.json").is_file()
    assert sorted(p.name.split("_step")[0] for p in (tmp_path / "out" / "images").iterdir()) == [
        "grounding_heatmaps",
        "samples",
    ]
