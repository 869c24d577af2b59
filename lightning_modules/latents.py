"""Image latents of the diffusion module: VAE posterior samples, encoded from pixels or read from the cache.

A mixin of ``LatentDiffusionModule`` (it reads the module's VAE, training flag and evaluation parts).
"""

from __future__ import annotations

import torch
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution


class ImageLatents:
    """Scaled latents for the objective and validation (see the module docstring)."""

    def encode_images(
        self, pixel_values: torch.Tensor, generator: torch.Generator | None = None, evaluation: bool = False
    ) -> torch.Tensor:
        """Scaled latents: a fresh float32 sample of the VAE posterior, as latent diffusion trains
        (``evaluation``: with the evaluation VAE)."""
        vae = self.evaluation_parts().vae if evaluation else self.vae
        with torch.set_grad_enabled(self.training and "vae" in self.trainable):
            moments = vae.encode(pixel_values).latent_dist.parameters
            return self._sample_posterior(moments, generator)

    def _sample_posterior(self, moments: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """In float32 whatever the VAE's dtype or autocast: the sample is the clean input of forward noising."""
        posterior = DiagonalGaussianDistribution(moments.float())
        return posterior.sample(generator=generator) * self.vae.config.scaling_factor

    def batch_latents(
        self, batch: dict, generator: torch.Generator | None = None, evaluation: bool = False
    ) -> torch.Tensor:
        """Scaled latents of a batch: sampled from its cached posterior (``latent_moments``) or encoded from pixels.

        The cached moments are the frozen VAE's own output, so both paths sample the same distribution with the
        same draws; train.py refuses cached latents from another VAE or a trainable one.
        """
        if "latent_moments" not in batch:
            return self.encode_images(batch["pixel_values"], generator, evaluation)
        return self._sample_posterior(batch["latent_moments"].to(self.device), generator)
