"""The diffusion stage: fine-tune a latent diffusion model on (X-ray, report) pairs.

The denoiser is the backbone's (``backbones/``: the paper's UNet, or a PixArt-Σ transformer), kept under its own part
name (``module.unet``, ``module.transformer``). Which parts train is an explicit, recorded choice (``trainable`` ⊆
{denoiser, text_encoder, vae}): the paper's finding is that training the text encoder buys fidelity at the cost of
grounding. Frozen parts stay in eval mode, receive no gradients, are absent from the optimizer and are not written
into checkpoints (they come from their sources). A part may instead train through LoRA adapters (``adapters``, see
``adapters.py``): it then counts as trained (train mode, EMA, optimizer group, no feature cache) but only its
adapter weights train and are checkpointed.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping, Sequence
from pathlib import Path

import lightning as L
import torch
from diffusers import DiffusionPipeline
from diffusers.optimization import get_constant_schedule_with_warmup
from lightning.pytorch.utilities import rank_zero_warn
from omegaconf import DictConfig

from datamodules.skips import SkipLedger, skip_metric_name
from lightning_modules import generation
from lightning_modules.adapters import LoraSettings, adapter_settings, add_lora, is_adapter_key
from lightning_modules.backbones import NoisedBatch
from lightning_modules.components import DiffusionParts, build_diffusion_parts, denoiser_config
from lightning_modules.ema import EmaParts
from lightning_modules.gradient_checkpointing import enable_gradient_checkpointing
from lightning_modules.latents import ImageLatents
from lightning_modules.loss_weighting import counted_mean
from lightning_modules.objective_reach import freeze_unreached
from lightning_modules.rng import every_rank_state, restore_rng_state, seed_process, seed_training_generator
from lightning_modules.text_conditioning import TextConditioning, text_feature_batch_size


def drop_captions(captions: Sequence[str], probability: float, generator: torch.Generator | None = None) -> list[str]:
    """Classifier-free-guidance dropout: each caption independently becomes the empty prompt."""
    keep = torch.rand(len(captions), generator=generator, device=None if generator is None else generator.device)
    keep = keep >= probability
    return [caption if kept else "" for caption, kept in zip(captions, keep.tolist(), strict=True)]


class LatentDiffusionModule(TextConditioning, ImageLatents, L.LightningModule):
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
        text_feature_batch_size: int = 1,
        seed: int = 0,
        adapters: Mapping[str, LoraSettings] | None = None,
    ) -> None:
        super().__init__()
        adapters = dict(adapters or {})
        self.backbone = parts.backbone
        self.part_names = (parts.backbone.part, "text_encoder", "vae")
        unknown = (set(trainable) | set(adapters)) - set(self.part_names)
        if unknown or not (trainable or adapters) or set(trainable) & set(adapters):
            raise ValueError(
                f"trainable and adapters must be disjoint subsets of {self.part_names} (the {parts.backbone.name} "
                f"backbone's parts), not both empty; got {list(trainable)} and {list(adapters)}"
            )
        setattr(self, parts.backbone.part, parts.denoiser)
        self.vae, self.text_encoder = parts.vae, parts.text_encoder
        self.tokenizer, self.noise_scheduler = parts.tokenizer, parts.noise_scheduler
        # Trained parts: fully trained ones and adapted ones (``adapted``: only their adapter weights train).
        self.trainable = tuple(name for name in self.part_names if name in trainable or name in adapters)
        self.adapted = tuple(name for name in self.part_names if name in adapters)
        self.learning_rates = dict(learning_rates or {}) | {name: adapters[name].learning_rate for name in adapters}
        missing_lr = [name for name in self.trainable if name not in self.learning_rates]
        if missing_lr:
            raise ValueError(f"no learning rate given for trainable part(s) {missing_lr}")
        self.adam_weight_decay, self.adam_betas = adam_weight_decay, tuple(adam_betas)
        self.lr_warmup_steps = lr_warmup_steps
        self.ucg_probability, self.snr_gamma = ucg_probability, snr_gamma
        for name in self.part_names:
            getattr(self, name).requires_grad_(name in self.trainable and name not in self.adapted)
        for name in self.adapted:
            add_lora(name, getattr(self, name), adapters[name], self.backbone)
        if gradient_checkpointing:  # before the probe below, which must run the forward that trains
            checkpointed = self.part_names[:2] if "text_encoder" in self.trainable else self.part_names[:1]
            for name in checkpointed:
                part = getattr(self, name)
                input_layer = self.backbone.input_layer(part) if name == self.backbone.part else None
                enable_gradient_checkpointing(part, adapted=name in self.adapted, input_layer=input_layer)
        self.unused_parameters = freeze_unreached(self)
        # Trained parameters (requires_grad) are set by now: the EMA copies own exactly those.
        self.ema = EmaParts({name: getattr(self, name) for name in self.trainable}, ema_decay) if use_ema else None
        # Frozen parts are rebuilt from their sources, so checkpoints hold only what trains.
        self.strict_loading = False
        self.skipped_samples = SkipLedger()  # this process's unusable training samples, once per (id, reason)
        # Timesteps, noise, caption dropout and posterior samples: this process's own stream (see rng.py), seeded
        # for rank 0 on the CPU here, and for the real rank on the training device in setup().
        self.seed = seed
        self.training_generator = seed_training_generator(torch.Generator(), seed, rank=0)
        self._rng_states_to_restore: dict | None = None
        # Every process's random state at the last step boundary (what checkpoints hold: saving needs no
        # collective), and the one gathered during the step in progress, kept once its optimizer step is done.
        self._rng_states: dict | None = None
        self._rng_states_of_this_step: dict | None = None
        self.text_feature_cache_size = text_feature_cache_size
        self.text_feature_batch_size = text_feature_batch_size
        self.text_feature_cache: OrderedDict[str, torch.Tensor] = OrderedDict()

    @classmethod
    def from_config(cls, cfg: DictConfig, vae_folder: Path | None = None) -> LatentDiffusionModule:
        """The one place where ``model`` and ``train`` config become a module (train.py and evaluation use it)."""
        train_cfg = cfg.train
        parts = build_diffusion_parts(cfg.model, cfg.data.resolution, vae_folder=vae_folder)
        denoiser, own = parts.backbone.part, denoiser_config(cfg.model, parts.backbone)
        if denoiser in cfg.model.adapters.parts and not (own.pretrained or cfg.model.pretrained):
            rank_zero_warn(
                f"model.adapters.parts includes {denoiser} but it has no pretrained weights (model."
                f"{parts.backbone.name}.pretrained and "
                f"model.pretrained are null): LoRA adapts a randomly initialised {denoiser}"
            )
        return cls(
            parts,
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
            text_feature_batch_size=text_feature_batch_size(cfg),
            seed=cfg.seed,
            adapters=adapter_settings(cfg.model.adapters),
        )

    # ----------------------------------------------------------------------------------------- parts & modes
    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        """The trained parameters: those of the trainable parts that require grad (the objective reaches them)."""
        return [p for name in self.trainable for p in getattr(self, name).parameters() if p.requires_grad]

    def train(self, mode: bool = True) -> LatentDiffusionModule:
        """Lightning switches the whole module to train mode; frozen parts must stay in eval (dropout, norms)."""
        super().train(mode)
        for name in self.part_names:
            if name not in self.trainable:
                getattr(self, name).eval()
        return self

    # ----------------------------------------------------------------------------------------- objective
    def diffusion_loss(
        self,
        latents: torch.Tensor,
        captions: Sequence[str],
        generator: torch.Generator | None = None,
        sample_weights: torch.Tensor | None = None,
        evaluation: bool = False,
    ) -> torch.Tensor:
        """The backbone's objective (``per_sample_loss``: noise or v MSE, learned variance) at a random timestep.

        Draws come from ``generator`` on its own device (a CPU generator gives the same draws on any device);
        ``evaluation``: with the evaluation weights (``evaluation_parts``) instead of the training ones. Noise,
        forward noising, target and loss are float32 under any precision (``noisy_latents_and_target``); only the
        denoiser runs in the training precision. ``sample_weights`` (the loader's ``loss_weight``) give zero weight
        to the repeats that even out the processes' shares of an epoch: the loss is the weighted mean over counted
        samples.
        """
        draw_on = latents.device if generator is None else generator.device
        noise = torch.randn(latents.shape, generator=generator, device=draw_on, dtype=torch.float32)
        steps = self.noise_scheduler.config.num_train_timesteps
        timesteps = torch.randint(0, steps, (latents.shape[0],), generator=generator, device=draw_on)
        noise, timesteps = noise.to(latents.device), timesteps.to(latents.device)
        noisy_latents, target = self.noisy_latents_and_target(latents, noise, timesteps)
        text_features = self.evaluation_text_features(captions) if evaluation else self.encode_text(captions)
        denoiser = self.evaluation_parts().denoiser if evaluation else self.denoiser
        # A bf16-true denoiser needs bf16 input; under bf16-mixed autocast casts inside each layer as usual. The
        # input layer's dtype, not ``.dtype``: that walks every submodule looking for casting hooks (~1 ms a step).
        input_dtype = self.backbone.input_layer(denoiser).weight.dtype
        output = self.backbone.forward(
            denoiser, noisy_latents.to(input_dtype), timesteps, text_features, self.text_mask(captions)
        )
        with torch.autocast(latents.device.type, enabled=False):
            drawn = NoisedBatch(latents.float(), noise, timesteps, noisy_latents)
            per_sample = self.backbone.per_sample_loss(output, target, self.noise_scheduler, drawn, self.snr_gamma)
            return counted_mean(per_sample, sample_weights)

    def noisy_latents_and_target(
        self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward noising and the regression target (noise or velocity), in float32.

        In bf16, sqrt(1 - alpha_bar_t) rounds to 0 at t <= 1 (the UNet would see the clean latent while the target
        is the noise) and is 10-25 % off up to t = 10; the scheduler computes in its inputs' dtype.
        """
        latents, noise = latents.float(), noise.float()
        with torch.autocast(latents.device.type, enabled=False):
            noisy_latents = self.noise_scheduler.add_noise(latents, noise, timesteps)
            if self.noise_scheduler.config.prediction_type == "epsilon":
                return noisy_latents, noise
            return noisy_latents, self.noise_scheduler.get_velocity(latents, noise, timesteps)

    def zero_loss(self) -> torch.Tensor:
        """The loss of a batch whose every sample was unreadable: 0, reaching every trained parameter.

        Every process must take every step: DDP's gradient all-reduce waits for all of them, so a process that
        skipped its step (returned None) would leave the others waiting forever. Zero gradients make this process's
        share count nothing, as a batch of evening-out repeats does; the optimizer, LR schedule and EMA then step
        on every process alike, and a single process does the same, so step counts (schedules, checkpoints,
        resume) never depend on the process count. The skipped samples are counted in ``data/skipped_samples``.
        """
        return torch.stack([parameter.sum().float() for parameter in self.trainable_parameters()]).sum() * 0.0

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        self.skipped_samples.add(batch.get("skipped", ()))
        self.log("data/skipped_samples", float(len(self.skipped_samples)), on_step=True, reduce_fx="sum")
        for reason, count in self.skipped_samples.counts().items():
            self.log(skip_metric_name(reason), float(count), on_step=True, reduce_fx="sum")
        if len(batch["caption"]) == 0:
            return self.zero_loss()
        generator = self.training_generator
        captions = drop_captions(batch["caption"], self.ucg_probability, generator)
        latents = self.batch_latents(batch, generator)
        loss = self.diffusion_loss(latents, captions, generator, sample_weights=batch.get("loss_weight"))
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=False, batch_size=len(captions))
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        """Held-out loss of the evaluation weights (EMA when kept), with noise and timesteps fixed per batch, so
        curves are comparable across evaluations."""
        if len(batch["caption"]) == 0:
            return
        generator = torch.Generator(device=self.device).manual_seed(batch_idx)
        weights = batch.get("loss_weight")
        latents = self.batch_latents(batch, generator, evaluation=True)
        loss = self.diffusion_loss(latents, batch["caption"], generator, weights, evaluation=True)
        counted = len(batch["caption"]) if weights is None else int(weights.sum())
        # Weighted by counted samples (none for a batch of evening-out repeats): the exact mean over processes.
        self.log("val/loss", loss, prog_bar=True, sync_dist=True, batch_size=counted)

    # ----------------------------------------------------------------------------------------- optimisation
    def configure_optimizers(self):
        groups = [
            {
                "params": [p for p in getattr(self, name).parameters() if p.requires_grad],
                "lr": float(self.learning_rates[name]),
                "name": name,
            }
            for name in self.trainable
        ]
        # foreach: one call per operation for all tensors (torch picks it on GPUs, the per-tensor loop on CPUs);
        # the same arithmetic element by element, so bit-identical to that loop, and faster with hundreds of tensors.
        optimizer = torch.optim.AdamW(groups, betas=self.adam_betas, weight_decay=self.adam_weight_decay, foreach=True)
        scheduler = get_constant_schedule_with_warmup(optimizer, num_warmup_steps=self.lr_warmup_steps)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ----------------------------------------------------------------------------------------- randomness & EMA
    def setup(self, stage: str) -> None:
        """This process's own random streams, seeded by (seed, global rank) once the trainer has placed it."""
        if stage == "fit":
            self.training_generator = torch.Generator(device=self.trainer.strategy.root_device)
            seed_process(self.training_generator, self.seed, self.global_rank)
            self._rng_states = every_rank_state(self.training_generator, self.trainer.strategy.root_device)

    def on_train_start(self) -> None:
        """Train mode (Lightning keeps each module's mode; from_pretrained parts arrive in eval), and a resumed
        process's own random state back."""
        self.train()
        if self._rng_states_to_restore is not None:  # after the sanity check, right before the first resumed step
            restore_rng_state(
                self._rng_states_to_restore,
                self.training_generator,
                self.device,
                self.seed,
                self.global_rank,
                self.trainer.world_size,
                self.global_step,
            )
            self._rng_states_to_restore = None

    def on_before_backward(self, loss: torch.Tensor) -> None:
        """Every process's random state once this step has drawn everything (backward draws nothing), gathered
        here, where every process arrives: a checkpoint saved later, by process 0 alone, needs no collective."""
        self._rng_states_of_this_step = every_rank_state(self.training_generator, self.device)

    def optimizer_step(self, *args, **kwargs) -> None:
        """EMA follows every optimizer step here, before callbacks (checkpointing) see the step's end; then the
        step's random states become the checkpoint's, with the weights they belong to (a crash before this point
        leaves both at the previous step)."""
        super().optimizer_step(*args, **kwargs)
        if self.ema is not None:
            self.ema.step({name: getattr(self, name) for name in self.trainable})
        if self._rng_states_of_this_step is not None:
            self._rng_states, self._rng_states_of_this_step = self._rng_states_of_this_step, None

    def evaluation_parts(self) -> DiffusionParts:
        """The weights every evaluation uses (validation, sampling, grounding, FID, export): the EMA copy of each
        trained part when EMA is kept, else the part itself. The training weights are never swapped."""
        copies = {} if self.ema is None else dict(self.ema.copies.items())
        return DiffusionParts(
            backbone=self.backbone,
            denoiser=copies.get(self.backbone.part, self.denoiser),
            vae=copies.get("vae", self.vae),
            text_encoder=copies.get("text_encoder", self.text_encoder),
            tokenizer=self.tokenizer,
            noise_scheduler=self.noise_scheduler,
        )

    def evaluation_only(self) -> LatentDiffusionModule:
        """For a module that never trains again (loaded for evaluation): its evaluation weights become its parts
        and the EMA copies go, so it holds one set of weights. Returns it in eval mode."""
        if self.ema is not None:
            for name, part in self.ema.copies.items():
                setattr(self, name, part)
            self.ema = None
        return self.eval()

    # ----------------------------------------------------------------------------------------- checkpoints
    def state_dict(self, *args, **kwargs):
        """Only the trainable parts, and of an adapted part its adapter weights: frozen weights are rebuilt from
        their (pretrained or cached) sources."""
        full = super().state_dict(*args, **kwargs)
        prefix = kwargs.get("prefix", "")
        keep = tuple(f"{prefix}{name}." for name in self.trainable)
        adapted = tuple(f"{prefix}{name}." for name in self.adapted)
        return type(full)(
            (key, value)
            for key, value in full.items()
            if key.startswith(keep) and (is_adapter_key(key) or not key.startswith(adapted))
        )

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["trainable_parts"] = list(self.trainable)
        checkpoint["adapted_parts"] = list(self.adapted)
        checkpoint["skipped_samples"] = self.skipped_samples.state_dict()
        # Every process's random state at the last step boundary, gathered while training: process 0 may be the
        # only process here (it saves alone after another one crashed), so this hook enters no collective.
        if self._rng_states is not None:
            checkpoint["rng_states"] = self._rng_states
        if self.ema is not None:
            checkpoint["ema"] = self.ema.checkpoint_state()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        saved = tuple(checkpoint.get("trainable_parts", ()))
        saved_adapted = tuple(checkpoint.get("adapted_parts", ()))
        if saved != self.trainable or saved_adapted != self.adapted:
            raise ValueError(
                f"checkpoint trained parts {list(saved)} (through adapters: {list(saved_adapted)}) but this run "
                f"trains {list(self.trainable)} (through adapters: {list(self.adapted)}); set model.trainable and "
                "model.adapters.parts to match the checkpoint"
            )
        self.skipped_samples.load_state_dict(checkpoint.get("skipped_samples", []))
        # Until the first resumed step, the loaded states are this run's newest (a save before it writes them back).
        self._rng_states_to_restore = self._rng_states = checkpoint.get("rng_states")
        if self.ema is not None and "ema" in checkpoint:
            self.ema.load_checkpoint_state(checkpoint["ema"], {name: getattr(self, name) for name in self.trainable})

    # ----------------------------------------------------------------------------------------- sampling & export
    @property
    def denoiser(self) -> torch.nn.Module:
        """The training weights of the backbone's denoiser (``self.unet`` or ``self.transformer``)."""
        return getattr(self, self.backbone.part)

    def pipeline(self, **replaced_parts: torch.nn.Module) -> DiffusionPipeline:
        """The backbone's diffusers pipeline around the evaluation parts (``generation.module_pipeline``)."""
        return generation.module_pipeline(self, **replaced_parts)

    def sample(
        self,
        prompts: Sequence[str],
        num_inference_steps: int = 50,
        guidance_scale: float = 4.0,
        seed: int = 0,
        resolution: int | None = None,
        autocast_dtype: torch.dtype | None = None,
    ) -> torch.Tensor:
        """Images in [0, 1], (N, 3, H, W), float32 on the CPU, generated on the module's device by the backbone's
        pipeline with classifier-free guidance and the evaluation weights.

        The initial noise comes from a CPU generator (the same images on any device); the VAE decodes one image at
        a time, so a batch at 512 px fits. ``autocast_dtype`` (e.g. torch.bfloat16) runs the networks under
        autocast; the latents and the sampler's update stay float32.
        """
        return generation.generate(self, prompts, num_inference_steps, guidance_scale, seed, resolution, autocast_dtype)

    def export_pipeline(self, folder: str | Path) -> Path:
        return generation.export_pipeline(self, folder)  # the pipeline folder diffusers loads, adapters merged

    def export_lora(self, folder: str | Path) -> Path:
        return generation.export_lora(self, folder)  # the adapters as LoRA weights beside their base pipeline
