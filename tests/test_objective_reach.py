"""Trainable parts train exactly what the objective reaches (issue 11, section 2), found by a probe of the forward
that trains (issue 20, item 4), and an all-unreadable batch still takes its step (section 4): what DDP needs,
checked in one process."""

from __future__ import annotations

import pytest
import torch
import torch.utils.checkpoint
import transformers.modeling_utils
from torch import nn

from configs import load_config
from lightning_modules.latent_diffusion import LatentDiffusionModule
from lightning_modules.objective_reach import unreached_parameters


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


class TrainingOnlyBranch(nn.Module):
    """A part whose training forward differs from its evaluation one, as a checkpointed transformers encoder's does:
    ``branch`` is used in train mode only; the norm's statistics and the dropout's draws change in train mode."""

    def __init__(self) -> None:
        super().__init__()
        self.trunk, self.branch, self.unused = nn.Linear(3, 3), nn.Linear(3, 3), nn.Linear(3, 3)
        self.norm, self.dropout = nn.BatchNorm1d(3), nn.Dropout(0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.dropout(self.norm(self.trunk(x)))
        return self.branch(hidden) if self.training else hidden


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_the_probe_runs_the_training_forward_and_leaves_no_trace(mode):
    torch.manual_seed(0)
    part = TrainingOnlyBranch().train(mode == "train")
    part.trunk.weight.grad = torch.ones(3, 3)  # a gradient already there stays as it was
    statistics = [buffer.clone() for buffer in part.buffers()]
    random_state = torch.get_rng_state()

    assert unreached_parameters(part, lambda: part(torch.randn(4, 3))) == ["unused.weight", "unused.bias"]
    assert part.training == (mode == "train")
    assert all(torch.equal(a, b) for a, b in zip(part.buffers(), statistics, strict=True))
    assert torch.equal(torch.get_rng_state(), random_state)
    assert torch.equal(part.trunk.weight.grad, torch.ones(3, 3)) and part.branch.weight.grad is None


def test_the_probe_goes_through_the_checkpointed_layers_of_an_adapted_encoder(tiny_training_overrides, monkeypatch):
    """With gradient checkpointing, the probe must see the checkpointed forward that trains (a reentrant checkpoint
    is where adapters can lose their gradient): each of the encoder's layers runs through a checkpoint once."""
    plain_checkpoint, calls = torch.utils.checkpoint.checkpoint, []

    def counting_checkpoint(function, *args, **kwargs):
        calls.append(function)
        return plain_checkpoint(function, *args, **kwargs)

    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", counting_checkpoint)
    monkeypatch.setattr(transformers.modeling_utils, "checkpoint", counting_checkpoint)
    module = build_module(
        tiny_training_overrides, "model.adapters.parts=[text_encoder]", "model.gradient_checkpointing=true"
    )
    assert len(calls) == module.text_encoder.config.num_hidden_layers == 2 and module.unused_parameters == []


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
