"""The autoencoder stage: train a KL-regularised VAE on the images alone, as latent diffusion does.

A randomly initialised VAE has no usable latent space, so the embedded default trains a small one on the same data
before the diffusion stage (``train.py`` caches it by data fingerprint). Perceptual and adversarial terms are left
out: their networks need pretrained weights that do not exist offline.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from omegaconf import DictConfig, OmegaConf
from torchmetrics import MeanMetric

from datamodules.cxr_datamodule import dataset_fingerprint
from lightning_modules.loss_weighting import counted_mean


class AutoencoderModule(L.LightningModule):
    def __init__(
        self,
        vae: AutoencoderKL,
        learning_rate: float = 1e-3,
        kl_weight: float = 1e-6,
        reconstruction_loss: str = "l1",
    ) -> None:
        super().__init__()
        if reconstruction_loss not in ("l1", "l2"):
            raise ValueError(f"autoencoder.reconstruction_loss must be l1 or l2, got '{reconstruction_loss}'")
        self.vae = vae
        self.learning_rate, self.kl_weight = learning_rate, kl_weight
        self.reconstruction_loss = F.l1_loss if reconstruction_loss == "l1" else F.mse_loss
        self.val_mse = MeanMetric()
        self.last_val_batch: tuple[torch.Tensor, torch.Tensor] | None = None

    def reconstruct(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Deterministic reconstruction through the posterior mode, in [-1, 1]."""
        return self.vae.decode(self.vae.encode(pixel_values).latent_dist.mode()).sample.clamp(-1, 1)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor | None:
        images = batch["pixel_values"]
        if len(images) == 0:
            return None
        posterior = self.vae.encode(images).latent_dist
        reconstruction = self.vae.decode(posterior.sample()).sample
        per_image = self.reconstruction_loss(reconstruction, images, reduction="none").mean(dim=(1, 2, 3))
        weights = batch.get("loss_weight")  # evening-out repeats of a multi-process epoch weigh 0
        rec_loss, kl = counted_mean(per_image, weights), counted_mean(posterior.kl(), weights)
        loss = rec_loss + self.kl_weight * kl
        self.log_dict({"autoencoder/loss": loss, "autoencoder/kl": kl}, prog_bar=True, batch_size=len(images))
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        images = batch["pixel_values"]
        if len(images) == 0:
            return
        reconstruction = self.reconstruct(images)
        per_image = F.mse_loss(reconstruction, images, reduction="none").mean(dim=(1, 2, 3))
        self.val_mse.update(per_image, weight=batch.get("loss_weight", 1.0))
        if batch_idx == 0:
            self.last_val_batch = (images[:8].cpu(), reconstruction[:8].cpu())

    def on_validation_epoch_end(self) -> None:
        self.log("autoencoder/val_reconstruction_mse", self.val_mse.compute(), prog_bar=True, sync_dist=False)
        self.val_mse.reset()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.vae.parameters(), lr=self.learning_rate)

    @torch.no_grad()
    def latent_scaling_factor(self, batches) -> float:
        """1 / std of posterior samples over some training batches: unit-variance latents for the diffusion stage."""
        samples = [self.vae.encode(b["pixel_values"].to(self.device)).latent_dist.sample() for b in batches]
        return float(1.0 / torch.cat(samples).flatten().std())


def vae_cache_folder(cfg: DictConfig, root: Path) -> Path:
    """Where the autoencoder stage's VAE for this data, resolution, architecture and recipe lives."""
    key = json.dumps(
        {
            "data": dataset_fingerprint(root),
            "resolution": cfg.data.resolution,
            "views": list(cfg.data.views),
            "split": cfg.data.splits.train,
            "vae": OmegaConf.to_container(cfg.model.vae, resolve=True),
            "recipe": OmegaConf.to_container(cfg.autoencoder, resolve=True),
            "seed": cfg.seed,
        },
        sort_keys=True,
    )
    return Path(cfg.data.cache_dir) / "vae" / hashlib.sha256(key.encode()).hexdigest()[:16]
