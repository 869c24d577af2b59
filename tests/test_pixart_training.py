"""PixArt-Σ trains as the UNet does (issue 21, item 2), on the tiny PixArt of ``tiny_pixart_overrides`` (2 layers,
learned variance, tiny T5 encoder).

Each test mirrors the UNet's named in its docstring and reuses its helpers: which parameters train and at which
rate, EMA (diffusers' ``EMAModel`` numbers, used for sampling), LoRA on the transformer's attention projections,
caption dropout (the pipeline's negative-prompt conditioning), gradient checkpointing, bf16 with float32 noising
and learned-variance loss, two gloo processes, and exact resume after an interruption.
"""

from __future__ import annotations

import lightning as L
import pytest
import torch
import torch.utils.checkpoint
from diffusers import PixArtSigmaPipeline
from diffusers.models.attention_processor import Attention
from diffusers.training_utils import EMAModel
from peft.tuners.tuners_utils import BaseTunerLayer

from lightning_modules.adapters import is_adapter_key
from lightning_modules.backbones.learned_variance import learned_variance_loss
from lightning_modules.latent_diffusion import LatentDiffusionModule
from tests.test_adapters import one_step_gradients, reentrant_checkpointing  # noqa: F401 (a fixture, by name)
from tests.test_ddp import REPO, ddp_training_overrides
from tests.test_ddp_randomness import run_recorded
from tests.test_interruption import interrupted_resume_differences, training_state_differences
from tests.test_latent_diffusion import CAPTIONS, fit_steps, tiny_batches, tiny_module
from tests.test_precision import SMALL_TIMESTEPS, assert_fp32_exact, fp32_reference

pytestmark = pytest.mark.filterwarnings("ignore:model.adapters.parts includes transformer")

TRANSFORMER_LAYERS = 2  # tiny_pixart_overrides' model.pixart.num_layers
PROJECTIONS = ("to_q", "to_k", "to_v", "to_out.0")
SETUPS = {  # name: (model.trainable, model.adapters.parts)
    "transformer": (["transformer"], []),
    "transformer and text encoder": (["transformer", "text_encoder"], []),
    "LoRA transformer": ([], ["transformer"]),
    "LoRA transformer beside a trained text encoder": (["text_encoder"], ["transformer"]),
}
LORA_SETUPS = [name for name, (_, adapted) in SETUPS.items() if adapted]
RATES = {"transformer": 2e-3, "text_encoder": 3e-4, "transformer adapter": 4e-3}  # all distinct: groups identified
RATE_OVERRIDES = [
    f"train.learning_rate.transformer={RATES['transformer']}",
    f"train.learning_rate.text_encoder={RATES['text_encoder']}",
    f"model.adapters.transformer.learning_rate={RATES['transformer adapter']}",
]


@pytest.fixture
def pixart_training_overrides(tiny_pixart_overrides: list[str]) -> list[str]:
    """The tiny PixArt run without the in-training evaluations (as ``tiny_training_overrides`` for the UNet)."""
    return [
        *tiny_pixart_overrides,
        "callbacks.grounding.enabled=false",
        "callbacks.attention_heatmaps.enabled=false",
        "callbacks.fidelity.enabled=false",
    ]


def setup_overrides(setup: str) -> list[str]:
    trained, adapted = SETUPS[setup]
    return [f"model.trainable=[{','.join(trained)}]", f"model.adapters.parts=[{','.join(adapted)}]"]


def expected_trained(module: LatentDiffusionModule, setup: str) -> dict[str, torch.nn.Parameter]:
    """What a setup trains, by module-level name: every weight of a fully trained part, an adapted part's adapters."""
    trained, adapted = SETUPS[setup]
    return {
        f"{part}.{name}": parameter
        for part in (*trained, *adapted)
        for name, parameter in getattr(module, part).named_parameters()
        if part in trained or is_adapter_key(name)
    }


# ------------------------------------------------------------------------------------------------ parts, rates, EMA
@pytest.mark.parametrize("setup", SETUPS)
def test_a_setup_trains_exactly_its_weights_at_their_rates_and_samples_with_their_ema(
    pixart_training_overrides, tmp_path, setup
):
    """The UNet's ``test_frozen_parts_stay_bit_identical_and_trainable_parts_change``,
    ``test_only_adapter_weights_train_and_are_checkpointed`` and ``test_ema_tracks_training_and_is_used_for_sampling``:
    every trained weight moves and every other stays bit-identical, one optimizer group per trained part at its
    rate, checkpoints hold exactly the trained weights, the EMA copies average exactly those (diffusers' EMAModel
    numbers, frozen weights shared) and sampling runs the copies only."""
    trained, adapted = SETUPS[setup]
    module = tiny_module(pixart_training_overrides, *setup_overrides(setup), *RATE_OVERRIDES, "train.ema_decay=0.5")
    assert module.trainable == tuple(p for p in module.part_names if p in trained + adapted)
    assert module.adapted == tuple(adapted)
    expected = expected_trained(module, setup)
    weights = {name: p for name, p in module.named_parameters() if not name.startswith("ema.")}
    before = {name: p.detach().clone() for name, p in weights.items()}
    reference_ema = EMAModel(list(expected.values()), decay=0.5)
    modes_seen: list[dict[str, bool]] = []

    class Observe(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            modes_seen.append({part: getattr(pl_module, part).training for part in pl_module.part_names})

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            reference_ema.step(list(expected.values()))  # after this step's optimizer step, as ours

    trainer = fit_steps(module, tiny_batches(3), tmp_path, Observe())

    assert {name for name, p in weights.items() if p.requires_grad} == expected.keys()
    assert {name for name, p in weights.items() if not torch.equal(p, before[name])} == expected.keys()
    assert modes_seen == [{part: part in module.trainable for part in module.part_names}] * 3
    rates = {part: RATES[f"{part} adapter" if part in adapted else part] for part in module.trainable}
    groups = {
        group["name"]: (group["lr"], {id(p) for p in group["params"]}) for group in trainer.optimizers[0].param_groups
    }
    assert groups == {
        part: (rates[part], {id(p) for name, p in expected.items() if name.startswith(f"{part}.")})
        for part in module.trainable
    }

    trainer.save_checkpoint(tmp_path / "last.ckpt")
    saved = torch.load(tmp_path / "last.ckpt", map_location="cpu", weights_only=True)
    stored = module.state_dict(keep_vars=True)
    assert set(saved["state_dict"]) == set(stored)
    assert {id(p) for p in stored.values()} == {id(p) for p in expected.values()}  # T5's tied embedding: 2 keys
    assert set(saved["ema"]["weights"]) == expected.keys()  # no frozen weight
    assert len(saved["optimizer_states"][0]["state"]) == len(expected)
    assert (saved["trainable_parts"], saved["adapted_parts"]) == (list(module.trainable), adapted)

    ema = module.ema
    assert set(ema.copies) == set(module.trainable)
    averages = {}
    for part in module.trainable:
        for (name, average), weight in zip(
            ema.copies[part].named_parameters(), getattr(module, part).parameters(), strict=True
        ):
            if f"{part}.{name}" in expected:
                averages[f"{part}.{name}"] = average
                assert average is not weight and not average.requires_grad
            else:
                assert average is weight  # a frozen weight (an adapted part's base) is shared, never copied
    assert averages.keys() == expected.keys()
    assert all(
        torch.equal(averages[name], shadow) for name, shadow in zip(expected, reference_ema.shadow_params, strict=True)
    )
    assert all(not torch.equal(averages[name], p) for name, p in expected.items())

    ran = []
    for part in module.trainable:
        ema.copies[part].register_forward_pre_hook(lambda *_, part=part: ran.append(f"ema {part}"))
        getattr(module, part).register_forward_pre_hook(lambda *_, part=part: ran.append(f"training {part}"))
    module.sample(CAPTIONS[:1], num_inference_steps=2)
    assert ran.count("ema transformer") == 2  # one guided batch per step
    assert set(ran) == {f"ema {part}" for part in module.trainable}


# ------------------------------------------------------------------------------------------------ LoRA
@pytest.mark.parametrize("targets", [[], ["model.adapters.transformer.target_modules=null"]], ids=["config", "null"])
def test_lora_wraps_the_four_projections_of_every_self_and_cross_attention(pixart_training_overrides, targets):
    """The UNet's ``test_default_targets_are_each_familys_attention_projections``: the preset's targets and the
    backbone's default (null) wrap to_q, to_k, to_v and to_out.0 of both ``attn1`` (patches) and ``attn2`` (text)."""
    module = tiny_module(pixart_training_overrides, *setup_overrides("LoRA transformer"), *targets)
    attentions = [name for name, layer in module.transformer.named_modules() if isinstance(layer, Attention)]
    assert attentions == [
        f"transformer_blocks.{block}.attn{kind}" for block in range(TRANSFORMER_LAYERS) for kind in (1, 2)
    ]
    wrapped = {name for name, layer in module.transformer.named_modules() if isinstance(layer, BaseTunerLayer)}
    assert wrapped == {f"{attention}.{projection}" for attention in attentions for projection in PROJECTIONS}
    assert not any(isinstance(layer, BaseTunerLayer) for layer in module.text_encoder.modules())


@pytest.mark.parametrize("setup", LORA_SETUPS)
@pytest.mark.parametrize("checkpointing", ["library default", "reentrant, as transformers 4.x"])
def test_adapters_get_the_same_gradients_with_gradient_checkpointing(
    pixart_training_overrides, request, monkeypatch, checkpointing, setup
):
    """The UNet's ``test_adapters_get_the_same_gradients_with_gradient_checkpointing``. The adapted transformer's
    inputs (latents, timesteps, and text features of a frozen encoder) require no grad: under a reentrant checkpoint
    its adapters get gradients only through the hook on its input layer, ``pos_embed.proj``."""
    plain = one_step_gradients(pixart_training_overrides, *setup_overrides(setup))
    if checkpointing != "library default":
        request.getfixturevalue("reentrant_checkpointing")
    checkpointed_blocks = []
    checkpoint = torch.utils.checkpoint.checkpoint

    def recording_checkpoint(function, *args, **kwargs):
        checkpointed_blocks.append(type(getattr(function, "__self__", function)).__name__)
        return checkpoint(function, *args, **kwargs)

    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", recording_checkpoint)  # diffusers looks it up per call
    checkpointed = one_step_gradients(
        pixart_training_overrides, *setup_overrides(setup), "model.gradient_checkpointing=true"
    )

    assert checkpointed_blocks.count("BasicTransformerBlock") == TRANSFORMER_LAYERS
    adapters = [name for name in plain if is_adapter_key(name)]
    assert len(adapters) == 2 * 4 * 2 * TRANSFORMER_LAYERS  # A and B of 4 projections, 2 attentions per block
    assert [name for name in adapters if checkpointed[name] is None or not checkpointed[name].any()] == []
    assert checkpointed.keys() == plain.keys()
    for name, grad in plain.items():
        torch.testing.assert_close(checkpointed[name], grad, rtol=1e-5, atol=1e-7, msg=name)


# ------------------------------------------------------------------------------------------------ caption dropout
@pytest.mark.parametrize("probability", [0.0, 1.0])
def test_caption_dropout_conditions_the_transformer_as_the_pipelines_negative_prompt(
    pixart_training_overrides, probability
):
    """The UNet's ``test_training_step_applies_caption_dropout_to_every_caption``, to the transformer's input: a
    dropped caption gives the text features and the padding mask that ``PixArtSigmaPipeline.encode_prompt`` gives
    its (empty) negative prompt, a kept one those of the prompt."""
    module = tiny_module(pixart_training_overrides, f"train.ucg_probability={probability}")
    captions_seen, conditions = [], []
    encode_text = module.encode_text
    module.encode_text = lambda captions: captions_seen.extend(captions) or encode_text(captions)
    module.transformer.register_forward_pre_hook(
        lambda _, args, kwargs: conditions.append((kwargs["encoder_hidden_states"], kwargs["encoder_attention_mask"])),
        with_kwargs=True,
    )
    module.train()
    module.training_step(tiny_batches(1)[0], 0)

    assert captions_seen == (CAPTIONS if probability == 0.0 else [""] * len(CAPTIONS))
    pipeline = PixArtSigmaPipeline(
        tokenizer=module.tokenizer,
        text_encoder=module.text_encoder,
        vae=module.vae,
        transformer=module.transformer,
        scheduler=module.noise_scheduler,
    )
    with torch.no_grad():
        prompt, prompt_mask, negative, negative_mask = pipeline.encode_prompt(
            CAPTIONS, negative_prompt="", max_sequence_length=module.tokenizer.model_max_length
        )
    features, mask = (prompt, prompt_mask) if probability == 0.0 else (negative, negative_mask)
    ((seen_features, seen_mask),) = conditions
    assert torch.equal(seen_mask, mask) and int(negative_mask.sum()) == len(CAPTIONS)  # "": the end token alone
    torch.testing.assert_close(seen_features, features, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------------ bf16
class ObjectiveRecorder:
    """Per ``diffusion_loss`` call: the clean latents, the noise it drew (as drawn), what the transformer got and
    returned, and the loss (test_precision's ``Recorder`` reads the UNet and an MSE; PixArt's loss is another)."""

    def __init__(self, module: LatentDiffusionModule, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: list[dict[str, torch.Tensor]] = []
        drawn: list[torch.Tensor] = []
        randn, diffusion_loss = torch.randn, module.diffusion_loss

        def recording_randn(*args, **kwargs):
            noise = randn(*args, **kwargs)
            drawn.append(noise.detach().clone())
            return noise

        def recording_transformer(_, args, kwargs, output):
            self.calls[-1] |= {"noisy": args[0].detach().clone(), "timesteps": kwargs["timestep"].clone()}
            self.calls[-1]["output"] = output.sample.detach().clone()

        def recording_loss(latents, *args, **kwargs):
            drawn.clear()
            self.calls.append({"latents": latents.detach().clone()})
            loss = diffusion_loss(latents, *args, **kwargs)
            (noise,) = [noise for noise in drawn if noise.shape == latents.shape]
            self.calls[-1] |= {"noise": noise, "loss": loss.detach().clone()}
            return loss

        monkeypatch.setattr(torch, "randn", recording_randn)
        module.transformer.register_forward_hook(recording_transformer, with_kwargs=True)
        module.diffusion_loss = recording_loss

    def assert_float32_objective(self, module: LatentDiffusionModule) -> None:
        """Noising as the float32 formula, and the loss equal to the learned-variance loss of the transformer's
        output computed in float32 from the float32 noising (bf16 anywhere in between moves it by ~1e-3)."""
        assert self.calls
        for call in self.calls:
            assert call["latents"].dtype == call["noise"].dtype == torch.float32
            assert call["output"].dtype == torch.bfloat16  # the transformer itself ran under autocast
            expected_noisy, _ = fp32_reference(module, call["latents"], call["noise"], call["timesteps"])
            assert_fp32_exact(call["noisy"], expected_noisy)
            with torch.autocast("cpu", enabled=False):
                expected_loss = learned_variance_loss(
                    call["output"].float(),
                    expected_noisy,
                    call["latents"],
                    call["noise"],
                    call["timesteps"],
                    module.noise_scheduler.betas,
                ).mean()
            assert call["loss"].dtype == torch.float32
            torch.testing.assert_close(call["loss"], expected_loss, rtol=1e-6, atol=0)


def test_noising_and_learned_variance_loss_are_float32_at_small_timesteps_under_bf16(
    pixart_training_overrides, monkeypatch
):
    """test_precision's ``test_noising_target_and_loss_match_fp32_at_small_timesteps_under_bf16_autocast``:
    t = 0 ... 10, where bf16 noising is worst and t = 0 takes the decoder-likelihood branch of the loss."""
    module = tiny_module(pixart_training_overrides).eval()
    batch = tiny_batches(1)[0]
    batch["pixel_values"] = batch["pixel_values"][:1].expand(len(SMALL_TIMESTEPS), -1, -1, -1)
    recorder = ObjectiveRecorder(module, monkeypatch)
    monkeypatch.setattr(torch, "randint", lambda low, high, size, **kwargs: SMALL_TIMESTEPS.clone())
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        latents = module.batch_latents(batch, torch.Generator().manual_seed(0))
        module.diffusion_loss(latents, [CAPTIONS[0]] * len(SMALL_TIMESTEPS), torch.Generator().manual_seed(1))
    (call,) = recorder.calls
    assert torch.equal(call["timesteps"], SMALL_TIMESTEPS)
    recorder.assert_float32_objective(module)


def test_bf16_mixed_training_noises_and_takes_the_loss_in_float32_inside_lightning(
    pixart_training_overrides, monkeypatch, tmp_path
):
    """test_precision's ``test_bf16_mixed_training_noises_in_fp32_inside_lightning``, with both parts training."""
    module = tiny_module(pixart_training_overrides, "model.trainable=[transformer,text_encoder]")
    recorder = ObjectiveRecorder(module, monkeypatch)
    fit_steps(module, tiny_batches(2), tmp_path, precision="bf16-mixed")
    assert len(recorder.calls) == 2
    recorder.assert_float32_objective(module)


# ------------------------------------------------------------------------------------------------ two processes
# train.py with, per rank, the noise and timesteps of each training step and the trained weights before and after
# (Lightning relaunches this very script for rank 1).
RECORDING_SCRIPT = """
import sys
from pathlib import Path
sys.path.insert(0, {repo!r})
import torch
from lightning_modules.latent_diffusion import LatentDiffusionModule

record, drawn = Path(sys.argv[1]), {{"noise": [], "timesteps": []}}
noisy_latents_and_target = LatentDiffusionModule.noisy_latents_and_target
on_train_start = LatentDiffusionModule.on_train_start

def recording_noising(self, latents, noise, timesteps):
    if self._trainer is not None and self.trainer.training and torch.is_grad_enabled():
        drawn["noise"].append(noise.detach().cpu().clone())
        drawn["timesteps"].append(timesteps.detach().cpu().clone())
    return noisy_latents_and_target(self, latents, noise, timesteps)

def trained_weights(module):
    return {{key: value.detach().clone() for key, value in module.state_dict().items()}}

def recording_start(self):
    on_train_start(self)
    drawn["initial"] = trained_weights(self)

def recording_end(self):
    ema = {{key: value.clone() for key, value in self.ema.checkpoint_state()["weights"].items()}}
    torch.save({{**drawn, "final": trained_weights(self), "ema": ema}}, record / f"rank{{self.global_rank}}.pt")

LatentDiffusionModule.noisy_latents_and_target = recording_noising
LatentDiffusionModule.on_train_start, LatentDiffusionModule.on_train_end = recording_start, recording_end
import train
train.main(sys.argv[2:])
"""


def test_two_processes_keep_one_model_while_each_draws_its_own_noise(pixart_training_overrides, tmp_path):
    """test_ddp_randomness and test_ddp's two-process runs, on real DDP over gloo (killed past its timeout): the
    LoRA transformer beside a trained T5 encoder. Both ranks draw other noise and timesteps, yet hold the same
    trained weights and EMA after training only if DDP averaged their gradients."""
    script = tmp_path / "recorded_train.py"
    script.write_text(RECORDING_SCRIPT.format(repo=str(REPO)))
    overrides = ddp_training_overrides(
        pixart_training_overrides,
        *setup_overrides("LoRA transformer beside a trained text encoder"),
        "callbacks.export_pipeline=false",
        "trainer.val_check_interval=100",
        "train.ucg_probability=0.5",
        "train.ema_decay=0.5",
    )
    run_recorded(script, tmp_path / "draws", overrides, tmp_path / "run", timeout=240)
    ranks = [torch.load(tmp_path / "draws" / f"rank{rank}.pt", weights_only=True) for rank in (0, 1)]

    assert len(ranks[0]["noise"]) == len(ranks[1]["noise"]) == 2  # trainer.max_steps
    for step in range(2):
        assert not torch.equal(ranks[0]["noise"][step], ranks[1]["noise"][step]), "both ranks drew the same noise"
        assert not torch.equal(ranks[0]["timesteps"][step], ranks[1]["timesteps"][step])
    names = set(ranks[0]["initial"])
    assert any(name.startswith("transformer.") and ".lora_B." in name for name in names)
    assert any(name.startswith("text_encoder.") for name in names)
    assert all(is_adapter_key(name) for name in names if name.startswith("transformer."))
    assert set(ranks[0]["ema"]) < names  # T5's tied input embedding: averaged once, stored under two keys
    for key in ("initial", "final", "ema"):
        first, second = (rank[key] for rank in ranks)
        assert first.keys() == second.keys(), key
        assert [name for name in first if not torch.equal(first[name], second[name])] == [], key
    assert all(not torch.equal(ranks[0]["final"][name], ranks[0]["initial"][name]) for name in names)


# ------------------------------------------------------------------------------------------------ exact resume
def optimizer_differences(straight: dict, resumed: dict) -> list[str]:
    """What differs between two final checkpoints' AdamW moments and step counts, and LR schedulers (bit for bit)."""
    ours, theirs = straight["optimizer_states"][0]["state"], resumed["optimizer_states"][0]["state"]
    differences = [] if ours.keys() == theirs.keys() else ["optimizer parameters"]
    for index, state in ours.items():
        differences += [
            f"optimizer {index} {key}"
            for key, value in state.items()
            if not torch.equal(value, theirs.get(index, {}).get(key, torch.empty(0)))
        ]
    return differences + ([] if straight["lr_schedulers"] == resumed["lr_schedulers"] else ["lr_schedulers"])


def weights_and_optimizer_differences(straight: dict, resumed: dict) -> list[str]:
    return training_state_differences(straight, resumed) + optimizer_differences(straight, resumed)


INTERRUPTIONS = [  # (moment, global step when it happens, step the run stops at), as in test_interruption
    ("validation", 2, 2),  # SIGTERM between validation batches, while the EMA weights are evaluated
    ("crash in a training step", 3, 3),  # after the step's draws; last.ckpt: the step before, with its random state
]


def test_an_interrupted_run_resumes_to_the_straight_run_bit_for_bit(pixart_training_overrides, tmp_path, monkeypatch):
    """test_interruption's ``test_sigterm_at_any_moment_resumes_to_the_straight_run_bit_for_bit``, with the
    transformer and the T5 encoder training (T5's dropout draws from the global stream, which must be replayed too):
    weights, EMA, AdamW state and LR schedule end equal to the uninterrupted run's."""
    overrides = [
        *pixart_training_overrides,
        "model.trainable=[transformer,text_encoder]",
        "trainer.max_steps=5",
        "train.checkpointing_steps=100",  # resumes start from the interruption's last.ckpt only
        "trainer.val_check_interval=2",
        "trainer.limit_val_batches=2",
        "callbacks.sample_grid.every_n_steps=0",
        "callbacks.export_pipeline=false",
        "train.ucg_probability=0.5",
        "train.ema_decay=0.9",
        "train.learning_rate.transformer=1e-3",
        "data.batch_size=2",  # the 3 validation images make 2 batches: a SIGTERM can fall between them
    ]
    differences = interrupted_resume_differences(
        overrides,
        INTERRUPTIONS,
        tmp_path,
        monkeypatch,
        lambda straight, resumed: (
            training_state_differences(straight, resumed) + optimizer_differences(straight, resumed)
        ),
    )
    assert differences == {f"{moment} at step {step}": [] for moment, step, _ in INTERRUPTIONS}
