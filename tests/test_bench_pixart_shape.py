"""bench/pixart_shape.py, PixArt-Σ 512 from its published configuration (a helper, not a script): built on the meta
device, each part has exactly its published parameter count, and the transformer's safetensors file would be the
published one to the byte; the tiny shape keeps the structure, and its parts go through write_pipeline (a folder
diffusers' PixArtSigmaPipeline loads) and load_module into the module the PixArt-Σ preset builds, weights
unchanged."""

import json
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

import pixart_shape  # noqa: E402
import sd2_shape  # noqa: E402
from diffusers import PixArtSigmaPipeline  # noqa: E402
from pixart_shape import SIGMA, TINY  # noqa: E402


def parameter_count(module: torch.nn.Module) -> int:
    return sum(parameter.numel() for parameter in module.parameters())


def safetensors_bytes(module: torch.nn.Module) -> int:
    """Size of the fp32 safetensors file diffusers writes for ``module``, from tensor names and shapes alone: an
    8-byte header length, the JSON header (tensors sorted by name, diffusers' {"format": "pt"} metadata) padded
    with spaces to 8 bytes, then the data."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, tensor in sorted(module.state_dict().items()):
        size = tensor.numel() * 4
        header[name] = {"dtype": "F32", "shape": list(tensor.shape), "data_offsets": [offset, offset + size]}
        offset += size
    length = len(json.dumps(header, separators=(",", ":")).encode())
    return 8 + length + (-length % 8) + offset


@pytest.fixture(scope="module")
def sigma_parts() -> dict[str, torch.nn.Module]:
    with torch.device("meta"):
        return {
            "transformer": pixart_shape.build_transformer(SIGMA, 512),
            "text_encoder": pixart_shape.build_text_encoder(SIGMA, tokenizer_size=100),
            "vae": pixart_shape.build_vae(SIGMA, 512),
        }


def test_every_part_has_its_published_parameter_count(sigma_parts):
    counts = {name: parameter_count(part) for name, part in sigma_parts.items()}
    assert counts == {"transformer": 610_856_096, "text_encoder": 4_762_310_656, "vae": 83_653_863}
    assert counts == pixart_shape.PUBLISHED_PARAMETERS
    # T5-XXL's encoder by hand from its config: the full 32,128-row table although the tokenizer has 100 entries.
    d, ff, layers, vocab = 4096, 10240, 24, 32128
    per_layer = 4 * d * d + 3 * d * ff + 2 * d  # q, k, v, o; gated-GELU wi_0, wi_1, wo; two RMS norms
    assert counts["text_encoder"] == vocab * d + layers * per_layer + 32 * 64 + d  # + relative bias, final norm


def test_the_transformer_file_is_the_published_one_to_the_byte(sigma_parts, tmp_path):
    tiny = pixart_shape.build_transformer(TINY, 64)
    tiny.save_pretrained(tmp_path)
    assert (tmp_path / "diffusion_pytorch_model.safetensors").stat().st_size == safetensors_bytes(tiny)
    full = sigma_parts["transformer"]
    # PixArt-Sigma-XL-2-512-MS, transformer/diffusion_pytorch_model.safetensors (Git LFS pointer, commit 1429642).
    assert safetensors_bytes(full) == pixart_shape.PUBLISHED_TRANSFORMER_FILE_BYTES == 2_443_492_488
    config = full.config
    assert (config.sample_size, config.interpolation_scale, config.out_channels) == (64, 1, 8)
    assert full.use_additional_conditions is False  # the 512 px model has no resolution / aspect-ratio embedding
    block = full.transformer_blocks[0]
    assert (block.attn1.heads, block.attn2.heads, block.attn2.inner_dim, block.attn2.to_k.in_features) == (
        16,
        16,
        1152,
        1152,
    )
    assert full.caption_projection.linear_1.in_features == 4096


def test_tiny_shape_keeps_the_structure(sigma_parts):
    with torch.device("meta"):
        tiny = {
            "transformer": pixart_shape.build_transformer(TINY, 64),
            "text_encoder": pixart_shape.build_text_encoder(TINY, tokenizer_size=100),
            "vae": pixart_shape.build_vae(TINY, 64),
        }
    for name in ("transformer", "vae"):
        kinds = {type(module).__name__ for module in tiny[name].modules()}
        assert kinds == {type(module).__name__ for module in sigma_parts[name].modules()}, name
    tiny_block, full_block = tiny["transformer"].transformer_blocks[0], sigma_parts["transformer"].transformer_blocks[0]
    assert tiny_block.attn2.heads == full_block.attn2.heads == 16
    assert tiny["transformer"].config.out_channels == 8
    assert tiny["transformer"].caption_projection.linear_1.in_features == tiny["text_encoder"].config.d_model
    assert tiny["text_encoder"].config.is_gated_act and tiny["text_encoder"].config.dense_act_fn == "gelu_new"
    assert tiny["text_encoder"].config.vocab_size == 100  # the offline tokenizer's size, not T5's 32,128
    assert parameter_count(tiny["transformer"]) < 1e6 and parameter_count(tiny["text_encoder"]) < 1e5
    with pytest.raises(ValueError, match="multiple of 16"):
        pixart_shape.build_transformer(TINY, 72)


def test_tiny_parts_load_as_the_pixart_sigma_preset_module_with_their_weights(tmp_path):
    parts = pixart_shape.build_parts(TINY, 64)
    folder = pixart_shape.write_pipeline(parts, tmp_path / "pipeline")
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "PixArtSigmaPipeline"
    assert index["transformer"] == ["diffusers", "PixArtTransformer2DModel"]
    assert index["text_encoder"] == ["transformers", "T5EncoderModel"]
    reference = PixArtSigmaPipeline.from_pretrained(folder, local_files_only=True)  # diffusers' own loader
    assert type(reference.scheduler).__name__ == "DPMSolverMultistepScheduler"
    assert (reference.scheduler.config.beta_schedule, reference.scheduler.config.beta_end) == ("linear", 0.02)
    overrides = [*sd2_shape.config_overrides(folder, 64, 2, False), "trainer.accelerator=cpu"]
    module, cfg = pixart_shape.load_module(folder, "learnable", overrides)
    assert module.backbone.name == "pixart" and cfg.data.resolution == 64
    assert list(cfg.model.trainable) == pixart_shape.trained_parts("learnable") == ["transformer", "text_encoder"]
    assert module.tokenizer.model_max_length == pixart_shape.TOKENS == 300
    assert module.text_encoder.config.use_attention_mask  # PixArtSigmaPipeline always passes the padding mask
    assert torch.equal(module.noise_scheduler.betas, reference.scheduler.betas)
    assert torch.equal(module.noise_scheduler.betas, parts.noise_scheduler.betas)
    for name, written in (("transformer", parts.denoiser), ("vae", parts.vae), ("text_encoder", parts.text_encoder)):
        written, loaded = written.state_dict(), getattr(module, name).state_dict()
        assert written.keys() == loaded.keys(), name
        assert all(torch.equal(written[key], loaded[key]) for key in written), name
        assert all(torch.equal(written[key], getattr(reference, name).state_dict()[key]) for key in written), name


def test_a_bf16_text_encoder_is_built_saved_and_loaded_in_bf16(tmp_path):
    """How the full CPU rehearsal keeps T5-XXL at 9.5 GB: built in bf16 (never in fp32), loaded as saved."""
    shape = replace(TINY, text_encoder_dtype=torch.bfloat16)
    with torch.device("meta"):
        full = pixart_shape.build_text_encoder(replace(SIGMA, text_encoder_dtype=torch.bfloat16), tokenizer_size=100)
    assert {p.dtype for p in full.parameters()} == {torch.bfloat16}
    folder = pixart_shape.write_pipeline(pixart_shape.build_parts(shape, 64), tmp_path / "pipeline")
    overrides = [*sd2_shape.config_overrides(folder, 64, 2, False), "trainer.accelerator=cpu"]
    module, _ = pixart_shape.load_module(folder, "frozen", overrides)
    assert {p.dtype for p in module.text_encoder.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in module.transformer.parameters()} == {torch.float32}
