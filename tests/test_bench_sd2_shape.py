"""bench/sd2_shape.py, the shared SD-2 shape of the rehearsal benches (a helper, not a script): the tiny shape keeps
SD-2's structure at 1/8 of its widths, and its parts go through write_pipeline and load_module into the module the
SD-2 preset builds, weights unchanged."""

import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

import sd2_shape  # noqa: E402


def test_tiny_shape_keeps_the_structure_at_an_eighth_of_the_widths():
    tiny, full = sd2_shape.TINY.unet_config(8), sd2_shape.SD2.unet_config(64)
    assert [f // t for f, t in zip(full["block_out_channels"], tiny["block_out_channels"], strict=True)] == [8] * 4
    for key in ("down_block_types", "up_block_types", "attention_head_dim", "cross_attention_dim", "layers_per_block"):
        assert tiny[key] == full[key]
    with torch.device("meta"):
        parts = {shape.name: sd2_shape.build_parts(shape, 64) for shape in (sd2_shape.TINY, sd2_shape.SD2)}
    unets = [sd2_shape.parameter_count(parts[shape.name].denoiser) for shape in (sd2_shape.TINY, sd2_shape.SD2)]
    # Convolutions and projections scale with width squared (64x); cross-attention's 1024-wide keys and values
    # only with the width (8x), so the tiny UNet keeps a little more than 1/64 of the parameters.
    assert 50 < unets[1] / unets[0] < 64
    with pytest.raises(ValueError, match="multiple of 64"):
        sd2_shape.build_parts(sd2_shape.TINY, 96)


def test_tiny_parts_load_as_the_sd2_preset_module_with_their_weights(tmp_path):
    parts = sd2_shape.build_parts(sd2_shape.TINY, 64)
    folder = sd2_shape.write_pipeline(parts, tmp_path / "pipeline")
    module, cfg = sd2_shape.load_module(folder, "learnable", sd2_shape.config_overrides(folder, 64, 2, False))
    assert cfg.data.resolution == 64 and cfg.train.text_feature_cache_size == 0
    assert list(cfg.model.trainable) == sd2_shape.trained_parts("learnable") == ["unet", "text_encoder"]
    for name in ("unet", "vae", "text_encoder"):
        written, loaded = parts.part(name).state_dict(), getattr(module, name).state_dict()
        assert written.keys() == loaded.keys()
        assert all(torch.equal(written[key], loaded[key]) for key in written)
    assert len(set(sd2_shape.captions(7))) == 7
