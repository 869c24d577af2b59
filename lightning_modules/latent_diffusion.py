"""The diffusion stage: fine-tune a latent diffusion model on (X-ray, report) pairs.

Which parts train is an explicit, recorded choice (``trainable`` ⊆ {unet, text_encoder, vae}): the paper's finding is
that training the text encoder buys fidelity at the cost of grounding. Frozen parts stay in eval mode, receive no
gradients, are absent from the optimizer and are not written into checkpoints (they come from their sources).
A part may instead train through LoRA adapters (``adapters``, see ``adapters.py``): it then counts as trained
(train mode, EMA, optimizer group, no feature cache) but only its adapter weights train and are checkpointed.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from diffusers import StableDiffusionPipeline
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from diffusers.optimization import get_constant_schedule_with_warmup
from diffusers.training_utils import compute_snr
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from omegaconf import DictConfig

from datamodules.skips import SkipLedger, skip_metric_name
from lightning_modules.adapters import (
    LoraSettings,
    adapter_settings,
    add_lora,
    check_adapters_reached,
    is_adapter_key,
    plain_copy,
    write_lora_weights,
)
from lightning_modules.components import (
    DiffusionParts,
    build_diffusion_parts,
    sampling_scheduler,
    vae_downsampling_factor,
)
from lightning_modules.ema import EmaParts
from lightning_modules.gradient_checkpointing import enable_gradient_checkpointing
from lightning_modules.loss_weighting import counted_mean
from lightning_modules.objective_reach import unreached_parameters
from lightning_modules.rng import (
    every_rank_state,
    restore_rng_state,
    seed_process,
    seed_training_generator,
)

PART_NAMES = ("unet", "text_encoder", "vae")


def drop_captions(captions: Sequence[str], probability: float, generator: torch.Generator | None = None) -> list[str]:
    """Classifier-free-guidance dropout: each caption independently becomes the empty prompt."""
    keep = torch.rand(len(captions), generator=generator, device=None if generator is None else generator.device)
    keep = keep >= probability
    return [caption if kept else "" for caption, kept in zip(captions, keep.tolist(), strict=True)]


def text_feature_batch_size(cfg: DictConfig) -> int:
    """``train.text_feature_batch_size``; null: 1 on CPU, where padding rows cost their FLOPs, and a data batch
    on an accelerator, where one call replaces one per miss (bench/text_cache.py)."""
    if cfg.train.text_feature_batch_size is not None:
        return int(cfg.train.text_feature_batch_size)
    accelerator = str(cfg.trainer.accelerator)
    on_cpu = accelerator == "cpu" or (accelerator == "auto" and not torch.cuda.is_available())
    return 1 if on_cpu else int(cfg.data.batch_size)


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
        text_feature_batch_size: int = 1,
        seed: int = 0,
        adapters: Mapping[str, LoraSettings] | None = None,
    ) -> None:
        super().__init__()
        adapters = dict(adapters or {})
        unknown = (set(trainable) | set(adapters)) - set(PART_NAMES)
        if unknown or not (trainable or adapters) or set(trainable) & set(adapters):
            raise ValueError(
                f"trainable and adapters must be disjoint subsets of {PART_NAMES}, not both empty; got "
                f"{list(trainable)} and {list(adapters)}"
            )
        self.unet, self.vae, self.text_encoder = parts.unet, parts.vae, parts.text_encoder
        self.tokenizer, self.noise_scheduler = parts.tokenizer, parts.noise_scheduler
        # Trained parts: fully trained ones and adapted ones (``adapted``: only their adapter weights train).
        self.trainable = tuple(name for name in PART_NAMES if name in trainable or name in adapters)
        self.adapted = tuple(name for name in PART_NAMES if name in adapters)
        self.learning_rates = dict(learning_rates or {}) | {name: adapters[name].learning_rate for name in adapters}
        missing_lr = [name for name in self.trainable if name not in self.learning_rates]
        if missing_lr:
            raise ValueError(f"no learning rate given for trainable part(s) {missing_lr}")
        self.adam_weight_decay, self.adam_betas = adam_weight_decay, tuple(adam_betas)
        self.lr_warmup_steps = lr_warmup_steps
        self.ucg_probability, self.snr_gamma = ucg_probability, snr_gamma
        for name in PART_NAMES:
            getattr(self, name).requires_grad_(name in self.trainable and name not in self.adapted)
        for name in self.adapted:
            add_lora(name, getattr(self, name), adapters[name])
        if gradient_checkpointing:  # before the probe below, which must run the forward that trains
            for name in ("unet", "text_encoder") if "text_encoder" in self.trainable else ("unet",):
                enable_gradient_checkpointing(getattr(self, name), adapted=name in self.adapted)
        self.unused_parameters = self._freeze_what_the_objective_never_reaches()
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
        if "unet" in cfg.model.adapters.parts and not (cfg.model.unet.pretrained or cfg.model.pretrained):
            rank_zero_warn(
                "model.adapters.parts includes unet but the UNet has no pretrained weights (model.unet.pretrained "
                "and model.pretrained are null): LoRA adapts a randomly initialised UNet"
            )
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
            text_feature_batch_size=text_feature_batch_size(cfg),
            seed=cfg.seed,
            adapters=adapter_settings(cfg.model.adapters),
        )

    # ----------------------------------------------------------------------------------------- parts & modes
    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        """The trained parameters: those of the trainable parts that require grad (the objective reaches them)."""
        return [p for name in self.trainable for p in getattr(self, name).parameters() if p.requires_grad]

    def _freeze_what_the_objective_never_reaches(self) -> list[str]:
        """Parameters of trainable parts that get no gradient from the objective (BERT's pooler, the VAE's decoder)
        stop requiring grad: not optimized, not averaged, and DDP never waits for them (``objective_reach``).

        Probed on a short caption and a latent-pixel-sized image; the UNet is not probed, its whole output is the
        prediction. Returns the frozen parameters' names ("text_encoder.pooler.dense.weight", ...).
        """
        size = vae_downsampling_factor(self.vae)
        image = torch.zeros(1, self.vae.config.in_channels, size, size, dtype=self.vae.dtype, device=self.vae.device)
        objective_paths = {  # what encode_text (never cached when trained) and encode_images run
            "text_encoder": lambda: self._run_text_encoder(["a"]),
            "vae": lambda: self.encode_images(image),
        }
        frozen = []
        for name in (name for name in self.trainable if name in objective_paths):
            part = getattr(self, name)
            unreached = unreached_parameters(part, objective_paths[name])
            if name in self.adapted:
                check_adapters_reached(name, part, unreached)
            elif len(unreached) == sum(parameter.requires_grad for parameter in part.parameters()):
                raise RuntimeError(f"the objective reaches none of the trainable {name}'s parameters")
            for parameter_name in unreached:
                part.get_parameter(parameter_name).requires_grad_(False)
                frozen.append(f"{name}.{parameter_name}")
        if frozen:
            modules = Counter(".".join(name.split(".")[:2]) for name in frozen)
            listed = ", ".join(f"{module} ({count} tensors)" for module, count in modules.items())
            rank_zero_info(f"[model] not trained, the objective never uses them: {listed}")
        return frozen

    def train(self, mode: bool = True) -> LatentDiffusionModule:
        """Lightning switches the whole module to train mode; frozen parts must stay in eval (dropout, norms)."""
        super().train(mode)
        for name in PART_NAMES:
            if name not in self.trainable:
                getattr(self, name).eval()
        return self

    # ----------------------------------------------------------------------------------------- encoders
    def _run_text_encoder(self, captions: Sequence[str], text_encoder: torch.nn.Module | None = None) -> torch.Tensor:
        text_encoder = self.text_encoder if text_encoder is None else text_encoder
        tokens = self.tokenizer(
            list(captions),
            padding="max_length",
            truncation=True,
            max_length=self.tokenizer.model_max_length,
            return_tensors="pt",
        ).to(self.device)
        use_mask = getattr(text_encoder.config, "use_attention_mask", False)
        with torch.set_grad_enabled(self.training and "text_encoder" in self.trainable):
            output = text_encoder(tokens.input_ids, attention_mask=tokens.attention_mask if use_mask else None)
        return output[0]

    def evaluation_text_features(self, captions: Sequence[str]) -> torch.Tensor:
        """Text features from the evaluation weights (``evaluation_parts``), never read from or written to the
        training cache: an evaluation leaves what training computes unchanged."""
        return self._run_text_encoder(captions, self.evaluation_parts().text_encoder)

    def encode_text(self, captions: Sequence[str]) -> torch.Tensor:
        """Text features; a frozen encoder's are cached per caption (most of a small model's step otherwise).

        A batch's misses are encoded together (``_encode_misses``), least recently used captions are evicted.
        """
        if self.text_feature_cache_size == 0 or "text_encoder" in self.trainable:
            return self._run_text_encoder(captions)
        cache = self.text_feature_cache
        misses = list(dict.fromkeys(caption for caption in captions if caption not in cache))
        cache.update(zip(misses, self._encode_misses(misses), strict=True))
        features = []
        for caption in captions:
            cache.move_to_end(caption)
            features.append(cache[caption])
        while len(cache) > self.text_feature_cache_size:
            cache.popitem(last=False)
        return torch.stack(features)

    def _encode_misses(self, captions: list[str]) -> list[torch.Tensor]:
        """Features of uncached captions, in encoder calls of exactly ``text_feature_batch_size`` captions.

        A cached feature must not depend on which batch filled it: a resumed run, whose cache starts empty, has to
        compute bit-identical features. Every call has the same shape (the last chunk padded with empty captions),
        so each caption goes through the same kernels whatever its companions; rows never interact.
        """
        size, features = self.text_feature_batch_size, []
        for start in range(0, len(captions), size):
            chunk = captions[start : start + size]
            encoded = self._run_text_encoder([*chunk, *[""] * (size - len(chunk))]).detach()
            features += [row.clone() for row in encoded[: len(chunk)]]  # not views that keep the padding alive
        return features

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

    # ----------------------------------------------------------------------------------------- objective
    def diffusion_loss(
        self,
        latents: torch.Tensor,
        captions: Sequence[str],
        generator: torch.Generator | None = None,
        sample_weights: torch.Tensor | None = None,
        evaluation: bool = False,
    ) -> torch.Tensor:
        """Noise-prediction (or v) MSE at a random timestep, optionally Min-SNR-γ weighted.

        Draws come from ``generator`` on its own device (a CPU generator gives the same draws on any device);
        ``evaluation``: with the evaluation weights (``evaluation_parts``) instead of the training ones.

        Noise, forward noising, target and loss are float32 under any precision (``noisy_latents_and_target``);
        only the UNet runs in the training precision. ``sample_weights`` (the loader's ``loss_weight``) give zero
        weight to the repeats that even out the processes' shares of an epoch: the loss is the weighted mean over
        counted samples.
        """
        draw_on = latents.device if generator is None else generator.device
        noise = torch.randn(latents.shape, generator=generator, device=draw_on, dtype=torch.float32)
        timesteps = torch.randint(
            0,
            self.noise_scheduler.config.num_train_timesteps,
            (latents.shape[0],),
            generator=generator,
            device=draw_on,
        )
        noise, timesteps = noise.to(latents.device), timesteps.to(latents.device)
        noisy_latents, target = self.noisy_latents_and_target(latents, noise, timesteps)
        text_features = self.evaluation_text_features(captions) if evaluation else self.encode_text(captions)
        unet = self.evaluation_parts().unet if evaluation else self.unet
        # A bf16-true UNet needs bf16 input; under bf16-mixed autocast casts inside each layer as usual. The input
        # layer's dtype, not ``unet.dtype``: that walks every submodule looking for casting hooks (~1 ms a step).
        prediction = unet(noisy_latents.to(unet.conv_in.weight.dtype), timesteps, text_features).sample
        with torch.autocast(latents.device.type, enabled=False):
            per_sample = F.mse_loss(prediction.float(), target, reduction="none").mean(dim=(1, 2, 3))
            if self.snr_gamma is not None:
                snr = compute_snr(self.noise_scheduler, timesteps)
                weight = torch.clamp(snr, max=self.snr_gamma) / snr
                if self.noise_scheduler.config.prediction_type == "v_prediction":
                    weight = torch.clamp(snr, max=self.snr_gamma) / (snr + 1)
                per_sample = per_sample * weight
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
            unet=copies.get("unet", self.unet),
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
    def pipeline(self, **replaced_parts) -> StableDiffusionPipeline:
        """The standard diffusers pipeline around the evaluation parts (no copies), with DDIM sampling;
        ``replaced_parts`` (e.g. ``unet=...``) take the place of those parts."""
        parts = replace(self.evaluation_parts(), **replaced_parts)
        pipe = StableDiffusionPipeline(
            vae=parts.vae,
            text_encoder=parts.text_encoder,
            tokenizer=parts.tokenizer,
            unet=parts.unet,
            scheduler=sampling_scheduler(parts.noise_scheduler),
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
        autocast_dtype: torch.dtype | None = None,
    ) -> torch.Tensor:
        """Images in [0, 1], (N, 3, H, W), float32 on the CPU, generated on the module's device with classifier-free
        guidance and the evaluation weights.

        The initial noise comes from a CPU generator (the same images on any device); the VAE decodes one image at
        a time, so a batch at 512 px fits. ``autocast_dtype`` (e.g. torch.bfloat16) runs the networks under
        autocast; the latents and the DDIM update stay float32.
        """
        pipe = self.pipeline()
        size = resolution or pipe.unet.config.sample_size * pipe.vae_scale_factor
        was_training = self.training
        self.eval()  # the training parts are the evaluation parts when no EMA is kept
        autocast = torch.autocast(self.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None)
        try:
            with autocast:
                latents = pipe(
                    list(prompts),
                    height=size,
                    width=size,
                    num_inference_steps=num_inference_steps,
                    guidance_scale=guidance_scale,
                    generator=torch.Generator(device="cpu").manual_seed(seed),
                    output_type="latent",
                ).images
                images = [self._decode(pipe, latent[None]) for latent in latents]
        finally:
            self.train(was_training)
        return torch.cat(images)

    @staticmethod
    def _decode(pipe: StableDiffusionPipeline, latents: torch.Tensor) -> torch.Tensor:
        """As the pipeline decodes (scaling, VAE, post-processing to [0, 1]), moved to the CPU as float32."""
        decoded = pipe.vae.decode(latents.to(pipe.vae.dtype) / pipe.vae.config.scaling_factor).sample
        return pipe.image_processor.postprocess(decoded, output_type="pt").float().cpu()

    def export_pipeline(self, folder: str | Path) -> Path:
        """Write a StableDiffusionPipeline folder (the evaluation weights: EMA when kept) that diffusers loads;
        adapters are merged into their parts' weights (a plain pipeline, no peft needed)."""
        folder = Path(folder)
        self._plain_pipeline(merge=True).save_pretrained(folder, safe_serialization=True)
        return folder

    def export_lora(self, folder: str | Path) -> Path:
        """Write the adapters as diffusers LoRA weights (``pytorch_lora_weights.safetensors``) beside the base
        pipeline they load onto: the evaluation weights with the adapters left out. ``from_pretrained(folder)``
        then ``load_lora_weights(folder)`` gives the adapted model. When only adapters train, the base is the model
        the run started from, so the weights file alone loads onto that model."""
        if not self.adapted:
            raise ValueError("export_lora: this model has no adapters (model.adapters.parts is empty)")
        folder = Path(folder)
        self._plain_pipeline(merge=False).save_pretrained(folder, safe_serialization=True)
        parts = self.evaluation_parts()
        return write_lora_weights(folder, {name: getattr(parts, name) for name in self.adapted})

    def _plain_pipeline(self, merge: bool) -> StableDiffusionPipeline:
        """The pipeline with every adapted part as a plain model: adapters merged in, or left out (the base)."""
        parts = self.evaluation_parts()
        return self.pipeline(**{name: plain_copy(getattr(parts, name), merge) for name in self.adapted})
