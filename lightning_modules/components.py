"""Build or load the parts of a latent diffusion model (denoiser, VAE, text encoder, tokenizer, noise schedule).

One code path serves real and embedded use: each part comes from a local folder (``model.pretrained`` holds a
diffusers pipeline folder such as Stable Diffusion 2 base or PixArt-Σ; each part's own ``pretrained`` key overrides
it) or is built from its architecture config with random initialisation. The denoiser (UNet or transformer) is the
backbone's to build (``backbones/``). Nothing here touches the network.
"""

from __future__ import annotations

import hashlib
import importlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler
from lightning.pytorch.utilities import rank_zero_warn
from omegaconf import DictConfig
from transformers import AutoConfig, AutoModel, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase
from transformers.tokenization_utils_base import VERY_LARGE_INTEGER

from configs import ConfigError
from lightning_modules.backbones import Backbone, backbone_named

SD_LATENT_SCALE = 0.18215
PREDICTION_TYPES = ("epsilon", "v_prediction")


@dataclass
class DiffusionParts:
    """Everything a latent diffusion model is made of; the LightningModule decides what trains. The denoiser is
    the backbone's (a UNet or a transformer), named ``backbone.part``."""

    backbone: Backbone
    denoiser: torch.nn.Module
    vae: AutoencoderKL
    text_encoder: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    noise_scheduler: DDPMScheduler

    def part(self, name: str) -> torch.nn.Module:
        """A trainable part by its name (``unet``/``transformer``, ``text_encoder``, ``vae``)."""
        return self.denoiser if name == self.backbone.part else getattr(self, name)


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
    cfg: DictConfig, name: str, stated: bool | int | None, source: Path, field: str, expected: str, fixed: str = ""
) -> bool | int:
    """The value of ``model.text_encoder.<name>`` given what the encoder's folder states in ``source``.

    A pipeline folder's text encoder is conditioned exactly as diffusers' ``encode_prompt`` conditions it: the
    folder's value is used, and the key may only be null or repeat it (a pipeline trained without a padding mask
    must not be evaluated, or fine-tuned, with one by accident of a default). A standalone encoder folder (a plain
    BERT or CLIP checkpoint, which says nothing about diffusion conditioning) follows the key; null there means
    the folder's value, refused when the folder states none. ``fixed`` (e.g. "PixArtSigmaPipeline always passes the
    padding mask") marks ``stated`` as the backbone's pipeline's own value, which every encoder folder must follow.
    """
    key = f"model.text_encoder.{name}"
    configured = cfg.text_encoder[name]
    if fixed:
        if configured is not None and configured != stated:
            raise ConfigError(f"{key}={json.dumps(configured)} contradicts the backbone: {fixed}; set {key}=null")
        return stated
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


def load_tokenizer(cfg: DictConfig, backbone: Backbone) -> PreTrainedTokenizerBase:
    """The text encoder's fast tokenizer; prompts are padded and cut to ``model_max_length`` tokens, which is the
    pipeline folder's own (its tokenizer's, or the length the backbone's pipeline pads to: 300 for PixArt-Σ), or
    ``model.text_encoder.max_length`` for a standalone encoder (``_text_setting``)."""
    folder = _text_encoder_folder(cfg)
    tokenizer_folder = folder.parent / "tokenizer" if (folder.parent / "tokenizer").is_dir() else folder
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_folder, local_files_only=True)
    stated = tokenizer.model_max_length if tokenizer.model_max_length < VERY_LARGE_INTEGER else None  # else unset
    source = tokenizer_folder / "tokenizer_config.json"
    if _is_pipeline_text_encoder(cfg) and backbone.pipeline_max_length is not None:
        stated, source = backbone.pipeline_max_length, Path(f"{backbone.pipeline_class.__name__}'s max_sequence_length")
    max_length = _text_setting(cfg, "max_length", stated, source, "model_max_length", "a number of tokens")
    tokenizer.model_max_length = int(max_length)
    return tokenizer


def _encoder_class(folder: Path) -> type[PreTrainedModel]:
    """The class the folder's config names (``architectures``: a T5 folder's ``T5EncoderModel``, which AutoModel
    would build as the whole encoder-decoder ``T5Model``), else AutoModel's choice."""
    architectures = AutoConfig.from_pretrained(folder, local_files_only=True).architectures or []
    named = getattr(transformers, architectures[0], None) if architectures else None
    return named if isinstance(named, type) and issubclass(named, PreTrainedModel) else AutoModel


def load_text_encoder(cfg: DictConfig, backbone: Backbone) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Any transformers encoder with a fast tokenizer (see ``load_tokenizer``).

    Whether the padding mask reaches the encoder is written into its config as ``use_attention_mask``, the flag
    diffusers' ``encode_prompt`` reads (present and true: mask; else none): training, evaluation and an exported
    pipeline loaded by diffusers all condition alike. A pipeline folder's flag is read as diffusers reads it, so a
    missing key (SD 2's OpenCLIP encoder) is no mask (``_text_setting``). A backbone whose pipeline always passes
    the mask (PixArt-Σ's) fixes it to true for any encoder folder.
    """
    folder = _text_encoder_folder(cfg)
    encoder = _encoder_class(folder).from_pretrained(folder, local_files_only=True)
    stated = getattr(encoder.config, "use_attention_mask", None)
    if _is_pipeline_text_encoder(cfg):
        stated = bool(stated)
    fixed = ""
    if backbone.always_masks_text is not None:
        stated = backbone.always_masks_text
        fixed = f"{backbone.pipeline_class.__name__} passes the padding mask {'always' if stated else 'never'}"
    expected = "true (BERT-style encoders are trained with the padding mask) or false (CLIP's without)"
    source = folder / "config.json"
    use_mask = _text_setting(cfg, "use_attention_mask", stated, source, "use_attention_mask", expected, fixed)
    encoder.config.use_attention_mask = bool(use_mask)
    tokenizer = load_tokenizer(cfg, backbone)
    positions = getattr(encoder.config, "max_position_embeddings", None)  # none for T5's relative positions
    if positions is not None and tokenizer.model_max_length > positions:
        raise ConfigError(
            f"prompts are padded to {tokenizer.model_max_length} tokens but the text encoder in {folder} has "
            f"{positions} positions; set model.text_encoder.max_length to at most {positions}"
            + (
                " (a PixArt-Σ pipeline pads to 300: its text encoder needs 300 positions)"
                if backbone.pipeline_max_length
                else ""
            )
        )
    return encoder, tokenizer


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
    """DDIM over the training schedule, with SD's sampling settings: the UNet's sampler, and for every backbone the
    steps grounding noises the real latent along (the paper's N-step DDIM schedule)."""
    return DDIMScheduler.from_config(noise_scheduler.config, clip_sample=False, set_alpha_to_one=False, steps_offset=1)


def denoiser_config(cfg: DictConfig, backbone: Backbone) -> DictConfig:
    """The backbone's section of ``model`` (``model.unet``, ``model.pixart``): its architecture and own folder."""
    return cfg[backbone.name]


def model_backbone(cfg: DictConfig) -> Backbone:
    """``model.backbone``, or the one ``model.pretrained``'s folder holds (``backbones.backbone_named``)."""
    pipeline_folder = resolve_model_folder(cfg.pretrained, "model.pretrained") if cfg.pretrained else None
    return backbone_named(cfg.backbone, pipeline_folder)


def build_diffusion_parts(cfg: DictConfig, resolution: int, vae_folder: Path | None = None) -> DiffusionParts:
    """All parts from ``model`` config; ``vae_folder`` (e.g. the autoencoder stage's output) wins over config."""
    backbone = model_backbone(cfg)
    text_encoder, tokenizer = load_text_encoder(cfg, backbone)
    if vae_folder is None:
        if cfg.vae.pretrained == "auto":
            raise ValueError("model.vae.pretrained=auto needs the folder written by the autoencoder stage")
        vae_folder = pretrained_vae_folder(cfg)
    vae = build_vae(cfg, resolution, vae_folder)
    factor = vae_downsampling_factor(vae)
    if resolution % factor:
        raise ValueError(f"data.resolution {resolution} is not divisible by the VAE's downsampling factor {factor}")
    own = denoiser_config(cfg, backbone)
    denoiser = backbone.build(
        own,
        _part_folder(own.pretrained, cfg.pretrained, backbone.part, f"model.{backbone.name}"),
        latent_size=resolution // factor,
        latent_channels=vae.config.latent_channels,
        text_width=text_encoder.config.hidden_size,
    )
    scheduler_folder = _part_folder(None, cfg.pretrained, "scheduler", "model.scheduler")
    noise_scheduler = build_noise_scheduler(cfg.scheduler, scheduler_folder, cfg.prediction_type)
    return DiffusionParts(backbone, denoiser, vae, text_encoder, tokenizer, noise_scheduler)
