"""PixArt-Σ (Chen et al. 2024, arXiv 2403.04692): a diffusion transformer with separate cross-attention to T5 text.

Each block is a ``BasicTransformerBlock`` with self-attention (``attn1``) over the image patch tokens and
cross-attention (``attn2``) from patch tokens to text tokens: the paper's grounding question carries over, read from
``attn2`` as for the UNet (the patch grid is the latent grid downsampled by ``patch_size``).

Conditioning and sampling follow diffusers' ``PixArtSigmaPipeline``: prompts lower-cased and stripped
(``_text_preprocessing`` with ``clean_caption=False``), the padding mask passed to the text encoder and, as
``encoder_attention_mask``, to every cross-attention; no resolution/aspect-ratio conditions (the Σ pipeline passes
None); the learned-variance half of the output dropped before the sampler's step; DPM-Solver++ (2nd order), the
published Σ sampler. The objective is the reference training code's (PixArt-alpha/PixArt-sigma ``train_scripts/
train.py`` with ``IDDPM(learn_sigma=True)``): ``learned_variance.py``.

Deliberate differences from the reference training code: caption dropout (classifier-free guidance) replaces the
caption by the empty prompt, whose text features the pipeline's negative prompt also uses, instead of PixArt's
learned null embedding (``y_embedding``, which diffusers' converted checkpoints drop); and the text features come
from the prompt as the pipeline rewrites it (lower-cased), so a fine-tuned model is conditioned at training as the
exported pipeline conditions it at generation.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from diffusers import DPMSolverMultistepScheduler, PixArtSigmaPipeline, PixArtTransformer2DModel, SchedulerMixin
from omegaconf import DictConfig
from torch import nn

from lightning_modules.backbones import Backbone, NoisedBatch
from lightning_modules.backbones.learned_variance import learned_variance_loss

SIGMA_MAX_SEQUENCE_LENGTH = 300  # PixArtSigmaPipeline's max_sequence_length (Σ's T5 context; PixArt-α used 120)


class PixArtBackbone(Backbone):
    name = "pixart"
    part = "transformer"
    model_class = PixArtTransformer2DModel
    pipeline_class = PixArtSigmaPipeline
    always_masks_text = True
    pipeline_max_length = SIGMA_MAX_SEQUENCE_LENGTH
    text_width_key = "caption_channels"  # the caption projection's input

    def build(
        self, cfg: DictConfig, folder: Path | None, latent_size: int, latent_channels: int, text_width: int
    ) -> PixArtTransformer2DModel:
        """Load the transformer, or build one from ``model.pixart`` (PixArt-Σ's block, tiny widths allowed)."""
        if folder is not None:
            return self.load(folder, text_width)
        heads, head_width = int(cfg.num_attention_heads), int(cfg.attention_head_dim)
        return PixArtTransformer2DModel(
            num_attention_heads=heads,
            attention_head_dim=head_width,
            in_channels=latent_channels,
            out_channels=2 * latent_channels if cfg.learned_variance else latent_channels,
            num_layers=int(cfg.num_layers),
            cross_attention_dim=heads * head_width,
            caption_channels=text_width,
            sample_size=latent_size,
            patch_size=int(cfg.patch_size),
            use_additional_conditions=False,
        )

    def input_layer(self, denoiser: nn.Module) -> nn.Module:
        return denoiser.pos_embed.proj

    def forward(
        self,
        denoiser: nn.Module,
        noisy_latents: torch.Tensor,
        timesteps: torch.Tensor,
        text_features: torch.Tensor,
        text_mask: torch.Tensor | None,
    ) -> torch.Tensor:
        """PixArtSigmaPipeline's call: the text mask reaches every cross-attention."""
        return denoiser(
            noisy_latents,
            encoder_hidden_states=text_features,
            encoder_attention_mask=text_mask,
            timestep=timesteps,
            added_cond_kwargs={"resolution": None, "aspect_ratio": None},
        ).sample

    def per_sample_loss(
        self,
        output: torch.Tensor,
        target: torch.Tensor,
        noise_scheduler: SchedulerMixin,
        batch: NoisedBatch,
        snr_gamma: float | None,
    ) -> torch.Tensor:
        """A learned-variance output (2 × latent channels) trains as PixArt's reference does; a plain one by MSE."""
        if output.shape[1] == 2 * target.shape[1]:
            if noise_scheduler.config.prediction_type != "epsilon":
                raise ValueError("a learned-variance PixArt transformer predicts epsilon; set model.prediction_type")
            return learned_variance_loss(
                output,
                batch.noisy,
                batch.latents,
                batch.noise,
                batch.timesteps,
                noise_scheduler.betas,
                snr_gamma=snr_gamma,
            )
        return super().per_sample_loss(output, target, noise_scheduler, batch, snr_gamma)

    def sampling_scheduler(self, noise_scheduler: SchedulerMixin) -> DPMSolverMultistepScheduler:
        """DPM-Solver++ (2nd order) over the training schedule, PixArt-Σ's published sampler. ``variance_type``
        stays unset: the pipeline hands the sampler the noise half of a learned-variance output already."""
        return DPMSolverMultistepScheduler.from_config(
            noise_scheduler.config, algorithm_type="dpmsolver++", solver_order=2, variance_type=None
        )

    def pipeline(self, denoiser: nn.Module, parts: Any, scheduler: SchedulerMixin) -> PixArtSigmaPipeline:
        return PixArtSigmaPipeline(
            tokenizer=parts.tokenizer,
            text_encoder=parts.text_encoder,
            vae=parts.vae,
            transformer=denoiser,
            scheduler=scheduler,
        )

    def generation_arguments(self, tokenizer: Any) -> dict[str, Any]:
        """No caption cleaning (bs4/ftfy), no resolution binning (square training sizes), training's text length."""
        return {
            "clean_caption": False,
            "use_resolution_binning": False,
            "max_sequence_length": tokenizer.model_max_length,
        }

    def prepare_captions(self, captions: Sequence[str]) -> list[str]:
        """As ``PixArtSigmaPipeline._text_preprocessing(clean_caption=False)``: lower-cased and stripped."""
        return [caption.lower().strip() for caption in captions]
