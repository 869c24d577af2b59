"""Load a trained model for evaluation: a run's Lightning checkpoint, or a diffusers pipeline folder."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
from omegaconf import DictConfig

from configs import load_config
from datamodules.cxr_datamodule import resolve_data_root
from lightning_modules.adapters import holds_adapters
from lightning_modules.autoencoder import vae_cache_folder
from lightning_modules.backbones import backbone_named
from lightning_modules.latent_diffusion import LatentDiffusionModule


def _pipeline_resolution(folder: Path, denoiser_part: str) -> int:
    """The image size a pipeline folder generates: its denoiser's latent ``sample_size`` through the VAE."""
    denoiser = json.loads((folder / denoiser_part / "config.json").read_text())
    vae = json.loads((folder / "vae" / "config.json").read_text())
    return int(denoiser["sample_size"]) * 2 ** (len(vae["block_out_channels"]) - 1)


def load_diffusion_module(
    source: str | Path, overrides: Sequence[str] = ()
) -> tuple[LatentDiffusionModule, DictConfig]:
    """The model in eval mode, holding one set of weights (the EMA's when the run kept them), and its config.

    A checkpoint is read with ``weights_only=True`` (no code runs on unpickling); its run's ``config.yaml``
    (two folders up, beside ``checkpoints/``) rebuilds the frozen parts from their sources.
    """
    source = Path(source)
    if source.is_dir():
        if not (source / "model_index.json").is_file():
            raise FileNotFoundError(f"'{source}' is a folder without model_index.json (not a diffusers pipeline)")
        if holds_adapters(source):  # export_lora's folder: its pipeline is the adapters' base
            raise ValueError(
                f"'{source}' holds LoRA weights beside their base pipeline; evaluate the merged pipeline (the "
                "run's pipeline/ folder) or the run's checkpoint instead"
            )
        denoiser_part = backbone_named(None, source).part
        cfg = load_config(
            [],
            [
                f"model.pretrained={source}",
                f"model.trainable=[{denoiser_part}]",  # evaluation trains nothing; the denoiser stands for "a part"
                "model.text_encoder.pretrained=null",
                # The folder's own padding mask and context, as diffusers' encode_prompt uses them
                # (lightning_modules.components._text_setting); overrides may only repeat them.
                "model.text_encoder.use_attention_mask=null",
                "model.text_encoder.max_length=null",
                "model.vae.pretrained=null",
                f"data.resolution={_pipeline_resolution(source, denoiser_part)}",
                "train.use_ema=false",
                *overrides,
            ],
        )
        module = LatentDiffusionModule.from_config(cfg)
    elif source.is_file():
        config_file = source.parent.parent / "config.yaml"
        if not config_file.is_file():
            raise FileNotFoundError(f"checkpoint '{source}' has no run config at {config_file}")
        cfg = load_config([config_file], overrides)
        vae_folder = vae_cache_folder(cfg, resolve_data_root(cfg.data)) if cfg.model.vae.pretrained == "auto" else None
        # Seeded as train.py seeds the build: randomly initialised frozen weights (a random VAE, the base of an
        # adapted part without pretrained weights) come out as the run's did.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            module = LatentDiffusionModule.from_config(cfg, vae_folder)
        checkpoint = torch.load(source, map_location="cpu", weights_only=True)
        missing, _ = module.load_state_dict(checkpoint["state_dict"], strict=False)
        checkpointed = set(module.state_dict())  # the trained weights (of an adapted part: its adapters)
        untrained = [key for key in missing if key in checkpointed]
        if untrained:
            raise ValueError(f"checkpoint '{source}' lacks weights of trained parts, e.g. {untrained[:3]}")
        module.on_load_checkpoint(checkpoint)
    else:
        raise FileNotFoundError(f"model source '{source}' does not exist (expected a .ckpt file or a diffusers folder)")
    return module.evaluation_only(), cfg
