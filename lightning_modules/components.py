"""Build or load the parts of a latent diffusion model (UNet, VAE, text encoder, tokenizer, noise schedule).

One code path serves real and embedded use: each part comes from a local folder (``model.pretrained`` holds a
diffusers pipeline folder such as Stable Diffusion 2 base; each part's own ``pretrained`` key overrides it) or is
built from its architecture config with random initialisation. Nothing here touches the network.
"""

from __future__ import annotations

import hashlib
import importlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, UNet2DConditionModel
from lightning.pytorch.utilities import rank_zero_warn
from omegaconf import DictConfig
from transformers import AutoModel, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase
from transformers.tokenization_utils_base import VERY_LARGE_INTEGER

from configs import ConfigError

SD_LATENT_SCALE = 0.18215
PREDICTION_TYPES = ("epsilon", "v_prediction")


@dataclass
class DiffusionParts:
    """Everything a latent diffusion model is made of; the LightningModule decides what trains."""

    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    noise_scheduler: DDPMScheduler


def resolve_model_folder(source: str | Path, what: str) -> Path:
    """A local folder, or the name of an installed package that ships one (``get_model_path()``)."""
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    module_name = str(source).replace("-", "_")
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        module = None
    if module is not None and hasattr(module, "get_model_path"):
        return Path(module.get_model_path())
    raise FileNotFoundError(
        f"{what}: '{source}' is neither a local folder nor an installed package shipping a model folder "
        f"(expected a directory with config.json, or `pip install {source}`)"
    )


def _part_folder(part_source: str | None, pipeline_folder: str | None, subfolder: str, what: str) -> Path | None:
    if part_source:
        return resolve_model_folder(part_source, what)
    if pipeline_folder:
        folder = resolve_model_folder(pipeline_folder, "model.pretrained") / subfolder
        if not folder.is_dir():
            raise FileNotFoundError(f"model.pretrained: '{pipeline_folder}' has no '{subfolder}/' folder for {what}")
        return folder
    return None


def _text_encoder_folder(cfg: DictConfig) -> Path:
    folder = _part_folder(cfg.text_encoder.pretrained, cfg.pretrained, "text_encoder", "model.text_encoder")
    if folder is None:
        raise ValueError("model.text_encoder.pretrained (or model.pretrained) must name a local text encoder folder")
    return folder


def _is_pipeline_text_encoder(cfg: DictConfig) -> bool:
    """The text encoder is a diffusers pipeline's (``model.pretrained``/text_encoder), not a standalone folder."""
    return not cfg.text_encoder.pretrained and bool(cfg.pretrained)


def _text_setting(
    cfg: DictConfig, name: str, stated: bool | int | None, source: Path, field: str, expected: str
) -> bool | int:
    """The value of ``model.text_encoder.<name>`` given what the encoder's folder states in ``source``.

    A pipeline folder's text encoder is conditioned exactly as diffusers' ``encode_prompt`` conditions it: the
    folder's value is used, and the key may only be null or repeat it (a pipeline trained without a padding mask
    must not be evaluated, or fine-tuned, with one by accident of a default). A standalone encoder folder (a plain
    BERT or CLIP checkpoint, which says nothing about diffusion conditioning) follows the key; null there means
    the folder's value, refused when the folder states none.
    """
    key = f"model.text_encoder.{name}"
    configured = cfg.text_encoder[name]
    pipeline = _is_pipeline_text_encoder(cfg)
    if configured is not None and not pipeline:
        return configured
    if stated is None:
        raise ConfigError(f"{key} is null and {source} states no {field}: set {key} to {expected}")
    if configured is not None and configured != stated:
        raise ConfigError(
            f"{key}={json.dumps(configured)} contradicts the pipeline folder: {source} gives {field}="
            f"{json.dumps(stated)} (what diffusers conditions its UNet with); set {key}=null to follow the folder"
        )
    return stated


def load_tokenizer(cfg: DictConfig) -> PreTrainedTokenizerBase:
    """The text encoder's fast tokenizer; prompts are padded and cut to ``model_max_length`` tokens, which is the
    pipeline folder's own, or ``model.text_encoder.max_length`` for a standalone encoder (``_text_setting``)."""
    folder = _text_encoder_folder(cfg)
    tokenizer_folder = folder.parent / "tokenizer" if (folder.parent / "tokenizer").is_dir() else folder
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_folder, local_files_only=True)
    stated = tokenizer.model_max_length if tokenizer.model_max_length < VERY_LARGE_INTEGER else None  # else unset
    source = tokenizer_folder / "tokenizer_config.json"
    max_length = _text_setting(cfg, "max_length", stated, source, "model_max_length", "a number of tokens")
    tokenizer.model_max_length = int(max_length)
    return tokenizer


def load_text_encoder(cfg: DictConfig) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Any transformers encoder with a fast tokenizer (see ``load_tokenizer``).

    Whether the padding mask reaches the encoder is written into its config as ``use_attention_mask``, the flag
    diffusers' ``encode_prompt`` reads (present and true: mask; else none): training, evaluation and an exported
    pipeline loaded by diffusers all condition alike. A pipeline folder's flag is read as diffusers reads it, so a
    missing key (SD 2's OpenCLIP encoder) is no mask (``_text_setting``).
    """
    folder = _text_encoder_folder(cfg)
    encoder = AutoModel.from_pretrained(folder, local_files_only=True)
    stated = getattr(encoder.config, "use_attention_mask", None)
    if _is_pipeline_text_encoder(cfg):
        stated = bool(stated)
    expected = "true (BERT-style encoders are trained with the padding mask) or false (CLIP's without)"
    use_mask = _text_setting(cfg, "use_attention_mask", stated, folder / "config.json", "use_attention_mask", expected)
    encoder.config.use_attention_mask = bool(use_mask)
    return encoder, load_tokenizer(cfg)


def pretrained_vae_folder(cfg: DictConfig) -> Path | None:
    """The VAE folder named by ``model.vae.pretrained`` or ``model.pretrained``; None for a random VAE."""
    return _part_folder(cfg.vae.pretrained, cfg.pretrained, "vae", "model.vae")


def build_vae(cfg: DictConfig, resolution: int, folder: Path | None) -> AutoencoderKL:
    """Load a trained VAE from a folder, or build a random one from ``model.vae``."""
    if folder is not None:
        return AutoencoderKL.from_pretrained(folder, local_files_only=True)
    channels = list(cfg.vae.block_out_channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * len(channels),
        up_block_types=("UpDecoderBlock2D",) * len(channels),
        block_out_channels=tuple(channels),
        layers_per_block=int(cfg.vae.layers_per_block),
        latent_channels=int(cfg.vae.latent_channels),
        norm_num_groups=min(32, channels[0]),
        sample_size=resolution,
        scaling_factor=float(cfg.vae.scaling_factor or SD_LATENT_SCALE),
    )


def vae_downsampling_factor(vae: AutoencoderKL) -> int:
    return 2 ** (len(vae.config.block_out_channels) - 1)


def vae_fingerprint(vae: AutoencoderKL) -> str:
    """A hash of the VAE's config and weights: cached latents are valid only for the VAE that made them."""
    digest = hashlib.sha256(json.dumps(vae.config, sort_keys=True, default=str).encode())
    for name, tensor in sorted(vae.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def build_unet(
    cfg: DictConfig, folder: Path | None, latent_size: int, latent_channels: int, cross_attention_dim: int
) -> UNet2DConditionModel:
    """Load a UNet, or build one whose cross-attention width matches the text encoder's hidden size."""
    if folder is not None:
        unet = UNet2DConditionModel.from_pretrained(folder, local_files_only=True)
        if unet.config.cross_attention_dim != cross_attention_dim:
            raise ValueError(
                f"UNet from '{folder}' expects text features of width {unet.config.cross_attention_dim}, "
                f"but the text encoder gives {cross_attention_dim}"
            )
        return unet
    channels = list(cfg.unet.block_out_channels)
    return UNet2DConditionModel(
        sample_size=latent_size,
        in_channels=latent_channels,
        out_channels=latent_channels,
        down_block_types=tuple(cfg.unet.down_block_types),
        up_block_types=tuple(cfg.unet.up_block_types),
        block_out_channels=tuple(channels),
        layers_per_block=int(cfg.unet.layers_per_block),
        attention_head_dim=int(cfg.unet.attention_head_dim),
        cross_attention_dim=cross_attention_dim,
        norm_num_groups=min(32, channels[0]),
    )


def build_noise_scheduler(cfg: DictConfig, folder: Path | None, prediction_type: str | None) -> DDPMScheduler:
    """The training noise schedule: a pretrained folder's, or built from ``model.scheduler``.

    ``prediction_type`` null follows the pretrained scheduler (a v-prediction model such as SD 2 768-v must never
    silently train on epsilon) and is epsilon for a schedule built from config. An explicit type that differs from
    the pretrained one is honoured with a warning: switching the objective is a legitimate recipe (SD 2 768-v was
    fine-tuned from the epsilon 512-base with v-prediction), and the explicit key is the user's decision.
    """
    if folder is None:
        scheduler = DDPMScheduler(
            num_train_timesteps=int(cfg.num_train_timesteps),
            beta_start=float(cfg.beta_start),
            beta_end=float(cfg.beta_end),
            beta_schedule=str(cfg.beta_schedule),
            prediction_type=prediction_type or "epsilon",
            clip_sample=False,
        )
    else:
        scheduler = DDPMScheduler.from_pretrained(folder, local_files_only=True)
        pretrained = scheduler.config.prediction_type
        if prediction_type is not None and prediction_type != pretrained:
            rank_zero_warn(
                f"model.prediction_type={prediction_type} overrides the pretrained scheduler's '{pretrained}' "
                f"({folder / 'scheduler_config.json'}): the model is trained (and exported) to predict "
                f"{prediction_type}; set model.prediction_type=null to keep '{pretrained}'"
            )
            scheduler = DDPMScheduler.from_config(scheduler.config, prediction_type=prediction_type)
    if scheduler.config.prediction_type not in PREDICTION_TYPES:
        raise ValueError(
            f"noise scheduler predicts '{scheduler.config.prediction_type}'"
            f"{f' ({folder})' if folder is not None else ''}; training supports {list(PREDICTION_TYPES)}: "
            "set model.prediction_type"
        )
    return scheduler


def sampling_scheduler(noise_scheduler: DDPMScheduler) -> DDIMScheduler:
    """DDIM over the training schedule, with SD's sampling settings."""
    return DDIMScheduler.from_config(noise_scheduler.config, clip_sample=False, set_alpha_to_one=False, steps_offset=1)


def build_diffusion_parts(cfg: DictConfig, resolution: int, vae_folder: Path | None = None) -> DiffusionParts:
    """All parts from ``model`` config; ``vae_folder`` (e.g. the autoencoder stage's output) wins over config."""
    text_encoder, tokenizer = load_text_encoder(cfg)
    if vae_folder is None:
        if cfg.vae.pretrained == "auto":
            raise ValueError("model.vae.pretrained=auto needs the folder written by the autoencoder stage")
        vae_folder = pretrained_vae_folder(cfg)
    vae = build_vae(cfg, resolution, vae_folder)
    factor = vae_downsampling_factor(vae)
    if resolution % factor:
        raise ValueError(f"data.resolution {resolution} is not divisible by the VAE's downsampling factor {factor}")
    unet = build_unet(
        cfg,
        _part_folder(cfg.unet.pretrained, cfg.pretrained, "unet", "model.unet"),
        latent_size=resolution // factor,
        latent_channels=vae.config.latent_channels,
        cross_attention_dim=text_encoder.config.hidden_size,
    )
    scheduler_folder = _part_folder(None, cfg.pretrained, "scheduler", "model.scheduler")
    noise_scheduler = build_noise_scheduler(cfg.scheduler, scheduler_folder, cfg.prediction_type)
    return DiffusionParts(unet, vae, text_encoder, tokenizer, noise_scheduler)
