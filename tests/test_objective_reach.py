"""Trainable parts train exactly what the objective reaches (issue 11, section 2), and an all-unreadable batch
still takes its step (section 4): what DDP needs, checked in one process."""

from __future__ import annotations

import pytest
import torch

from configs import load_config
from lightning_modules.latent_diffusion import LatentDiffusionModule


def build_module(overrides: list[str], *extra: str) -> LatentDiffusionModule:
    return LatentDiffusionModule.from_config(load_config([], [*overrides, *extra]))


def bert_overrides(tiny_training_overrides: list[str], tiny_bert_dir) -> list[str]:
    return [
        *tiny_training_overrides,
        f"model.text_encoder.pretrained={tiny_bert_dir}",
        "model.text_encoder.use_attention_mask=true",
    ]


def optimizer_parameters(module: LatentDiffusionModule) -> set[int]:
    optimizer = module.configure_optimizers()["optimizer"]
    return {id(parameter) for group in optimizer.param_groups for parameter in group["params"]}


def test_a_bert_text_encoder_trains_everything_but_its_pooler(tiny_training_overrides, tiny_bert_dir):
    module = build_module(bert_overrides(tiny_training_overrides, tiny_bert_dir), "model.trainable=[unet,text_encoder]")
    pooler = {"text_encoder.pooler.dense.weight", "text_encoder.pooler.dense.bias"}
    assert set(module.unused_parameters) == pooler

    trained = {id(p) for p in module.trainable_parameters()}
    expected = [p for n, p in module.named_parameters() if n.startswith(("unet.", "text_encoder.")) and n not in pooler]
    assert trained == {id(p) for p in expected} == optimizer_parameters(module)
    assert not any(p.requires_grad for p in module.text_encoder.pooler.parameters())
    assert "pooler.dense.weight" not in module.ema.trained_names["text_encoder"]
    assert len(module.ema.trained_names["text_encoder"]) == len(list(module.text_encoder.parameters())) - 2


def test_a_trainable_vae_trains_its_encoder_only(tiny_training_overrides):
    module = build_module(tiny_training_overrides, "model.trainable=[unet,vae]")
    decoding = {f"vae.{n}" for n, _ in module.vae.named_parameters() if n.startswith(("decoder.", "post_quant_conv."))}
    assert decoding and set(module.unused_parameters) == decoding
    encoding = [p for n, p in module.vae.named_parameters() if f"vae.{n}" not in decoding]
    assert all(p.requires_grad for p in encoding) and len(encoding) > 2  # the encoder and quant_conv train
    assert {id(p) for p in module.trainable_parameters()} == optimizer_parameters(module)
    assert {id(p) for p in encoding} <= optimizer_parameters(module)


def test_a_clip_text_encoder_loses_nothing(tiny_training_overrides):
    module = build_module(tiny_training_overrides, "model.trainable=[unet,text_encoder]")
    assert module.unused_parameters == []
    assert len(module.trainable_parameters()) == len(list(module.unet.parameters())) + len(
        list(module.text_encoder.parameters())
    )


def training_batch(module: LatentDiffusionModule, size: int = 2) -> dict:
    return {
        "pixel_values": torch.rand(size, 3, 32, 32) * 2 - 1,
        "caption": ["Small left pleural effusion.", "Moderate cardiomegaly."][:size],
        "skipped": [],
    }


@pytest.mark.parametrize("trainable", ["[unet,text_encoder,vae]", "[unet]"])
def test_every_trained_parameter_gets_a_gradient_from_one_step(tiny_training_overrides, tiny_bert_dir, trainable):
    """What DDP (without find_unused_parameters) checks at every step, on the paper's learnable variant too."""
    module = build_module(bert_overrides(tiny_training_overrides, tiny_bert_dir), f"model.trainable={trainable}")
    module.train()
    module.training_step(training_batch(module), 0).backward()
    missing = [n for n, p in module.named_parameters() if p.requires_grad and p.grad is None]
    assert missing == []


def test_a_batch_of_only_unreadable_samples_gives_zero_gradients_to_every_trained_parameter(tiny_training_overrides):
    module = build_module(tiny_training_overrides, "model.trainable=[unet,text_encoder]")
    module.train()
    empty = {"pixel_values": torch.empty(0, 3, 0, 0), "caption": [], "skipped": [], "dicom_id": []}
    loss = module.training_step(empty, 0)
    assert loss.item() == 0.0
    loss.backward()
    gradients = [p.grad for p in module.trainable_parameters()]
    assert all(g is not None and not g.any() for g in gradients) and len(gradients) > 0
