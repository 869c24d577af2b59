"""The diffusion stage: fine-tune a latent diffusion model on (X-ray, report) pairs.

Which parts train is an explicit, recorded choice (``trainable`` ⊆ {unet, text_encoder, vae}): the paper's finding is
that training the text encoder buys fidelity at the cost of grounding. Frozen parts stay in eval mode, receive no
gradients, are absent from the optimizer and are not written into checkpoints (they come from their sources).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from diffusers import StableDiffusionPipeline
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from diffusers.optimization import get_constant_schedule_with_warmup
from diffusers.training_utils import EMAModel, compute_snr
from omegaconf import DictConfig

from datamodules.sampling import counted_mean
from lightning_modules.components import DiffusionParts, build_diffusion_parts, sampling_scheduler

PART_NAMES = ("unet", "text_encoder", "vae")


def drop_captions(captions: Sequence[str], probability: float, generator: torch.Generator | None = None) -> list[str]:
    """Classifier-free-guidance dropout: each caption independently becomes the empty prompt."""
    keep = torch.rand(len(captions), generator=generator) >= probability
    return [caption if kept else "" for caption, kept in zip(captions, keep.tolist(), strict=True)]


class LatentDiffusionModule(L.LightningModule):
    def __init__(
        self,
        parts: DiffusionParts,
        trainable: Sequence[str] = ("unet",),
        learning_rates: dict[str, float] | None = None,
        adam_weight_decay: float = 1e-2,
        adam_betas: tuple[float, float] = (0.9, 0.999),
        lr_warmup_steps: int = 0,
        ucg_probability: float = 0.3,
        snr_gamma: float | None = None,
        use_ema: bool = True,
        ema_decay: float = 0.9999,
        gradient_checkpointing: bool = False,
        text_feature_cache_size: int = 0,
    ) -> None:
        super().__init__()
        unknown = set(trainable) - set(PART_NAMES)
        if unknown or not trainable:
            raise ValueError(f"trainable must be a non-empty subset of {PART_NAMES}, got {list(trainable)}")
        self.unet, self.vae, self.text_encoder = parts.unet, parts.vae, parts.text_encoder
        self.tokenizer, self.noise_scheduler = parts.tokenizer, parts.noise_scheduler
        self.trainable = tuple(name for name in PART_NAMES if name in trainable)
        self.learning_rates = dict(learning_rates or {})
        missing_lr = [name for name in self.trainable if name not in self.learning_rates]
        if missing_lr:
            raise ValueError(f"no learning rate given for trainable part(s) {missing_lr}")
        self.adam_weight_decay, self.adam_betas = adam_weight_decay, tuple(adam_betas)
        self.lr_warmup_steps = lr_warmup_steps
        self.ucg_probability, self.snr_gamma = ucg_probability, snr_gamma
        for name in PART_NAMES:
            getattr(self, name).requires_grad_(name in self.trainable)
        if gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()
            if "text_encoder" in self.trainable:
                self.text_encoder.gradient_checkpointing_enable()
        self.ema = EMAModel(self.trainable_parameters(), decay=ema_decay) if use_ema else None
        # Frozen parts are rebuilt from their sources, so checkpoints hold only what trains.
        self.strict_loading = False
        self.skipped_samples = 0
        self._rng_states_to_restore: dict | None = None
        self.text_feature_cache_size = text_feature_cache_size
        self.text_feature_cache: OrderedDict[str, torch.Tensor] = OrderedDict()

    @classmethod
    def from_config(cls, cfg: DictConfig, vae_folder: Path | None = None) -> LatentDiffusionModule:
        """The one place where ``model`` and ``train`` config become a module (train.py and evaluation use it)."""
        train_cfg = cfg.train
        return cls(
            build_diffusion_parts(cfg.model, cfg.data.resolution, vae_folder=vae_folder),
            trainable=list(cfg.model.trainable),
            learning_rates=dict(train_cfg.learning_rate),
            adam_weight_decay=train_cfg.adam_weight_decay,
            adam_betas=(train_cfg.adam_beta1, train_cfg.adam_beta2),
            lr_warmup_steps=train_cfg.lr_warmup_steps,
            ucg_probability=train_cfg.ucg_probability,
            snr_gamma=train_cfg.snr_gamma,
            use_ema=train_cfg.use_ema,
            ema_decay=train_cfg.ema_decay,
            gradient_checkpointing=cfg.model.gradient_checkpointing,
            text_feature_cache_size=train_cfg.text_feature_cache_size,
        )

    # ----------------------------------------------------------------------------------------- parts & modes
    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for name in self.trainable for p in getattr(self, name).parameters()]

    def train(self, mode: bool = True) -> LatentDiffusionModule:
        """Lightning switches the whole module to train mode; frozen parts must stay in eval (dropout, norms)."""
        super().train(mode)
        for name in PART_NAMES:
            if name not in self.trainable:
                getattr(self, name).eval()
        return self

    # ----------------------------------------------------------------------------------------- encoders
    def _run_text_encoder(self, captions: Sequence[str]) -> torch.Tensor:
        tokens = self.tokenizer(
            list(captions),
            padding="max_length",
            truncation=True,
            max_length=self.tokenizer.model_max_length,
            return_tensors="pt",
        ).to(self.device)
        use_mask = getattr(self.text_encoder.config, "use_attention_mask", False)
        with torch.set_grad_enabled(self.training and "text_encoder" in self.trainable):
            output = self.text_encoder(tokens.input_ids, attention_mask=tokens.attention_mask if use_mask else None)
        return output[0]

    def encode_text(self, captions: Sequence[str]) -> torch.Tensor:
        """Text features; a frozen encoder's are cached per caption (most of a small model's step otherwise).

        Misses are encoded one caption at a time so a cached feature never depends on which batch filled it:
        a resumed run, whose cache starts empty, computes bit-identical features.
        """
        if self.text_feature_cache_size == 0 or "text_encoder" in self.trainable:
            return self._run_text_encoder(captions)
        cache, features = self.text_feature_cache, []
        for caption in captions:
            if caption in cache:
                cache.move_to_end(caption)
            else:
                cache[caption] = self._run_text_encoder([caption])[0].detach()
                if len(cache) > self.text_feature_cache_size:
                    cache.popitem(last=False)
            features.append(cache[caption])
        return torch.stack(features)

    def encode_images(self, pixel_values: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Scaled latents: a fresh sample of the VAE posterior, as latent diffusion trains."""
        with torch.set_grad_enabled(self.training and "vae" in self.trainable):
            posterior = self.vae.encode(pixel_values).latent_dist
            return posterior.sample(generator=generator) * self.vae.config.scaling_factor

    def batch_latents(self, batch: dict, generator: torch.Generator | None = None) -> torch.Tensor:
        """Scaled latents of a batch: sampled from its cached posterior (``latent_moments``) or encoded from pixels.

        The cached moments are the frozen VAE's own output, so both paths sample the same distribution with the
        same draws; train.py refuses cached latents from another VAE or a trainable one.
        """
        if "latent_moments" not in batch:
            return self.encode_images(batch["pixel_values"], generator)
        posterior = DiagonalGaussianDistribution(batch["latent_moments"].to(self.device, self.vae.dtype))
        return posterior.sample(generator=generator) * self.vae.config.scaling_factor

    # ----------------------------------------------------------------------------------------- objective
    def diffusion_loss(
        self,
        latents: torch.Tensor,
        captions: Sequence[str],
        generator: torch.Generator | None = None,
        sample_weights: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Noise-prediction (or v) MSE at a random timestep, optionally Min-SNR-γ weighted.

        ``sample_weights`` (the loader's ``loss_weight``) give zero weight to the repeats that even out the
        processes' shares of an epoch: the loss is the weighted mean over counted samples.
        """
        noise = torch.randn(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
        timesteps = torch.randint(
            0,
            self.noise_scheduler.config.num_train_timesteps,
            (latents.shape[0],),
            generator=generator,
            device=latents.device,
        )
        noisy_latents = self.noise_scheduler.add_noise(latents, noise, timesteps)
        text_features = self.encode_text(captions)
        prediction = self.unet(noisy_latents, timesteps, text_features).sample
        if self.noise_scheduler.config.prediction_type == "epsilon":
            target = noise
        else:
            target = self.noise_scheduler.get_velocity(latents, noise, timesteps)
        per_sample = F.mse_loss(prediction.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
        if self.snr_gamma is not None:
            snr = compute_snr(self.noise_scheduler, timesteps)
            weight = torch.clamp(snr, max=self.snr_gamma) / snr
            if self.noise_scheduler.config.prediction_type == "v_prediction":
                weight = torch.clamp(snr, max=self.snr_gamma) / (snr + 1)
            per_sample = per_sample * weight
        return counted_mean(per_sample, sample_weights)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor | None:
        self.skipped_samples += int(batch.get("num_skipped", 0))
        self.log("data/skipped_samples", float(self.skipped_samples), on_step=True, reduce_fx="sum")
        if len(batch["caption"]) == 0:
            return None  # every sample of this batch was unreadable; Lightning skips the step
        captions = drop_captions(batch["caption"], self.ucg_probability)
        loss = self.diffusion_loss(self.batch_latents(batch), captions, sample_weights=batch.get("loss_weight"))
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=False, batch_size=len(captions))
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        """Held-out loss with noise and timesteps fixed per batch, so curves are comparable across evaluations."""
        if len(batch["caption"]) == 0:
            return
        generator = torch.Generator(device=self.device).manual_seed(batch_idx)
        weights = batch.get("loss_weight")
        loss = self.diffusion_loss(self.batch_latents(batch, generator), batch["caption"], generator, weights)
        counted = len(batch["caption"]) if weights is None else int(weights.sum())
        # Weighted by counted samples (none for a batch of evening-out repeats): the exact mean over processes.
        self.log("val/loss", loss, prog_bar=True, sync_dist=True, batch_size=counted)

    # ----------------------------------------------------------------------------------------- optimisation
    def configure_optimizers(self):
        groups = [
            {
                "params": list(getattr(self, name).parameters()),
                "lr": float(self.learning_rates[name]),
                "name": name,
            }
            for name in self.trainable
        ]
        optimizer = torch.optim.AdamW(groups, betas=self.adam_betas, weight_decay=self.adam_weight_decay)
        scheduler = get_constant_schedule_with_warmup(optimizer, num_warmup_steps=self.lr_warmup_steps)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ----------------------------------------------------------------------------------------- EMA
    def on_fit_start(self) -> None:
        if self.ema is not None:
            self.ema.to(self.device)

    def on_train_start(self) -> None:
        """Lightning keeps each module's mode; parts loaded with from_pretrained arrive in eval mode."""
        self.train()
        if self._rng_states_to_restore is not None:  # after the sanity check, right before the first resumed step
            torch.set_rng_state(self._rng_states_to_restore["torch"])
            if "cuda" in self._rng_states_to_restore:
                torch.cuda.set_rng_state_all(self._rng_states_to_restore["cuda"])
            self._rng_states_to_restore = None

    def optimizer_step(self, *args, **kwargs) -> None:
        """EMA follows every optimizer step here, before callbacks (checkpointing) see the step's end."""
        super().optimizer_step(*args, **kwargs)
        if self.ema is not None:
            self.ema.step(self.trainable_parameters())

    def _swap_in_ema(self) -> None:
        if self.ema is not None:
            parameters = self.trainable_parameters()
            self.ema.store(parameters)
            self.ema.copy_to(parameters)

    def _restore_training_weights(self) -> None:
        if self.ema is not None:
            self.ema.restore(self.trainable_parameters())

    @contextmanager
    def ema_weights(self) -> Iterator[None]:
        """Swap the EMA weights in (for sampling, export) and restore the training weights after."""
        self._swap_in_ema()
        try:
            yield
        finally:
            self._restore_training_weights()

    def on_validation_epoch_start(self) -> None:
        self._swap_in_ema()

    def on_validation_epoch_end(self) -> None:
        self._restore_training_weights()

    # ----------------------------------------------------------------------------------------- checkpoints
    def state_dict(self, *args, **kwargs):
        """Only the trainable parts: frozen ones are rebuilt from their (pretrained or cached) sources."""
        full = super().state_dict(*args, **kwargs)
        prefix = kwargs.get("prefix", "")
        keep = tuple(f"{prefix}{name}." for name in self.trainable)
        return type(full)((key, value) for key, value in full.items() if key.startswith(keep))

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["trainable_parts"] = list(self.trainable)
        checkpoint["skipped_samples"] = self.skipped_samples
        # Timesteps, noise and caption dropout come from the global RNG: a resumed run must draw the same.
        checkpoint["rng_states"] = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            checkpoint["rng_states"]["cuda"] = torch.cuda.get_rng_state_all()
        if self.ema is not None:
            checkpoint["ema"] = self.ema.state_dict()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        saved = tuple(checkpoint.get("trainable_parts", ()))
        if saved != self.trainable:
            raise ValueError(
                f"checkpoint trained parts {list(saved)} but this run trains {list(self.trainable)}; "
                "set model.trainable to match the checkpoint"
            )
        self.skipped_samples = int(checkpoint.get("skipped_samples", 0))
        self._rng_states_to_restore = checkpoint.get("rng_states")
        if self.ema is not None and "ema" in checkpoint:
            self.ema.load_state_dict(checkpoint["ema"])

    # ----------------------------------------------------------------------------------------- sampling & export
    def pipeline(self) -> StableDiffusionPipeline:
        """The standard diffusers pipeline around these very modules (no copies), with DDIM sampling."""
        pipe = StableDiffusionPipeline(
            vae=self.vae,
            text_encoder=self.text_encoder,
            tokenizer=self.tokenizer,
            unet=self.unet,
            scheduler=sampling_scheduler(self.noise_scheduler),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
        pipe.set_progress_bar_config(disable=True)
        return pipe

    @torch.no_grad()
    def sample(
        self,
        prompts: Sequence[str],
        num_inference_steps: int = 50,
        guidance_scale: float = 4.0,
        seed: int = 0,
        resolution: int | None = None,
    ) -> torch.Tensor:
        """Images in [0, 1], (N, 3, H, W), generated with classifier-free guidance (and EMA weights if kept)."""
        size = resolution or self.unet.config.sample_size * 2 ** (len(self.vae.config.block_out_channels) - 1)
        was_training = self.training
        self.eval()
        try:
            with self.ema_weights():
                generator = torch.Generator(device="cpu").manual_seed(seed)
                images = self.pipeline()(
                    list(prompts),
                    height=size,
                    width=size,
                    num_inference_steps=num_inference_steps,
                    guidance_scale=guidance_scale,
                    generator=generator,
                    output_type="pt",
                ).images
        finally:
            self.train(was_training)
        return images.float().cpu()

    def export_pipeline(self, folder: str | Path) -> Path:
        """Write a StableDiffusionPipeline folder (EMA weights when kept) that diffusers loads back."""
        folder = Path(folder)
        with self.ema_weights():
            self.pipeline().save_pretrained(folder, safe_serialization=True)
        return folder
