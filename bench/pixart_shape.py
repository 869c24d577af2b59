"""PixArt-Σ 512, built with random weights from its published configuration (nothing is downloaded).

The PixArt counterpart of ``bench/sd2_shape.py``, shared by the rehearsal benches and ``bench/training_memory.py``.
``SIGMA`` is the real shape: the transformer of PixArt-alpha/PixArt-Sigma-XL-2-512-MS and the T5 encoder, SDXL VAE
and scheduler that model's card loads from PixArt-alpha/pixart_sigma_sdxlvae_T5_diffusers (the 512 px repository
holds only ``transformer/``). ``TINY`` keeps the structure (16 heads, ada-norm-single blocks with self- and
cross-attention, learned-sigma output, a T5 encoder with gated-GELU feed-forward and relative position buckets, a
4-block VAE) at widths that run in seconds.

Published parameter counts, matched exactly by what is built here (``tests/test_bench_pixart_shape.py``):

- transformer 610,856,096: the published ``transformer/diffusion_pytorch_model.safetensors`` of the 512 px model is
  2,443,492,488 bytes (its Git LFS pointer, commit 1429642), which is 4 bytes x 610,856,096 plus a 68,104-byte
  safetensors header, and the file diffusers writes from this model is that size to the byte (the test rebuilds the
  header from the meta model's tensor names and shapes). The paper rounds it to "0.6B parameters".
- T5 v1.1 XXL encoder 4,762,310,656: the count of its config by hand (embedding 32128 x 4096; 24 layers of four
  4096 x 4096 attention projections, three 4096 x 10240 gated-GELU projections and two norms; relative attention
  bias 32 x 64; final norm), which the PixArt text encoder's two fp32 shards (9.99 + 9.06 GB) match; Hugging Face
  shows it as 4.76B.
- SDXL VAE 83,653,863: the SD VAE's architecture (``sd2_shape.SD2_VAE``), 335 MB in fp32 in the PixArt folder.

The project's own code then takes over, as for SD-2: ``write_pipeline`` saves a diffusers ``PixArtSigmaPipeline``
folder (model_index.json, transformer/, vae/, text_encoder/, tokenizer/, scheduler/) and ``load_module`` builds the
module with ``LatentDiffusionModule.from_config`` from the PixArt-Σ preset and a variant preset, as ``train.py``
would; ``meta_module`` is the same module on the meta device, for FLOP counts.

Deliberate differences from the published folders: random weights; the tokenizer is a tiny offline T5-style
Unigram tokenizer (``bench/offline_tokenizer.py``) instead of T5's 32,100-piece SentencePiece model, while the real
shape's embedding keeps all 32,128 rows so that the parameter count is T5-XXL's; ``use_additional_conditions`` is
written as false (the 512 px config leaves it out and diffusers derives false from ``sample_size`` 64);
``sample_size`` follows the resolution built for (64 at 512 px, as published); and ``Shape.text_encoder_dtype`` may
store the text encoder in bf16 (9.5 GB for T5-XXL instead of 19 GB: the only way a frozen T5-XXL fits beside the
transformer's training state in this machine's 24 GB; transformers loads a folder in the dtype it was saved in).
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from unittest.mock import patch

import torch
from diffusers import (
    AutoencoderKL,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    PixArtTransformer2DModel,
)
from offline_tokenizer import build_t5_style_unigram
from omegaconf import DictConfig
from sd2_shape import SD2_VAE, TOKENIZER_TEXT, VAE_FACTOR, module_on_meta
from sd2_shape import write_pipeline as sd2_write_pipeline
from transformers import T5Config, T5EncoderModel, masking_utils

from configs import load_config
from lightning_modules.backbones.pixart import PixArtBackbone
from lightning_modules.components import DiffusionParts
from lightning_modules.latent_diffusion import LatentDiffusionModule

PIXART_PRESET = "experiment/pixart_sigma"
VARIANTS = {"frozen": "experiment/pixart_frozen_text_encoder", "learnable": "experiment/pixart_learnable_text_encoder"}
TOKENS = 300  # PixArt-Σ's caption length: model_max_length of its configs, PixArtSigmaPipeline's max_sequence_length
PATCH = 2

# transformer/config.json of PixArt-alpha/PixArt-Sigma-XL-2-512-MS (commit 1429642, "Upload PixArt-Sigma-512px
# diffusers"): the 1024 px model's config but for sample_size 64 (= 512 px through the 8x VAE) and
# interpolation_scale 1 (positional embeddings of a 32 x 32 patch grid at base size).
SIGMA_TRANSFORMER = {
    "sample_size": 64,
    "patch_size": PATCH,
    "in_channels": 4,
    "out_channels": 8,  # learned sigma: epsilon and the variance interpolation, 4 channels each
    "num_layers": 28,
    "num_attention_heads": 16,
    "attention_head_dim": 72,  # 16 x 72 = 1152 wide
    "cross_attention_dim": 1152,
    "caption_channels": 4096,  # T5-XXL's d_model, projected to 1152 by the caption projection
    "norm_type": "ada_norm_single",
    "num_embeds_ada_norm": 1000,
    "norm_elementwise_affine": False,
    "norm_eps": 1e-6,
    "norm_num_groups": 32,
    "attention_bias": True,
    "activation_fn": "gelu-approximate",
    "dropout": 0.0,
    "upcast_attention": False,
    "attention_type": "default",
    "interpolation_scale": 1,
    "use_additional_conditions": False,  # not in the 512 px config; diffusers derives False from sample_size 64
}
# text_encoder/config.json of PixArt-alpha/pixart_sigma_sdxlvae_T5_diffusers, the encoder of google/t5-v1_1-xxl
# (its config.json: d_model 4096, d_ff 10240, d_kv 64, 64 heads, 24 layers, gated-gelu, vocab 32128, untied).
SIGMA_TEXT_ENCODER = {
    "vocab_size": 32128,
    "d_model": 4096,
    "d_ff": 10240,
    "d_kv": 64,
    "num_heads": 64,
    "num_layers": 24,
    "feed_forward_proj": "gated-gelu",
    "relative_attention_num_buckets": 32,
    "relative_attention_max_distance": 128,
    "layer_norm_epsilon": 1e-6,
    "dropout_rate": 0.1,
    "tie_word_embeddings": False,
}
# vae/config.json of pixart_sigma_sdxlvae_T5_diffusers: the SDXL VAE, the SD VAE's architecture with SDXL's latent
# scale (PixArt-sigma's 512 px training config: scale_factor = 0.13025) and no fp32 upcast.
SIGMA_VAE = SD2_VAE | {"scaling_factor": 0.13025, "force_upcast": False}
# scheduler/scheduler_config.json of both PixArt-Σ folders: DPM-Solver++ over the linear schedule PixArt trained
# with (PixArt-sigma's IDDPM: "linear" betas 1e-4 to 0.02 over 1000 steps, epsilon mean, learned-range variance;
# the sampler takes the epsilon half of the 8 output channels, so variance_type stays unset).
SIGMA_SCHEDULER = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "prediction_type": "epsilon",
    "algorithm_type": "dpmsolver++",
    "solver_order": 2,
    "solver_type": "midpoint",
    "lower_order_final": True,
    "timestep_spacing": "linspace",
    "steps_offset": 0,
    "variance_type": None,
}
PUBLISHED_PARAMETERS = {"transformer": 610_856_096, "text_encoder": 4_762_310_656, "vae": 83_653_863}
PUBLISHED_TRANSFORMER_FILE_BYTES = 2_443_492_488  # transformer/diffusion_pytorch_model.safetensors, fp32


@dataclass(frozen=True)
class Shape:
    """How far PixArt-Σ is shrunk: layer counts and widths; the transformer's 16 heads and the block types stay."""

    name: str
    layers: int = SIGMA_TRANSFORMER["num_layers"]
    head_dim: int = SIGMA_TRANSFORMER["attention_head_dim"]  # transformer width = 16 heads x this
    text_width: int = SIGMA_TEXT_ENCODER["d_model"]  # = the transformer's caption_channels
    text_ff: int = SIGMA_TEXT_ENCODER["d_ff"]
    text_heads: int = SIGMA_TEXT_ENCODER["num_heads"]
    text_head_dim: int = SIGMA_TEXT_ENCODER["d_kv"]
    text_layers: int = SIGMA_TEXT_ENCODER["num_layers"]
    vae_width_divisor: int = 1
    norm_num_groups: int = 32  # the VAE's
    full_vocabulary: bool = True  # False: the embedding table is only as large as the offline tokenizer
    text_encoder_dtype: torch.dtype = torch.float32  # of its stored weights (bf16: half the memory, frozen only)

    def transformer_config(self, resolution: int) -> dict:
        width = SIGMA_TRANSFORMER["num_attention_heads"] * self.head_dim
        return SIGMA_TRANSFORMER | {
            "sample_size": resolution // VAE_FACTOR,
            "num_layers": self.layers,
            "attention_head_dim": self.head_dim,
            "cross_attention_dim": width,
            "caption_channels": self.text_width,
        }

    def text_encoder_config(self, tokenizer_size: int) -> T5Config:
        """T5's special ids (pad 0 = decoder start, eos 1) as in its config; ``tokenizer_size`` is the table's
        height when the vocabulary is not the full one."""
        vocab_size = SIGMA_TEXT_ENCODER["vocab_size"] if self.full_vocabulary else tokenizer_size
        sizes = {
            "vocab_size": vocab_size,
            "d_model": self.text_width,
            "d_ff": self.text_ff,
            "num_heads": self.text_heads,
            "d_kv": self.text_head_dim,
            "num_layers": self.text_layers,
        }
        return T5Config(**(SIGMA_TEXT_ENCODER | sizes), pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)

    def vae_config(self, resolution: int) -> dict:
        channels = tuple(c // self.vae_width_divisor for c in SIGMA_VAE["block_out_channels"])
        return SIGMA_VAE | {
            "block_out_channels": channels,
            "norm_num_groups": self.norm_num_groups,
            "sample_size": resolution,
        }


SIGMA = Shape("PixArt-Σ 512")
TINY = Shape(
    "PixArt-Σ structure, tiny widths",
    layers=2,
    head_dim=4,
    text_width=32,
    text_ff=80,
    text_heads=4,
    text_head_dim=8,
    text_layers=2,
    vae_width_divisor=8,
    norm_num_groups=8,
    full_vocabulary=False,
)


def check_resolution(resolution: int) -> None:
    multiple = VAE_FACTOR * PATCH
    if resolution % multiple:
        raise ValueError(f"resolution must be a multiple of {multiple} (VAE x patch), got {resolution}")


def build_transformer(shape: Shape, resolution: int) -> PixArtTransformer2DModel:
    check_resolution(resolution)
    return PixArtTransformer2DModel(**shape.transformer_config(resolution))


def build_text_encoder(shape: Shape, tokenizer_size: int) -> T5EncoderModel:
    """Initialised in ``shape.text_encoder_dtype`` directly: a T5-XXL never exists in fp32 when bf16 is asked."""
    return T5EncoderModel._from_config(shape.text_encoder_config(tokenizer_size), dtype=shape.text_encoder_dtype)


def build_vae(shape: Shape, resolution: int) -> AutoencoderKL:
    return AutoencoderKL(**shape.vae_config(resolution))


def build_scheduler() -> DPMSolverMultistepScheduler:
    return DPMSolverMultistepScheduler(**SIGMA_SCHEDULER)


def build_parts(shape: Shape, resolution: int, seed: int = 0) -> DiffusionParts:
    """Randomly initialised parts of ``shape`` for ``resolution`` px images (under ``torch.device('meta')``: free).
    The training schedule is the published scheduler's config read by a ``DDPMScheduler``, as the project loads it."""
    torch.manual_seed(seed)
    tokenizer = build_t5_style_unigram(TOKENIZER_TEXT * 3, model_max_length=TOKENS)
    text_encoder = build_text_encoder(shape, len(tokenizer))
    text_encoder.config.use_attention_mask = True  # as the project loads it: PixArtSigmaPipeline always masks
    with torch.device("cpu"):  # a table, not a weight: on the CPU as the project builds it, also for a meta module
        noise_scheduler = DDPMScheduler.from_config(SIGMA_SCHEDULER)
    return DiffusionParts(
        backbone=PixArtBackbone(),
        denoiser=build_transformer(shape, resolution),
        vae=build_vae(shape, resolution),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        noise_scheduler=noise_scheduler,
    )


def write_pipeline(parts: DiffusionParts, folder: Path) -> Path:
    """A diffusers PixArtSigmaPipeline folder with the published scheduler, the layout ``model.pretrained`` expects."""
    return sd2_write_pipeline(parts, folder, build_scheduler())


def load_module(folder: Path, variant: str, overrides: Sequence[str]) -> tuple[LatentDiffusionModule, object]:
    """The module and config ``train.py --config experiment/pixart_sigma --config <variant>`` builds."""
    cfg = load_config([PIXART_PRESET, VARIANTS[variant]], list(overrides))
    return LatentDiffusionModule.from_config(cfg), cfg


@cache
def variant_config(variant: str) -> DictConfig:
    """The PixArt-Σ preset with a variant, without a folder (read once: FLOP counts build many meta modules)."""
    return load_config([PIXART_PRESET, VARIANTS[variant]], ["model.pretrained=unused"])


def trained_parts(variant: str) -> list[str]:
    return list(variant_config(variant).model.trainable)


def meta_module(shape: Shape, resolution: int, variant: str, gradient_checkpointing: bool) -> LatentDiffusionModule:
    """The same module on the meta device: no memory, no arithmetic; FLOPs at any resolution in seconds."""
    with meta_padding_masks():  # the module's start-up probe runs a trained text encoder
        return module_on_meta(lambda: build_parts(shape, resolution), variant_config(variant), gradient_checkpointing)


@contextmanager
def meta_padding_masks() -> Iterator[None]:
    """transformers drops a padding mask that masks nothing after reading it (``mask.all()``: T5 under SDPA), which a
    meta tensor cannot answer; on meta the mask is kept, as in the real runs, whose captions are padded."""
    can_skip = masking_utils._ignore_bidirectional_mask_sdpa

    def skip(padding_mask: torch.Tensor | None, *args, **kwargs) -> bool:
        if padding_mask is not None and padding_mask.is_meta:
            return False
        return can_skip(padding_mask, *args, **kwargs)

    with patch.object(masking_utils, "_ignore_bidirectional_mask_sdpa", skip):
        yield
