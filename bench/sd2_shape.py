"""Stable Diffusion 2 base, built with random weights from its published configuration (nothing is downloaded).

Shared by ``bench/real_shape_rehearsal.py`` and ``bench/gpu_rehearsal.py``. ``SD2`` is the real shape, as in the
``unet/``, ``text_encoder/``, ``vae/`` and ``scheduler/`` config files of stabilityai/stable-diffusion-2-base;
``TINY`` keeps its structure (four down blocks, linear projection, per-block head counts, 1024-wide
cross-attention, a CLIP text encoder) at widths that run in seconds. The project's own code then takes over:
``write_pipeline`` saves a diffusers folder and ``load_module`` builds the module with
``LatentDiffusionModule.from_config`` from the SD-2 preset, exactly as ``train.py`` would.

diffusers reads ``attention_head_dim`` of UNet2DConditionModel as the number of heads (a naming slip it keeps for
compatibility): SD-2's [5, 10, 20, 20] means 5/10/20/20 heads of 64 channels each.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from unittest.mock import patch

import lightning as L
import torch
from diffusers import AutoencoderKL, DDPMScheduler, SchedulerMixin, UNet2DConditionModel
from offline_tokenizer import build_byte_level_bpe
from omegaconf import DictConfig
from train_throughput import quiet_lightning
from transformers import CLIPTextConfig, CLIPTextModel, PreTrainedTokenizerFast

from configs import load_config
from lightning_modules.backbones.unet import UNetBackbone
from lightning_modules.components import SD_LATENT_SCALE, DiffusionParts
from lightning_modules.latent_diffusion import LatentDiffusionModule

SD2_PRESET = "experiment/stable_diffusion_2_base"
VARIANTS = {"frozen": "experiment/frozen_text_encoder", "learnable": "experiment/learnable_text_encoder"}
TOKENS = 77  # CLIP's context: every caption is padded to it
VAE_FACTOR = 8  # the SD VAE's down-sampling (three of its four blocks halve)

# stabilityai/stable-diffusion-2-base, unet/config.json (sample_size 64 = 512 px through the 8x VAE).
SD2_UNET = {
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": (320, 640, 1280, 1280),
    "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    "layers_per_block": 2,
    "attention_head_dim": (5, 10, 20, 20),  # diffusers: heads per block (64 channels each at full width)
    "cross_attention_dim": 1024,
    "use_linear_projection": True,
    "norm_num_groups": 32,
    "sample_size": 64,
}
# text_encoder/config.json: the OpenCLIP ViT-H/14 text tower (penultimate layer; 23 of its 24 layers kept).
SD2_TEXT_ENCODER = {
    "vocab_size": 49408,
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 23,
    "num_attention_heads": 16,
    "max_position_embeddings": TOKENS,
    "hidden_act": "gelu",
    "projection_dim": 512,
}
# vae/config.json: the SD VAE (8x down-sampling, 4 latent channels).
SD2_VAE = {
    "in_channels": 3,
    "out_channels": 3,
    "block_out_channels": (128, 256, 512, 512),
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "layers_per_block": 2,
    "latent_channels": 4,
    "norm_num_groups": 32,
    "scaling_factor": SD_LATENT_SCALE,
}
# scheduler/scheduler_config.json (SD-2 base predicts epsilon; the 768 px SD-2 predicts v).
SD2_SCHEDULER = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon",
    "clip_sample": False,
    "steps_offset": 1,
}
# Dense bf16 tensor-core peaks (without 2:4 sparsity), FLOP/s, from NVIDIA's datasheets: "NVIDIA A100 Tensor Core
# GPU" (312 TFLOPS, SXM and PCIe), "NVIDIA H100 Tensor Core GPU" (SXM 1,979 and PCIe 1,513 TFLOPS with sparsity,
# half that dense) and "NVIDIA H200 Tensor Core GPU" (H200 SXM: 1,979 with sparsity, the H100 SXM's compute).
BF16_DENSE_PEAK = {"A100": 312e12, "H100 SXM": 989e12, "H100 PCIe": 756e12, "H200": 989e12}
TOKENIZER_TEXT = [
    "no acute cardiopulmonary process. the lungs are clear.",
    "small left pleural effusion with adjacent atelectasis.",
    "moderate cardiomegaly and mild pulmonary edema.",
    "right upper lobe consolidation concerning for pneumonia.",
    "left apical pneumothorax. large right pleural effusion.",
]


@dataclass(frozen=True)
class Shape:
    """How far the model is shrunk from SD-2: widths divided, head counts and block structure kept."""

    name: str
    width_divisor: int = 1  # UNet and VAE channels / this; UNet head counts stay, so the head size shrinks
    text_layers: int = SD2_TEXT_ENCODER["num_hidden_layers"]
    norm_num_groups: int = 32
    full_vocabulary: bool = True  # False: the embedding table is only as large as the offline tokenizer

    def unet_config(self, latent_size: int) -> dict:
        channels = tuple(c // self.width_divisor for c in SD2_UNET["block_out_channels"])
        return SD2_UNET | {
            "block_out_channels": channels,
            "norm_num_groups": self.norm_num_groups,
            "sample_size": latent_size,
        }

    def vae_config(self, resolution: int) -> dict:
        channels = tuple(c // self.width_divisor for c in SD2_VAE["block_out_channels"])
        return SD2_VAE | {
            "block_out_channels": channels,
            "norm_num_groups": self.norm_num_groups,
            "sample_size": resolution,
        }

    def text_encoder_config(self, tokenizer: PreTrainedTokenizerFast) -> CLIPTextConfig:
        vocab_size = SD2_TEXT_ENCODER["vocab_size"] if self.full_vocabulary else len(tokenizer)
        return CLIPTextConfig(
            **(SD2_TEXT_ENCODER | {"num_hidden_layers": self.text_layers, "vocab_size": vocab_size}),
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )


SD2 = Shape("SD-2 base")
TINY = Shape("SD-2 structure, tiny widths", width_divisor=8, text_layers=2, norm_num_groups=8, full_vocabulary=False)


def quiet_process(threads: int | None) -> None:
    """What both SD-2-shape benches set first: quiet Lightning and diffusers, and the CPU thread count if given."""
    quiet_lightning()
    warnings.filterwarnings("ignore", message=".*low cpu memory usage.*")
    if threads:
        torch.set_num_threads(threads)


def build_parts(shape: Shape, resolution: int, seed: int = 0) -> DiffusionParts:
    """Randomly initialised parts of ``shape`` for ``resolution`` px images (under ``torch.device('meta')``: free)."""
    if resolution % (VAE_FACTOR * 8):
        multiple = VAE_FACTOR * 8  # the VAE's and the UNet's three halvings
        raise ValueError(f"resolution must be a multiple of {multiple}, got {resolution}")
    torch.manual_seed(seed)
    tokenizer = build_byte_level_bpe(TOKENIZER_TEXT * 3, pad_token="<|endoftext|>")
    tokenizer.model_max_length = TOKENS
    return DiffusionParts(
        backbone=UNetBackbone(),
        denoiser=UNet2DConditionModel(**shape.unet_config(resolution // VAE_FACTOR)),
        vae=AutoencoderKL(**shape.vae_config(resolution)),
        text_encoder=CLIPTextModel(shape.text_encoder_config(tokenizer)),
        tokenizer=tokenizer,
        noise_scheduler=DDPMScheduler(**SD2_SCHEDULER),
    )


def write_pipeline(parts: DiffusionParts, folder: Path, scheduler: SchedulerMixin | None = None) -> Path:
    """The parts' backbone's diffusers pipeline folder (StableDiffusionPipeline for SD-2), the layout
    ``model.pretrained`` expects; ``scheduler`` (default: the parts' noise schedule) is the one the folder ships."""
    pipeline = parts.backbone.pipeline(parts.denoiser, parts, scheduler or parts.noise_scheduler)
    pipeline.save_pretrained(folder, safe_serialization=True)
    return folder


def config_overrides(folder: Path, resolution: int, batch_size: int, gradient_checkpointing: bool) -> list[str]:
    return [
        f"model.pretrained={folder}",
        f"data.resolution={resolution}",
        f"data.batch_size={batch_size}",
        f"model.gradient_checkpointing={str(gradient_checkpointing).lower()}",
        # Every step encodes its captions (MIMIC impressions are mostly unique): FLOPs do not depend on cache hits.
        "train.text_feature_cache_size=0",
    ]


def load_module(folder: Path, variant: str, overrides: Sequence[str]) -> tuple[LatentDiffusionModule, object]:
    """The module and config ``train.py --config experiment/stable_diffusion_2_base --config <variant>`` builds."""
    cfg = load_config([SD2_PRESET, VARIANTS[variant]], list(overrides))
    return LatentDiffusionModule.from_config(cfg), cfg


def trained_parts(variant: str) -> list[str]:
    return list(load_config([VARIANTS[variant]]).model.trainable)


def meta_module(shape: Shape, resolution: int, variant: str, gradient_checkpointing: bool) -> LatentDiffusionModule:
    """The same module on the meta device: no memory, no arithmetic; FLOPs at any resolution in seconds."""
    cfg = load_config([SD2_PRESET, VARIANTS[variant]], ["model.pretrained=unused"])
    return module_on_meta(lambda: build_parts(shape, resolution), cfg, gradient_checkpointing)


def module_on_meta(
    build: Callable[[], DiffusionParts], cfg: DictConfig, gradient_checkpointing: bool
) -> LatentDiffusionModule:
    """The module of ``build()``'s parts with ``cfg``'s trained parts and rates, built on the meta device."""
    with torch.device("meta"):
        parts = build()
    module = LatentDiffusionModule(
        parts,
        trainable=list(cfg.model.trainable),
        learning_rates=dict(cfg.train.learning_rate),
        use_ema=False,
        gradient_checkpointing=gradient_checkpointing,
        text_feature_cache_size=0,
    )
    return module.to("meta")


@contextmanager
def meta_autocast() -> Iterator[None]:
    """torch.autocast knows no meta device, so the module's float32 regions (``autocast(..., enabled=False)``)
    raise there; on meta, where nothing is computed, they become no-ops."""
    real_autocast = torch.autocast

    def autocast(device_type: str, *args, **kwargs):
        return nullcontext() if device_type == "meta" else real_autocast(device_type, *args, **kwargs)

    with patch.object(torch, "autocast", autocast):
        yield


def parameter_count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def captions(count: int, offset: int = 0) -> list[str]:
    """Distinct report-like captions (a cache, were one on, would never hit)."""
    return [f"{TOKENIZER_TEXT[(offset + i) % len(TOKENIZER_TEXT)]} study {offset + i}." for i in range(count)]


# --------------------------------------------------------------------------------------------- measuring
def bf16_dense_peak(device_name: str) -> tuple[str, float] | None:
    """The ``BF16_DENSE_PEAK`` row of a GPU named as ``torch.cuda.get_device_name`` names it (an H100 SXM board
    calls itself "NVIDIA H100 80GB HBM3"); None for what the table lacks (NVL boards, other GPUs, the CPU)."""
    if "A100" in device_name:
        row = "A100"
    elif "H100" in device_name and "PCIe" in device_name:
        row = "H100 PCIe"
    elif "H100" in device_name and ("HBM3" in device_name or "SXM" in device_name):
        row = "H100 SXM"
    elif "H200" in device_name and "NVL" not in device_name:
        row = "H200"
    else:
        return None
    return row, BF16_DENSE_PEAK[row]


class PeakMemory:
    """Peak memory of a phase: CUDA's allocator peak on a GPU, else the process's peak resident set (VmHWM),
    which Linux lets a process reset (``/proc/self/clear_refs``)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            Path("/proc/self/clear_refs").write_text("5")

    def peak_bytes(self) -> int:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device)
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("no VmHWM line in /proc/self/status")

    @property
    def what(self) -> str:
        return "torch.cuda.max_memory_allocated" if self.device.type == "cuda" else "peak RSS (VmHWM)"


def clock(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


class StepClock(L.Callback):
    """Wall seconds of every training step (batch start to batch end, optimizer and EMA included)."""

    def __init__(self) -> None:
        self.seconds: list[float] = []
        self._start = 0.0

    def on_train_batch_start(self, trainer: L.Trainer, pl_module, batch, batch_idx: int) -> None:
        self._start = clock(pl_module.device)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        self.seconds.append(clock(pl_module.device) - self._start)
