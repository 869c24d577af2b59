"""Training from the shards' cached VAE posteriors: the same loss as encoding on the fly, the encoder never runs,
and stale latents (a trainable VAE, another VAE) are refused."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL
from omegaconf import OmegaConf

from configs import ConfigError, load_config
from datamodules.cxr_datamodule import CxrDataModule
from datamodules.prepare import prepare
from lightning_modules.latent_diffusion import LatentDiffusionModule
from train import main, uses_cached_latents


@pytest.fixture
def latent_shards(tiny_overrides: list[str], tmp_path: Path) -> Path:
    out = tmp_path / "latent-shards"
    summaries = prepare(load_config([], tiny_overrides), out, with_latents=True, samples_per_shard=8)
    assert summaries["train"]["latents"]["shape"] == [8, 8, 8]  # mean + log-variance of 4 channels at 32 / 4
    return out


def shard_overrides(tiny_overrides: list[str], shards: Path, *extra: str) -> list[str]:
    return [*tiny_overrides, "data.format=shards", f"data.shards={shards}", *extra]


def first_val_batch(datamodule: CxrDataModule) -> dict:
    datamodule.setup()
    return next(iter(datamodule.val_dataloader()))


def test_cached_latents_give_the_loss_of_encoding_on_the_fly(tiny_overrides, latent_shards, monkeypatch):
    cfg = load_config([], shard_overrides(tiny_overrides, latent_shards))
    module = LatentDiffusionModule.from_config(cfg)
    assert uses_cached_latents(cfg, module)
    common = {"batch_size": 3, "tokenizer": module.tokenizer, "val_split": "validate"}
    from_pixels = first_val_batch(CxrDataModule(cfg.data.root, cfg.data.resolution, **common))
    cache_dir = Path(cfg.data.cache_dir) / "shards"
    from_cache = first_val_batch(
        CxrDataModule(
            None, 32, data_format="shards", shards=latent_shards, shard_cache_dir=cache_dir, read_latents=True, **common
        )
    )
    assert from_cache["dicom_id"] == from_pixels["dicom_id"]
    assert "pixel_values" not in from_cache  # no PNG is decoded when training from latents

    def loss(batch: dict) -> torch.Tensor:
        generator = torch.Generator().manual_seed(7)
        with torch.no_grad():
            return module.diffusion_loss(module.batch_latents(batch, generator), batch["caption"], generator)

    on_the_fly = loss(from_pixels)
    monkeypatch.setattr(module.vae, "encode", lambda *a, **k: pytest.fail("the VAE encoder ran"))
    assert torch.allclose(loss(from_cache), on_the_fly, rtol=1e-5, atol=1e-7)


def test_stale_latents_are_refused(tiny_overrides, latent_shards):
    cfg = load_config([], shard_overrides(tiny_overrides, latent_shards, "model.trainable=[unet,vae]"))
    with pytest.raises(ConfigError, match="model.trainable includes vae"):
        uses_cached_latents(cfg, LatentDiffusionModule.from_config(cfg))
    assert not uses_cached_latents(OmegaConf.merge(cfg, {"data": {"use_cached_latents": False}}), None)

    cfg = load_config([], shard_overrides(tiny_overrides, latent_shards))
    module = LatentDiffusionModule.from_config(cfg)
    with torch.no_grad():
        next(module.vae.parameters()).add_(1e-3)  # another VAE: the stored posteriors are not its own
    with pytest.raises(ConfigError, match="latents of another VAE"):
        uses_cached_latents(cfg, module)


def test_training_on_cached_latents_never_runs_the_encoder(tiny_training_overrides, latent_shards, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the VAE encoder ran during training on cached latents")

    monkeypatch.setattr(AutoencoderKL, "encode", refuse)
    outputs = main(shard_overrides(tiny_training_overrides, latent_shards))
    checkpoint = torch.load(outputs["checkpoint"], map_location="cpu", weights_only=True)
    assert checkpoint["global_step"] == 3
    losses = Path(outputs["metrics"]).read_text()
    assert "train/loss" in losses and "nan" not in losses.lower()
