"""Denoiser backbones: what differs between a UNet and a diffusion transformer, behind one small interface.

The LightningModule, the grounding code and the callbacks see a :class:`Backbone` and the denoiser part it names;
everything architecture-specific (building the denoiser, calling it, the objective it was trained with, its
sampler and the diffusers pipeline it exports as) lives in one module per backbone. Adding a backbone touches its
module (found by ``backbones()``), its ``model.<name>`` section and part name in the config schema, a preset
and its tests.
"""

from __future__ import annotations

import importlib
import json
import pkgutil
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from diffusers import DiffusionPipeline, SchedulerMixin
from diffusers.training_utils import compute_snr
from omegaconf import DictConfig
from torch import nn

from configs import ConfigError


class Backbone(ABC):
    """One denoiser architecture: how it is built, called, trained, sampled and exported."""

    name: ClassVar[str]  # the value of model.backbone
    part: ClassVar[str]  # the denoiser's part name: its subfolder in a diffusers pipeline folder
    model_class: ClassVar[type[nn.Module]]  # the denoiser's diffusers class, as model_index.json names it
    pipeline_class: ClassVar[type[DiffusionPipeline]]
    # Whether the text encoder and the denoiser see the padding mask whatever the encoder folder says (True: the
    # pipeline always passes it), or the folder's ``use_attention_mask`` decides (None: StableDiffusionPipeline).
    always_masks_text: ClassVar[bool | None] = None
    # Tokens a pipeline folder's prompts are padded and cut to when the pipeline fixes it (None: the tokenizer's).
    pipeline_max_length: ClassVar[int | None] = None
    lora_target_modules: ClassVar[tuple[str, ...]] = ("to_q", "to_k", "to_v", "to_out.0")  # attention projections
    text_width_key: ClassVar[str]  # the denoiser config's key for the text features' width

    def load(self, folder: Path, text_width: int) -> nn.Module:
        """The denoiser from a local folder, refused when it expects text features of another width."""
        denoiser = self.model_class.from_pretrained(folder, local_files_only=True)
        expected = getattr(denoiser.config, self.text_width_key)
        if expected != text_width:
            raise ValueError(
                f"{self.part} from '{folder}' expects text features of width {expected} ({self.text_width_key}), "
                f"but the text encoder gives {text_width}"
            )
        return denoiser

    @abstractmethod
    def build(
        self, cfg: DictConfig, folder: Path | None, latent_size: int, latent_channels: int, text_width: int
    ) -> nn.Module:
        """Load the denoiser from ``folder``, or build it at random from its architecture config ``cfg``."""

    @abstractmethod
    def input_layer(self, denoiser: nn.Module) -> nn.Module:
        """The layer that takes the noisy latents (its weight's dtype is the one they are cast to)."""

    @abstractmethod
    def forward(
        self,
        denoiser: nn.Module,
        noisy_latents: torch.Tensor,
        timesteps: torch.Tensor,
        text_features: torch.Tensor,
        text_mask: torch.Tensor | None,
    ) -> torch.Tensor:
        """The denoiser's whole output for a batch, as its pipeline calls it."""

    def per_sample_loss(
        self,
        output: torch.Tensor,
        target: torch.Tensor,
        noise_scheduler: SchedulerMixin,
        batch: NoisedBatch,
        snr_gamma: float | None,
    ) -> torch.Tensor:
        """float32 loss per sample: the regression MSE, Min-SNR-γ weighted when ``snr_gamma`` is set (Hang et al.
        2023, as diffusers' train_text_to_image.py weights it: epsilon by min(SNR, γ)/SNR, v by min(SNR, γ)/(SNR+1))."""
        per_sample = F.mse_loss(output.float(), target, reduction="none").mean(dim=tuple(range(1, target.ndim)))
        if snr_gamma is None:
            return per_sample
        snr = compute_snr(noise_scheduler, batch.timesteps)
        divisor = snr + 1 if noise_scheduler.config.prediction_type == "v_prediction" else snr
        return per_sample * torch.clamp(snr, max=snr_gamma) / divisor

    @abstractmethod
    def sampling_scheduler(self, noise_scheduler: SchedulerMixin) -> SchedulerMixin:
        """The sampler generation uses, over the training noise schedule."""

    @abstractmethod
    def pipeline(self, denoiser: nn.Module, parts: Any, scheduler: SchedulerMixin) -> DiffusionPipeline:
        """The diffusers pipeline around the parts (no copies)."""

    def generation_arguments(self, tokenizer: Any) -> dict[str, Any]:
        """Extra arguments of the pipeline's ``__call__`` that make it condition as training does."""
        return {}

    def prepare_captions(self, captions: Sequence[str]) -> list[str]:
        """Captions as the pipeline's ``encode_prompt`` rewrites them before tokenizing (identity by default)."""
        return list(captions)


@dataclass(frozen=True)
class NoisedBatch:
    """What the objective drew for a batch (float32): clean latents, noise, timesteps and the noised latents."""

    latents: torch.Tensor
    noise: torch.Tensor
    timesteps: torch.Tensor
    noisy: torch.Tensor


def backbones() -> dict[str, Backbone]:
    """Every backbone by its ``model.backbone`` name: each module of this package is imported and its ``Backbone``
    subclasses found, so a new backbone registers by existing (its module imports this one, so not at the top)."""
    for module in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{module.name}")
    return {backbone.name: backbone() for backbone in Backbone.__subclasses__()}


def backbone_named(name: str | None, pipeline_folder: Path | None) -> Backbone:
    """``model.backbone``, or (null) the one whose denoiser a pipeline folder holds; the UNet without a folder."""
    known = backbones()
    if name is not None and name not in known:
        raise ConfigError(f"model.backbone must be null (detected) or one of {sorted(known)}, got '{name}'")
    detected = None if pipeline_folder is None else detected_backbone(pipeline_folder, known)
    if name is not None:
        if detected not in (None, known[name]):
            raise ConfigError(
                f"model.backbone={name} but {pipeline_folder} holds a {detected.name} pipeline; set "
                "model.backbone=null to follow it"
            )
        return known[name]
    if pipeline_folder is None:
        return known["unet"]
    if detected is None:
        raise ConfigError(
            f"{pipeline_folder} holds no known denoiser (a <part>/config.json of "
            f"{sorted(backbone.model_class.__name__ for backbone in known.values())}); set model.backbone"
        )
    return detected


def detected_backbone(folder: Path, known: dict[str, Backbone]) -> Backbone | None:
    """The backbone whose denoiser the folder holds: ``<part>/config.json`` names its class
    (``transformer/config.json``: ``PixArtTransformer2DModel`` → pixart); None when none matches."""
    for backbone in known.values():
        config_file = folder / backbone.part / "config.json"
        if config_file.is_file() and json.loads(config_file.read_text()).get("_class_name") == (
            backbone.model_class.__name__
        ):
            return backbone
    return None
