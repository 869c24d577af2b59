"""FIDCallback inside a short real `train.main` run: its keys are logged on schedule and at the end; the SD-2 preset's
extractors fail at start-up when their weights are missing."""

from __future__ import annotations

import math
import time
from pathlib import Path

import lightning as L
import pandas as pd
import pytest

import train
from callbacks.fidelity import FIDCallback
from configs import load_config
from datamodules.synthetic import ensure_synthetic_dataset
from metrics.feature_extractors import INCEPTION_WEIGHTS_URL, XRV_WEIGHTS_URL, MissingFeatureExtractorError

INCEPTION_FILE, XRV_FILE = INCEPTION_WEIGHTS_URL.rsplit("/", 1)[-1], XRV_WEIGHTS_URL.rsplit("/", 1)[-1]


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


def test_sd2_preset_asks_for_inception_and_xrv_and_stops_before_training_naming_the_files(
    tiny_overrides, held_out_root, tmp_path, monkeypatch
):
    """The paper's extractors are the SD-2 preset's default; without their weights the run stops at start-up
    (callback construction), never after training."""
    overrides = [*tiny_overrides, f"data.root={held_out_root}", "trainer.precision=32-true"]
    cfg = load_config(["experiment/stable_diffusion_2_base"], overrides)
    assert list(cfg.fidelity.extractors) == ["inception", "xrv"]
    assert cfg.fidelity.classifier == "xrv" and cfg.fidelity.autocast == "bf16"
    assert cfg.callbacks.fidelity.enabled

    def refuse_to_train(*args, **kwargs):
        raise AssertionError("training started although the FID extractors cannot be built")

    monkeypatch.setattr(L.Trainer, "fit", refuse_to_train)
    preset = ["--config", "experiment/stable_diffusion_2_base"]
    started = time.perf_counter()
    with pytest.raises(MissingFeatureExtractorError) as unset:
        train.main([*preset, *overrides])
    assert time.perf_counter() - started < 60
    assert "fidelity.inception_weights is not set" in str(unset.value)
    assert "fidelity.xrv_weights is not set" in str(unset.value)  # both gaps in one error

    inception, xrv = tmp_path / "models" / "inception.pth", tmp_path / "models" / "xrv.pt"
    weights = [f"fidelity.inception_weights={inception}", f"fidelity.xrv_weights={xrv}"]
    with pytest.raises(MissingFeatureExtractorError) as absent:
        FIDCallback.from_config(load_config(preset[1:], [*overrides, *weights]), held_out_root)
    message = str(absent.value)
    assert f"fidelity.inception_weights={inception} does not exist: place {INCEPTION_FILE} there" in message
    assert f"fidelity.xrv_weights={xrv} does not exist: place {XRV_FILE} there" in message
