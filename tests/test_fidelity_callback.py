"""FIDCallback inside a short real `train.main` run: its keys are logged on schedule and at the end."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import pytest

import train
from datamodules.synthetic import ensure_synthetic_dataset


@pytest.fixture(scope="module")
def held_out_root(tmp_path_factory) -> Path:
    """Large enough for a held-out split of a dozen images (the shared 40-study set has 3)."""
    return ensure_synthetic_dataset(tmp_path_factory.mktemp("fidelity-data"), n=120, resolution=48, seed=0)


def test_callback_logs_fid_agreement_and_diversity_every_n_steps_and_at_the_end(tiny_overrides, held_out_root):
    outputs = train.main(
        [
            *tiny_overrides,
            f"data.root={held_out_root}",
            "callbacks.grounding.enabled=false",
            "callbacks.attention_heatmaps.enabled=false",
            "callbacks.fidelity.enabled=true",
            "callbacks.fidelity.every_n_steps=2",
            "callbacks.fidelity.num_images=4",
            "fidelity.batch_size=2",
            "callbacks.fidelity.num_inference_steps=2",
            "fidelity.diversity.num_prompts=1",
            "fidelity.diversity.images_per_prompt=2",
            "fidelity.domain_classifier.resolution=32",
            "fidelity.domain_classifier.steps=5",
        ]
    )
    logged = pd.read_csv(outputs["metrics"])
    keys = ["fid/domain@4", "agreement/domain/auroc_mean", "diversity/ms_ssim"]
    assert set(keys) <= set(logged.columns)
    rows = logged.dropna(subset=["fid/domain@4"])
    assert rows["step"].tolist() == [2, 3]  # every 2 steps, then once at the end (max_steps=3), never twice
    for key in ("fid/domain@4", "diversity/ms_ssim"):
        assert all(math.isfinite(value) for value in rows[key])
    assert (rows["fid/domain@4"] > 0).all()
    assert rows["agreement/domain/auroc_mean"].between(0, 1).all()
