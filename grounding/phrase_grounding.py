"""Phrase-grounding heatmaps: where a latent diffusion model's cross-attention puts the words of a phrase.

Two modes (docs/method.md, "Attention capture for grounding"):

- ``phrase_grounding_heatmaps`` (the paper's evaluation): the real image is encoded to latents (posterior
  mean); at each of the last K of N DDIM timesteps the denoiser sees that latent forward-noised to the timestep
  with fresh seeded noise, conditioned on the phrase (a PixArt transformer also on its padding mask, as its
  pipeline calls it), without guidance. The model's prediction is never fed back, so attention is read on the real
  image. Only those K denoiser calls run. The timesteps are the paper's for every backbone (``grounding_scheduler``).
- ``generation_heatmaps``: attention while the model generates from a prompt with classifier-free guidance
  (``module.sample``, unchanged), conditional half kept, at the last K of the N sampling steps.

Both return one heatmap per item, the mean over recorded steps, layers and the phrase's selected tokens
(``grounding.token_selection``), at one common resolution. They use the module's evaluation weights
(``module.evaluation_parts()``: the EMA copies when kept), never the training weights' slot.
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from diffusers import DDIMScheduler, SchedulerMixin

from grounding.attention_capture import AttentionAccumulator, capture_cross_attention
from grounding.token_selection import select_phrase_tokens
from lightning_modules.components import sampling_scheduler

if TYPE_CHECKING:
    from lightning_modules.latent_diffusion import LatentDiffusionModule


@dataclass(frozen=True)
class HeatmapSettings:
    """How attention is read. The paper: N = 50 DDIM steps, the last K = 40 recorded (t ≈ 781 … 1).

    Args:
        num_inference_steps: N, the DDIM schedule length.
        last_k_steps: K, attention is recorded at the last K steps of the schedule.
        layer_resolutions: record only cross-attention layers whose map side is listed; None → all layers.
        resolution: common heatmap size every layer's map is resized to; None → the latent size.
        seed: with each item's image id and phrase, seeds its forward-noising noise (phrase grounding); seeds the
            sampling noise (generation).
    """

    num_inference_steps: int = 50
    last_k_steps: int = 40
    layer_resolutions: tuple[int, ...] | None = None
    resolution: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if not 1 <= self.last_k_steps <= self.num_inference_steps:
            raise ValueError(
                f"last_k_steps must be in [1, num_inference_steps={self.num_inference_steps}], got {self.last_k_steps}"
            )

    @property
    def recorded_steps(self) -> range:
        """Indices into the N-step DDIM schedule at which attention is read."""
        return range(self.num_inference_steps - self.last_k_steps, self.num_inference_steps)


def phrase_token_indices(
    module: LatentDiffusionModule, phrases: Sequence[str], categories: Sequence[str | None]
) -> list[list[int]]:
    """Per phrase, the text tokens whose attention makes its heatmap (tokenized as the module's encoder is: the
    phrase as the backbone's pipeline rewrites it, e.g. lower-cased for PixArt)."""
    tokenizer = module.tokenizer
    return [
        select_phrase_tokens(phrase, category, tokenizer, tokenizer.model_max_length)
        for phrase, category in zip(module.backbone.prepare_captions(phrases), categories, strict=True)
    ]


def grounding_scheduler(noise_scheduler: SchedulerMixin) -> DDIMScheduler:
    """The N-step DDIM schedule grounding noises the real latent along: SD's DDIM settings (``sampling_scheduler``)
    with "leading" timestep spacing pinned, the paper's (t ≈ 781 … 1 for N = 50, K = 40), for every backbone.

    Pinned because the spacing otherwise follows the folder's scheduler config: an exported PixArt-Σ pipeline holds
    DPM-Solver++'s "linspace" (t = 999 … 0), a run's checkpoint the training schedule's default, so one model would
    be read at other timesteps depending on how it was loaded."""
    return DDIMScheduler.from_config(sampling_scheduler(noise_scheduler).config, timestep_spacing="leading")


def item_noise_seed(seed: int, image_id: str, phrase: str) -> int:
    """A 63-bit seed from (seed, image id, phrase): stable across runs, machines and Python versions (sha256, not
    ``hash``), so each pair gets its own noise and one draw cannot bias every heatmap the same way."""
    digest = hashlib.sha256(f"{seed}\x00{image_id}\x00{phrase}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def forward_noising_noise(latent_shape: Sequence[int], num_steps: int, seeds: Sequence[int]) -> torch.Tensor:
    """Noise for the recorded steps, (num_steps, batch, *latent_shape), on the CPU.

    Item i draws its own (num_steps, *latent_shape) block from a generator seeded with ``seeds[i]``, so an
    item's heatmap depends neither on its batch nor on the process (DDP shard) that evaluates it.
    """
    blocks = [
        torch.randn((num_steps, *latent_shape), generator=torch.Generator().manual_seed(item_seed))
        for item_seed in seeds
    ]
    return torch.stack(blocks, dim=1)


@torch.no_grad()
def phrase_grounding_heatmaps(
    module: LatentDiffusionModule,
    pixel_values: torch.Tensor,
    phrases: Sequence[str],
    categories: Sequence[str | None],
    settings: HeatmapSettings,
    image_ids: Sequence[str] | None = None,
) -> torch.Tensor:
    """Heatmaps of each phrase on its real image: (batch, R, R), unnormalised (the metrics normalise).

    ``pixel_values``: (batch, 3, H, W) in [-1, 1], as ``datamodules.mscxr.load_grounding_sample`` gives.
    ``image_ids`` (e.g. MS-CXR dicom ids) seed each item's noise with its phrase (``item_noise_seed``); without
    them the same phrase gets the same noise on every image.
    """
    image_ids = [""] * len(phrases) if image_ids is None else list(image_ids)
    if not len(pixel_values) == len(phrases) == len(categories) == len(image_ids):
        raise ValueError(
            f"phrase_grounding_heatmaps got {len(pixel_values)} images, {len(phrases)} phrases, "
            f"{len(categories)} categories and {len(image_ids)} image ids; expected one of each per item"
        )
    parts = module.evaluation_parts()
    denoiser, vae, backbone = parts.denoiser, parts.vae, parts.backbone
    pixel_values = pixel_values.to(device=module.device, dtype=vae.dtype)
    # Forward noising in float32 whatever the VAE's dtype: in bf16 the noise vanishes at t <= 1 (the last steps read).
    latents = vae.encode(pixel_values).latent_dist.mean.float() * vae.config.scaling_factor
    dtype = backbone.input_layer(denoiser).weight.dtype
    text_features, text_mask = module.evaluation_text_features(phrases).to(dtype), module.text_mask(phrases)
    scheduler = grounding_scheduler(module.noise_scheduler)
    scheduler.set_timesteps(settings.num_inference_steps)
    steps = settings.recorded_steps
    seeds = [
        item_noise_seed(settings.seed, image_id, phrase) for image_id, phrase in zip(image_ids, phrases, strict=True)
    ]
    noise = forward_noising_noise(latents.shape[1:], len(steps), seeds).to(latents)
    with capture_cross_attention(denoiser, settings.resolution, settings.layer_resolutions) as attention:
        for noise_at_step, step in zip(noise, steps, strict=True):
            timesteps = scheduler.timesteps[step].repeat(len(latents))
            noisy_latents = scheduler.add_noise(latents, noise_at_step, timesteps)
            backbone.forward(denoiser, noisy_latents.to(dtype), timesteps.to(module.device), text_features, text_mask)
    return attention.heatmap(phrase_token_indices(module, phrases, categories))


@contextmanager
def _step_counter(denoiser: torch.nn.Module, attention: AttentionAccumulator) -> Iterator[None]:
    """Tell the accumulator the step index of each denoiser call (a diffusers pipeline calls it once per step)."""
    calls = itertools.count()

    def set_step(_module: torch.nn.Module, _args: tuple) -> None:
        attention.set_step(next(calls))

    hook = denoiser.register_forward_pre_hook(set_step)
    try:
        yield
    finally:
        hook.remove()


@torch.no_grad()
def generation_heatmaps(
    module: LatentDiffusionModule,
    prompts: Sequence[str],
    categories: Sequence[str | None],
    settings: HeatmapSettings,
    guidance_scale: float = 4.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Heatmaps (batch, R, R) of each prompt's tokens while generating from it, and the generated images.

    The images are exactly ``module.sample(prompts, N, guidance_scale, seed)``'s (EMA weights if kept); a
    category of None selects every text token of its prompt.
    """
    if len(prompts) != len(categories):
        raise ValueError(f"generation_heatmaps got {len(prompts)} prompts and {len(categories)} categories")
    guided = guidance_scale > 1.0  # diffusers pipelines batch [unconditional; conditional] only then
    denoiser = module.evaluation_parts().denoiser  # the one module.sample runs
    with (
        capture_cross_attention(
            denoiser,
            settings.resolution,
            settings.layer_resolutions,
            steps=settings.recorded_steps,
            drop_unconditional=guided,
        ) as attention,
        _step_counter(denoiser, attention),
    ):
        images = module.sample(prompts, settings.num_inference_steps, guidance_scale, seed=settings.seed)
    return attention.heatmap(phrase_token_indices(module, prompts, categories)), images
