"""The UNet of latent diffusion (Rombach et al. 2022) as Stable Diffusion ships it: the paper's backbone.

Follows diffusers' ``StableDiffusionPipeline`` (conditioning and sampling) and ``examples/text_to_image/
train_text_to_image.py`` (the objective: noise or velocity MSE, optionally Min-SNR-γ weighted). The cross-attention
sees no padding mask, as in Stable Diffusion; DDIM samples, as in the paper (Dombrowski et al. 2023).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from diffusers import DDIMScheduler, SchedulerMixin, StableDiffusionPipeline, UNet2DConditionModel
from omegaconf import DictConfig
from torch import nn

from lightning_modules.backbones import Backbone
from lightning_modules.components import sampling_scheduler


class UNetBackbone(Backbone):
    name = "unet"
    part = "unet"
    model_class = UNet2DConditionModel
    pipeline_class = StableDiffusionPipeline
    text_width_key = "cross_attention_dim"

    def build(
        self, cfg: DictConfig, folder: Path | None, latent_size: int, latent_channels: int, text_width: int
    ) -> UNet2DConditionModel:
        """Load a UNet, or build one (``model.unet``) whose cross-attention width is the text encoder's."""
        if folder is not None:
            return self.load(folder, text_width)
        channels = list(cfg.block_out_channels)
        return UNet2DConditionModel(
            sample_size=latent_size,
            in_channels=latent_channels,
            out_channels=latent_channels,
            down_block_types=tuple(cfg.down_block_types),
            up_block_types=tuple(cfg.up_block_types),
            block_out_channels=tuple(channels),
            layers_per_block=int(cfg.layers_per_block),
            attention_head_dim=int(cfg.attention_head_dim),
            cross_attention_dim=text_width,
            norm_num_groups=min(32, channels[0]),
        )

    def input_layer(self, denoiser: nn.Module) -> nn.Module:
        return denoiser.conv_in

    def forward(
        self,
        denoiser: nn.Module,
        noisy_latents: torch.Tensor,
        timesteps: torch.Tensor,
        text_features: torch.Tensor,
        text_mask: torch.Tensor | None,
    ) -> torch.Tensor:
        """Stable Diffusion's call: no text mask reaches the cross-attention (``text_mask`` is unused)."""
        return denoiser(noisy_latents, timesteps, encoder_hidden_states=text_features).sample

    def sampling_scheduler(self, noise_scheduler: SchedulerMixin) -> DDIMScheduler:
        return sampling_scheduler(noise_scheduler)

    def pipeline(self, denoiser: nn.Module, parts: Any, scheduler: SchedulerMixin) -> StableDiffusionPipeline:
        return StableDiffusionPipeline(
            vae=parts.vae,
            text_encoder=parts.text_encoder,
            tokenizer=parts.tokenizer,
            unet=denoiser,
            scheduler=scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
