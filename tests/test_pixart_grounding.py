"""Phrase grounding on a PixArt-Σ transformer: cross-attention from its patch tokens (``attn2``) to T5 text tokens.

Each patch token's map covers its patch_size × patch_size latent cells exactly (``AttentionAccumulator.
to_latent_grid``); the recorded probabilities are those the transformer's SDPA computes under the T5 padding mask;
tokens are chosen on the phrase as PixArtSigmaPipeline rewrites it (lower-cased); the callbacks and ``evaluate.py
grounding`` run unchanged on a PixArt run.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from pathlib import Path

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from diffusers import PixArtTransformer2DModel
from PIL import Image

import evaluate
import grounding.phrase_grounding
import train
from configs import load_config
from datamodules.mscxr import read_ms_cxr
from grounding.attention_capture import capture_cross_attention
from grounding.phrase_grounding import HeatmapSettings, phrase_grounding_heatmaps
from lightning_modules.latent_diffusion import LatentDiffusionModule
from tests.test_grounding_callbacks import FAST_GROUNDING, METRIC_KEYS

SETTINGS = HeatmapSettings(num_inference_steps=3, last_k_steps=2)
PATCH_GRID = 4  # the tiny run: 32 px images, a VAE downsampling by 4, patch size 2
SHARP = 10.0  # query and key scale: a matching (query, key) pair scores 2 * SHARP**2 = 200, exp(-200) is 0 in float32


def tiny_pixart(overrides: list[str]) -> LatentDiffusionModule:
    """The tiny PixArt run's module with its evaluation weights, in eval mode (no dropout)."""
    module = LatentDiffusionModule.from_config(load_config([], overrides)).evaluation_only()
    assert isinstance(module.transformer, PixArtTransformer2DModel) and module.transformer.config.patch_size == 2
    return module


def tokens(module: LatentDiffusionModule, phrase: str) -> list[str]:
    """The unpadded T5 pieces the module conditions on for ``phrase``."""
    encoding = module._tokens([phrase])
    return module.tokenizer.convert_ids_to_tokens(encoding.input_ids[0][encoding.attention_mask[0].bool()])


def xrays(count: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(count, 3, 32, 32, generator=torch.Generator().manual_seed(seed)) * 2 - 1


# --------------------------------------------------------------------------------------------- known answer
@torch.no_grad()
def force_attention(module: LatentDiffusionModule, patches_per_piece: dict[str, list[tuple[int, int]]]) -> None:
    """Rewire the transformer and T5 so that each listed T5 piece takes all the cross-attention of its patches.

    Patch (row, col) of piece i gets the positional embedding e_i and nothing of the image (zero patch projection),
    so noise and image do not matter. T5 maps piece i to √32·e_i and every other token to 0 (embeddings zero but
    e_i, block outputs zero: its output is the RMS norm of the embedding); the caption projection passes T5's first
    channels through (GELU(√32) = √32 in float32); in every block attn2's query and key read channel i into dimension
    i of each head (× SHARP), and no attention or feed-forward writes to the residual stream, so every block's attn2
    sees the same patch tokens. A listed patch's query then meets one key, its piece's, at score 10 · 10√32 / √8 =
    200: probability 1. Any other patch's query is 0: uniform over the unmasked tokens. Padding gets exp(-10000) = 0
    from the mask bias PixArt builds.
    """
    transformer, text_encoder = module.transformer, module.text_encoder
    width = transformer.inner_dim
    head_width = width // transformer.config.num_attention_heads
    transformer.pos_embed.proj.weight.zero_()
    transformer.pos_embed.proj.bias.zero_()
    transformer.pos_embed.pos_embed.zero_()
    text_encoder.shared.weight.zero_()
    reads = torch.zeros(width, width)
    for channel, (piece, patches) in enumerate(patches_per_piece.items()):
        for row, col in patches:
            transformer.pos_embed.pos_embed[0, row * PATCH_GRID + col, channel] = 1.0
        text_encoder.shared.weight[module.tokenizer.convert_tokens_to_ids(piece), channel] = 1.0
        for head in range(transformer.config.num_attention_heads):
            reads[head * head_width + channel, channel] = SHARP
    for block in text_encoder.encoder.block:
        block.layer[0].SelfAttention.o.weight.zero_()
        block.layer[1].DenseReluDense.wo.weight.zero_()
    projection = transformer.caption_projection
    projection.linear_1.weight.copy_(torch.eye(width, projection.linear_1.in_features))
    projection.linear_2.weight.copy_(torch.eye(width))
    projection.linear_1.bias.zero_()
    projection.linear_2.bias.zero_()
    for block in transformer.transformer_blocks:
        for silenced in (block.attn1.to_out[0], block.attn2.to_out[0], block.ff.net[-1]):
            silenced.weight.zero_()
            silenced.bias.zero_()
        for projection_layer in (block.attn2.to_q, block.attn2.to_k):
            projection_layer.weight.copy_(reads)
            projection_layer.bias.zero_()


def test_attention_forced_onto_known_patches_gives_the_heatmap_drawn_by_hand(tiny_pixart_overrides):
    """Two phrases, each with one piece forced onto known patches of the 4 × 4 patch grid (8 × 8 latent cells):
    "small effusion" → "▁effusion" on patches (0, 1) and (2, 3); "left pneumothorax" → "▁pneumo" on patch (3, 0).
    A patch lights exactly its 2 × 2 latent cells (nearest), never its neighbours' (bilinear would)."""
    module = tiny_pixart(tiny_pixart_overrides)
    force_attention(module, {"▁effusion": [(0, 1), (2, 3)], "▁pneumo": [(3, 0)]})
    phrases = ["Small Effusion", "Left PNEUMOTHORAX"]  # lower-cased before tokenizing, as PixArtSigmaPipeline does
    assert tokens(module, phrases[0]) == ["▁s", "ma", "l", "l", "▁effusion", "</s>"]
    assert tokens(module, phrases[1]) == ["▁l", "ef", "t", "▁pneumo", "t", "ho", "ra", "x", "</s>"]

    heatmaps = phrase_grounding_heatmaps(module, xrays(2), phrases, ["Pleural Effusion", "Pneumothorax"], SETTINGS)

    # Drawn by hand. Effusion: its one token; 1 on its patches' cells, 1/6 (uniform over 6 tokens) elsewhere.
    effusion = torch.full((8, 8), 1 / 6)
    effusion[0:2, 2:4] = 1.0  # patch (0, 1)
    effusion[4:6, 6:8] = 1.0  # patch (2, 3)
    # Pneumothorax: the mean over its 5 pieces, of which "▁pneumo" takes patch (3, 0) whole: 1/5 there, 1/9 elsewhere.
    pneumothorax = torch.full((8, 8), 1 / 9)
    pneumothorax[6:8, 0:2] = 1 / 5  # patch (3, 0)
    torch.testing.assert_close(heatmaps, torch.stack([effusion, pneumothorax]), atol=1e-6, rtol=0)


# --------------------------------------------------------------------------------------------- SDPA's probabilities
class SdpaCrossAttention:
    """Spy on ``F.scaled_dot_product_attention`` inside the transformer's ``attn2`` layers: counts its calls there and
    keeps the probabilities it computes, read from SDPA itself (its output for an identity value matrix)."""

    def __init__(self, transformer: PixArtTransformer2DModel, monkeypatch: pytest.MonkeyPatch) -> None:
        self.inside_attn2 = False
        self.probabilities: list[torch.Tensor] = []
        sdpa = F.scaled_dot_product_attention

        def spy(query, key, value, attn_mask=None, **kwargs):
            if self.inside_attn2:
                identity = torch.eye(key.shape[-2]).expand(*key.shape[:-1], key.shape[-2])
                self.probabilities.append(sdpa(query, key, identity, attn_mask=attn_mask, **kwargs))
            return sdpa(query, key, value, attn_mask=attn_mask, **kwargs)

        monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
        for block in transformer.transformer_blocks:
            block.attn2.register_forward_pre_hook(lambda *_: setattr(self, "inside_attn2", True))
            block.attn2.register_forward_hook(lambda *_: setattr(self, "inside_attn2", False))


@torch.no_grad()
def test_recorded_probabilities_are_sdpas_under_the_padding_mask_and_the_output_is_unchanged(
    tiny_pixart_overrides, monkeypatch
):
    module = tiny_pixart(tiny_pixart_overrides)
    transformer, backbone = module.transformer, module.backbone
    phrases = ["small effusion", "moderate cardiomegaly"]  # 6 and 12 of 16 tokens: the rest is masked padding
    mask = module.text_mask(phrases)
    assert mask.sum(dim=1).tolist() == [6, 12]
    inputs = (
        torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1)),
        torch.tensor([500, 20]),
        module.evaluation_text_features(phrases),
        mask,
    )
    sdpa = SdpaCrossAttention(transformer, monkeypatch)
    plain = backbone.forward(transformer, *inputs)
    assert len(sdpa.probabilities) == 2  # one SDPA call per block's attn2
    with capture_cross_attention(transformer) as attention:
        captured = backbone.forward(transformer, *inputs)
    assert len(sdpa.probabilities) == 2  # recorded calls compute their own softmax, not SDPA's
    torch.testing.assert_close(captured, plain, atol=1e-5, rtol=0)

    # SDPA's (batch, heads, patches, tokens), averaged over heads and both layers, on the latent grid by hand.
    per_patch = torch.stack(sdpa.probabilities).mean(dim=(0, 2))
    expected = per_patch.transpose(1, 2).reshape(2, 16, PATCH_GRID, PATCH_GRID)
    expected = expected.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
    maps = attention.mean_maps()
    assert set(attention.recorded_layers.values()) == {(PATCH_GRID, PATCH_GRID)} and attention.num_recorded == 2
    torch.testing.assert_close(maps, expected, atol=1e-6, rtol=0)
    padding = ~mask.bool()
    assert maps.permute(0, 2, 3, 1)[padding[:, None, None, :].expand(-1, 8, 8, -1)].abs().max() < 1e-12
    torch.testing.assert_close(maps.sum(dim=1), torch.ones(2, 8, 8))


@torch.no_grad()
def test_unrecorded_steps_keep_sdpa_on_the_main_path(tiny_pixart_overrides, monkeypatch):
    module = tiny_pixart(tiny_pixart_overrides)
    transformer = module.transformer
    phrases = ["small effusion"]
    inputs = (torch.randn(1, 4, 8, 8), torch.tensor([500]), module.evaluation_text_features(phrases))
    inputs += (module.text_mask(phrases),)
    sdpa = SdpaCrossAttention(transformer, monkeypatch)
    with capture_cross_attention(transformer, steps={1}) as attention:
        attention.set_step(0)
        module.backbone.forward(transformer, *inputs)
        assert len(sdpa.probabilities) == 2 and attention.num_recorded == 0
        attention.set_step(1)
        module.backbone.forward(transformer, *inputs)
        assert len(sdpa.probabilities) == 2 and attention.num_recorded == 2


# --------------------------------------------------------------------------------------------- token selection
def test_a_phrases_heatmap_is_the_mean_over_its_query_words_t5_pieces(tiny_pixart_overrides, monkeypatch):
    module = tiny_pixart(tiny_pixart_overrides)
    accumulators = []
    real_capture = grounding.phrase_grounding.capture_cross_attention

    @contextmanager
    def keep_accumulator(*args, **kwargs):
        with real_capture(*args, **kwargs) as accumulator:
            accumulators.append(accumulator)
            yield accumulator

    monkeypatch.setattr(grounding.phrase_grounding, "capture_cross_attention", keep_accumulator)
    phrases = ["Small left Pleural Effusion", "Moderate Cardiomegaly"]
    heatmaps = phrase_grounding_heatmaps(module, xrays(2), phrases, ["Pleural Effusion", "Cardiomegaly"], SETTINGS)

    # The pieces of the lower-cased phrases; "Pleural", "Cardiomegaly" as written would be other pieces entirely.
    assert tokens(module, phrases[0]) == [
        "▁s", "ma", "l", "l", "▁l", "ef", "t", "▁p", "le", "u", "r", "al", "▁effusion", "</s>",
    ]  # fmt: skip
    assert tokens(module, phrases[1]) == ["▁", "mo", "d", "er", "ate", "▁cardio", "m", "e", "g", "al", "y", "</s>"]
    pleural_effusion, cardiomegaly = list(range(7, 13)), list(range(5, 11))
    (accumulator,) = accumulators
    maps = accumulator.mean_maps()
    torch.testing.assert_close(heatmaps[0], maps[0, pleural_effusion].mean(dim=0))
    torch.testing.assert_close(heatmaps[1], maps[1, cardiomegaly].mean(dim=0))


# --------------------------------------------------------------------------------------------- callbacks, evaluate.py
def test_grounding_callbacks_log_every_convention_and_the_panel_for_a_pixart_run(tiny_pixart_overrides, synthetic_root):
    outputs = train.main(
        [
            *tiny_pixart_overrides,
            *FAST_GROUNDING,
            "callbacks.fidelity.enabled=false",
            "callbacks.attention_heatmaps.num_items=3",
            "trainer.limit_val_batches=0",  # grounding only: no validation loss, no sample grids
            "callbacks.sample_grid.every_n_steps=1000",
            "callbacks.export_pipeline=false",
        ]
    )
    metrics = pd.read_csv(outputs["metrics"])
    logged = metrics.dropna(subset=["grounding/paper_code/auc"])
    assert logged["step"].tolist() == [2, 3]
    val_items = read_ms_cxr(synthetic_root / "MS_CXR_Local_Alignment_v1.1.0.csv", "val")
    assert (logged["grounding/count"] == len(val_items)).all()
    for key in METRIC_KEYS:
        for column in (f"grounding/{key}", f"grounding/{key}/macro"):
            assert logged[column].notna().all(), column
        if not key.endswith("/cnr"):
            assert logged[f"grounding/{key}"].between(0, 1).all(), key
    grids = sorted((outputs["run_dir"] / "images").glob("grounding_heatmaps_step*.png"))
    assert [path.name for path in grids] == ["grounding_heatmaps_step000002.png", "grounding_heatmaps_step000003.png"]
    with Image.open(grids[-1]) as grid:
        assert grid.size == (4 * 128, math.ceil(2 * 3 / 4) * (128 + 30))


def grounding_summary(model: Path, data_root: Path, out: Path) -> dict:
    argv = ["grounding", "--model", str(model), "--data-root", str(data_root), "--split", "val", "--out", str(out)]
    fast = ["grounding.num_inference_steps=3", "grounding.last_k_steps=2", "grounding.batch_size=5"]
    args = evaluate.build_parser().parse_args([*argv, *fast])
    return args.run(args)


def test_evaluate_grounding_gives_the_same_numbers_on_the_checkpoint_and_the_exported_pipeline(
    tiny_pixart_overrides, synthetic_root, tmp_path
):
    # 64 tokens hold every val phrase: the exported folder conditions as PixArtSigmaPipeline does (300 tokens, masked),
    # the checkpoint as its run (model.text_encoder.max_length), which only agree on phrases neither truncates.
    no_evaluation = [f"callbacks.{name}.enabled=false" for name in ("grounding", "attention_heatmaps", "fidelity")]
    quick = ["trainer.max_steps=1", "trainer.limit_val_batches=0", "train.checkpointing_steps=null"]
    run = train.main([*tiny_pixart_overrides, "model.text_encoder.max_length=64", *no_evaluation, *quick])
    assert (run["pipeline"] / "transformer" / "config.json").is_file()
    from_checkpoint = grounding_summary(run["checkpoint"], synthetic_root, tmp_path / "checkpoint")
    from_pipeline = grounding_summary(run["pipeline"], synthetic_root, tmp_path / "pipeline")

    assert from_checkpoint["count"] == from_pipeline["count"] == 5
    for name, value in from_checkpoint["overall"].items():
        assert from_pipeline["overall"][name] == pytest.approx(value, abs=1e-5), name
    rows = [pd.read_csv(tmp_path / folder / "per_sample.csv") for folder in ("checkpoint", "pipeline")]
    pd.testing.assert_frame_equal(rows[0], rows[1], atol=1e-5)
