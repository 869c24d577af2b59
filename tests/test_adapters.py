"""LoRA adapters (model.adapters): config errors, what trains and what a checkpoint holds, exact resume, gradients
under gradient checkpointing, attention capture through the adapted projections, and both exports reloading in
diffusers."""

import csv
import shutil
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
import torch.utils.checkpoint
import transformers.modeling_utils
from diffusers import StableDiffusionPipeline
from diffusers.loaders.lora_base import LORA_WEIGHT_NAME_SAFE
from omegaconf import OmegaConf
from peft.tuners.tuners_utils import BaseTunerLayer
from transformers import PreTrainedModel

import train
from callbacks.export_pipeline import ExportPipelineCallback
from configs import ConfigError, load_config
from grounding.phrase_grounding import HeatmapSettings, phrase_grounding_heatmaps
from lightning_modules.adapters import plain_copy
from lightning_modules.latent_diffusion import LatentDiffusionModule
from lightning_modules.loading import load_diffusion_module
from tests.conftest import TINY_RESOLUTION
from tests.test_latent_diffusion import CAPTIONS, fit_steps, tiny_batches, tiny_module

TINY_MODEL = ["model.text_encoder.max_length=16", "model.text_encoder.use_attention_mask=false"]
BOTH = "model.adapters.parts=[unet,text_encoder]"


def adapter_weights(part: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p for name, p in part.named_parameters() if ".lora_" in name}


def randomize_adapters(module, seed: int = 1) -> None:
    """Nonzero LoRA B matrices (they start at zero), so an adapted part computes something else than its base."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name in module.adapted:
            for key, parameter in adapter_weights(getattr(module, name)).items():
                if "lora_B" in key:
                    parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.2)


def unet_output(unet: torch.nn.Module, text_features: torch.Tensor) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(len(text_features), 4, TINY_RESOLUTION // 4, TINY_RESOLUTION // 4, generator=generator)
    with torch.no_grad():
        return unet(latents, torch.tensor([500] * len(text_features)), text_features).sample


# ------------------------------------------------------------------------------------------------ config
@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["model.adapters.parts=[vae]"], r"model.adapters.parts .*\('unet', 'transformer', 'text_encoder'\).*'vae'"),
        (["model.adapters.parts=[unet]"], r"\['unet'\] is in both model.trainable and model.adapters.parts"),
        (["model.trainable=[]"], "nothing trains"),
        (["model.adapters.parts=[text_encoder]", "model.adapters.text_encoder.rank=0"], "text_encoder.rank"),
        (["model.trainable=[]", "model.adapters.parts=[unet]", "model.adapters.unet.dropout=1.0"], "unet.dropout"),
        (["model.adapters.parts=[text_encoder]", "model.adapters.text_encoder.target_modules=[]"], "target_modules"),
        (["model.adapters.vae.rank=4"], r"'model.adapters.vae'.*\['parts', 'unet', 'transformer', 'text_encoder'\]"),
    ],
)
def test_bad_adapter_config_is_an_error_naming_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config([], overrides)


@pytest.mark.parametrize("part", ["unet", "text_encoder"])
def test_a_target_module_that_matches_nothing_is_an_error_listing_the_layers(tiny_overrides, part):
    trainable = "model.trainable=[]" if part == "unet" else "model.trainable=[unet]"
    with pytest.raises(ConfigError) as error:
        tiny_module(
            tiny_overrides, trainable, f"model.adapters.parts=[{part}]", f"model.adapters.{part}.target_modules=[to_qq]"
        )
    message = str(error.value)
    assert f"model.adapters.{part}.target_modules: ['to_qq'] match no" in message
    assert ("'to_q'" if part == "unet" else "'q_proj'") in message  # the layers that exist are listed


def test_default_targets_are_each_familys_attention_projections(tiny_overrides, tiny_bert_dir):
    def wrapped(module, part: str) -> set[str]:
        layers = getattr(module, part).named_modules()
        return {name.rsplit(".", 1)[-1] for name, layer in layers if isinstance(layer, BaseTunerLayer)}

    clip = tiny_module(tiny_overrides, "model.trainable=[]", BOTH)
    assert wrapped(clip, "unet") == {"to_q", "to_k", "to_v", "0"}  # to_out.0
    assert wrapped(clip, "text_encoder") == {"q_proj", "k_proj", "v_proj", "out_proj"}
    bert = tiny_module(
        tiny_overrides, f"model.text_encoder.pretrained={tiny_bert_dir}", "model.adapters.parts=[text_encoder]"
    )
    bert_layers = {name for name, layer in bert.text_encoder.named_modules() if isinstance(layer, BaseTunerLayer)}
    assert {name.split("layer.0.")[-1] for name in bert_layers if ".layer.0." in name} == {
        "attention.self.query",
        "attention.self.key",
        "attention.self.value",
        "attention.output.dense",  # not output.dense (the feed-forward's)
    }


def test_an_adapter_the_objective_never_reaches_is_an_error(tiny_overrides, tiny_bert_dir):
    """BERT's pooler is outside the objective: adapting only it would train nothing (found by the objective probe)."""
    with pytest.raises(ConfigError, match=r"text_encoder.target_modules: .*reaches none .*\['pooler.dense'\]"):
        tiny_module(
            tiny_overrides,
            f"model.text_encoder.pretrained={tiny_bert_dir}",
            "model.adapters.parts=[text_encoder]",
            "model.adapters.text_encoder.target_modules=[pooler.dense]",
        )


# ------------------------------------------------------------------------------------------------ training
def test_only_adapter_weights_train_and_are_checkpointed(tiny_overrides, tmp_path):
    module = tiny_module(tiny_overrides, "model.trainable=[]", BOTH, "train.ema_decay=0.5")
    before = {key: value.clone() for key, value in module.named_parameters()}
    trainer = fit_steps(module, tiny_batches(3), tmp_path)

    adapters = {key: p for key, p in module.named_parameters() if ".lora_" in key and not key.startswith("ema.")}
    optimized = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert optimized == {id(p) for p in adapters.values()} and len(adapters) == 2 * (32 + 8)  # A and B per layer
    rates = {group["name"]: group["lr"] for group in trainer.optimizers[0].param_groups}
    assert rates == {"unet": 1e-3, "text_encoder": 5e-4}  # model.adapters.<part>.learning_rate
    for key, value in module.named_parameters():  # frozen base weights bit-identical, every B matrix moved
        if key in adapters and "lora_B" in key:
            assert not torch.equal(value, before[key])
        elif key not in adapters and not key.startswith("ema."):
            assert torch.equal(value, before[key]) and not value.requires_grad
    assert module.unet.training and module.text_encoder.training and not module.vae.training

    trainer.save_checkpoint(tmp_path / "adapters.ckpt")
    saved = torch.load(tmp_path / "adapters.ckpt", map_location="cpu", weights_only=True)
    assert set(saved["state_dict"]) == set(adapters)  # no frozen base weight duplicated
    assert set(saved["ema"]["weights"]) == set(adapters)
    assert len(saved["optimizer_states"][0]["state"]) == len(adapters)
    assert saved["adapted_parts"] == ["unet", "text_encoder"]
    ema = module.ema.copies["unet"]
    assert any(
        not torch.equal(a, b)
        for a, b in zip(adapter_weights(ema).values(), adapter_weights(module.unet).values(), strict=True)
    )


@pytest.fixture
def reentrant_checkpointing(monkeypatch):
    """What transformers 4.x does to an encoder adapted by peft's ``inject_adapter_in_model``, made stricter:
    every checkpointed block is reentrant whatever its caller asks (4.x's default), and transformers never hooks the
    input embeddings to require grad (4.x does so only for adapters loaded through its own ``load_adapter``)."""
    plain_checkpoint = torch.utils.checkpoint.checkpoint

    def reentrant(function, *args, use_reentrant=None, **kwargs):
        return plain_checkpoint(function, *args, use_reentrant=True, **kwargs)

    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", reentrant)  # diffusers and ours look it up per call
    monkeypatch.setattr(transformers.modeling_utils, "checkpoint", reentrant)  # transformers imported the name
    monkeypatch.setattr(PreTrainedModel, "enable_input_require_grads", lambda self: None)


ADAPTED_SETUPS = {
    "LoRA on both, no base weight trains": ["model.trainable=[]", BOTH],
    "LoRA text encoder beside a trained UNet": ["model.trainable=[unet]", "model.adapters.parts=[text_encoder]"],
}


def one_step_gradients(tiny_training_overrides, *extra: str) -> dict[str, torch.Tensor]:
    """Gradients of every trained weight from one training step."""
    module = tiny_module(tiny_training_overrides, "train.use_ema=false", *extra)
    randomize_adapters(module)  # B = 0 would leave every A with a zero gradient
    module.train()
    module.training_step({"pixel_values": tiny_batches(1)[0]["pixel_values"], "caption": CAPTIONS}, 0).backward()
    return {name: p.grad for name, p in module.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("setup", ADAPTED_SETUPS)
@pytest.mark.parametrize("checkpointing", ["library default", "reentrant, as transformers 4.x"])
def test_adapters_get_the_same_gradients_with_gradient_checkpointing(
    tiny_training_overrides, request, checkpointing, setup
):
    """An adapted part's input (latents, token ids) requires no grad and its input layer is frozen: checkpointing,
    which recomputes each block's forward in backward, must still give every adapter weight its gradient."""
    plain = one_step_gradients(tiny_training_overrides, *ADAPTED_SETUPS[setup])
    if checkpointing != "library default":
        request.getfixturevalue("reentrant_checkpointing")
    checkpointed = one_step_gradients(
        tiny_training_overrides, *ADAPTED_SETUPS[setup], "model.gradient_checkpointing=true"
    )

    adapters = [name for name in plain if ".lora_" in name]
    assert len(adapters) == (2 * (32 + 8) if BOTH in ADAPTED_SETUPS[setup] else 2 * 8)  # A and B per adapted layer
    assert [name for name in adapters if checkpointed[name] is None or not checkpointed[name].any()] == []
    assert checkpointed.keys() == plain.keys()
    for name, grad in plain.items():
        torch.testing.assert_close(checkpointed[name], grad, rtol=1e-5, atol=1e-7, msg=name)


def losses(run_dir: Path) -> dict[int, str]:
    with open(run_dir / "diffusion" / "metrics.csv") as handle:
        return {int(row["step"]): row["train/loss"] for row in csv.DictReader(handle) if row.get("train/loss")}


def test_a_resumed_adapter_run_equals_the_straight_run_bit_for_bit(tiny_training_overrides, tmp_path):
    """LoRA text encoder beside a fully trained UNet (the lora_text_encoder preset), stopped at step 3 of 6."""
    overrides = [
        *tiny_training_overrides,
        "trainer.max_steps=6",
        "train.checkpointing_steps=3",
        "trainer.val_check_interval=100",
        "train.ucg_probability=0.5",
        "train.ema_decay=0.5",
        "model.adapters.text_encoder.dropout=0.1",  # the adapter's own dropout draws must be replayed too
        "callbacks.sample_grid.every_n_steps=0",
        "callbacks.export_pipeline=false",
    ]
    preset = ["--config", "experiment/lora_text_encoder"]
    straight = train.main([*preset, *overrides])["run_dir"]
    twin = tmp_path / "twin" / "run"
    (twin / "checkpoints").mkdir(parents=True)
    shutil.copy(straight / "config.yaml", twin / "config.yaml")
    shutil.copy(straight / "checkpoints" / "step000003.ckpt", twin / "checkpoints" / "stopped.ckpt")
    train.main([*preset, *overrides, f"resume={twin / 'checkpoints' / 'stopped.ckpt'}"])

    assert {step: losses(straight)[step] for step in losses(twin)} == losses(twin) and len(losses(twin)) == 3
    final = [
        torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True) for run in (straight, twin)
    ]
    for key in ("state_dict",):
        assert final[0][key].keys() == final[1][key].keys()
        assert all(torch.equal(final[0][key][k], final[1][key][k]) for k in final[0][key])
    assert all(torch.equal(final[0]["ema"]["weights"][k], v) for k, v in final[1]["ema"]["weights"].items())
    moments = [[s["exp_avg"] for s in f["optimizer_states"][0]["state"].values()] for f in final]
    assert all(torch.equal(a, b) for a, b in zip(*moments, strict=True))
    text_keys = [key for key in final[0]["state_dict"] if key.startswith("text_encoder.")]
    assert text_keys and all(".lora_" in key for key in text_keys)  # the UNet's whole, the encoder's adapters
    assert any(key.startswith("unet.") and ".lora_" not in key for key in final[0]["state_dict"])

    loaded, _ = load_diffusion_module(twin / "checkpoints" / "last.ckpt")  # for evaluation: the EMA adapters
    weights = dict(loaded.named_parameters())
    assert all(torch.equal(weights[key], value) for key, value in final[1]["ema"]["weights"].items())


def test_evaluation_rebuilds_the_random_base_an_adapter_was_trained_on(tiny_overrides, tiny_model_dir, tmp_path):
    """LoRA on a UNet without pretrained weights (the embedded default's): its frozen random base, like a random
    VAE's weights, is in no checkpoint, so loading must draw it as train.py did (seeded with the run's seed)."""
    random_parts = [
        "model.pretrained=null",
        f"model.text_encoder.pretrained={tiny_model_dir / 'text_encoder'}",
        "model.trainable=[]",
        "model.adapters.parts=[unet]",
    ]
    cfg = load_config([], [*tiny_overrides, *random_parts])
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    OmegaConf.save(cfg, run / "config.yaml")
    with torch.random.fork_rng(devices=[]):
        L.seed_everything(cfg.seed, verbose=False)  # what train.py does before building the module
        module = LatentDiffusionModule.from_config(cfg)
    trainer = fit_steps(module, tiny_batches(1), tmp_path)
    trainer.save_checkpoint(run / "checkpoints" / "last.ckpt")
    loaded, _ = load_diffusion_module(run / "checkpoints" / "last.ckpt")
    for name in ("unet", "vae"):  # the UNet: its random base and its adapters (EMA)
        expected = module.evaluation_parts().part(name).state_dict()
        assert all(torch.equal(expected[key], value) for key, value in getattr(loaded, name).state_dict().items())


# ------------------------------------------------------------------------------------------------ capture & export
def test_attention_capture_sees_the_adapted_projections(tiny_overrides, tmp_path, synthetic_root):
    module = tiny_module(tiny_overrides, "model.trainable=[]", BOTH, "train.use_ema=false").eval()
    randomize_adapters(module)
    merged, _ = load_diffusion_module(module.export_pipeline(tmp_path / "merged"), TINY_MODEL)
    base = tiny_module(tiny_overrides, "train.use_ema=false").eval()
    pixels = torch.rand(2, 3, TINY_RESOLUTION, TINY_RESOLUTION, generator=torch.Generator().manual_seed(0)) * 2 - 1
    phrases, categories = ["small left pleural effusion", "moderate cardiomegaly"], ["Pleural Effusion", "Cardiomegaly"]
    settings = HeatmapSettings(num_inference_steps=6, last_k_steps=3, seed=0)

    def heatmaps(model) -> torch.Tensor:
        return phrase_grounding_heatmaps(model, pixels, phrases, categories, settings)

    adapted = heatmaps(module)
    assert not any(isinstance(layer, BaseTunerLayer) for layer in merged.unet.modules())
    torch.testing.assert_close(adapted, heatmaps(merged), atol=1e-5, rtol=1e-4)
    assert (adapted - heatmaps(base)).abs().max() > 1e-3  # the adapters change where the words attend


def test_both_exports_reload_in_diffusers_and_compute_the_adapted_model(tiny_overrides, tiny_model_dir, tmp_path):
    module = tiny_module(tiny_overrides, "model.trainable=[]", BOTH, "train.ema_decay=0.5")
    fit_steps(module, tiny_batches(2), tmp_path)
    randomize_adapters(module)  # the EMA copies are what export writes: give them nonzero B too
    module.ema.copies["unet"].load_state_dict(module.unet.state_dict())
    module.ema.copies["text_encoder"].load_state_dict(module.text_encoder.state_dict())
    module.eval()
    callback = ExportPipelineCallback(tmp_path / "pipeline")
    callback.on_train_end(SimpleNamespace(is_global_zero=True), module)
    assert callback.lora_folder == tmp_path / "pipeline_lora"
    parts = module.evaluation_parts()
    tokens = module.tokenizer(CAPTIONS, padding="max_length", max_length=16, return_tensors="pt").input_ids
    with torch.no_grad():
        features = parts.text_encoder(tokens)[0]
    expected = unet_output(parts.denoiser, features)

    merged = StableDiffusionPipeline.from_pretrained(tmp_path / "pipeline", local_files_only=True)
    assert not any(isinstance(layer, BaseTunerLayer) for layer in merged.unet.modules())
    with torch.no_grad():
        torch.testing.assert_close(merged.text_encoder(tokens)[0], features, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(unet_output(merged.unet, features), expected, atol=1e-5, rtol=1e-5)

    # Only adapters trained: the weights file alone loads onto the model the run started from.
    original = StableDiffusionPipeline.from_pretrained(tiny_model_dir, local_files_only=True)
    original.load_lora_weights(
        tmp_path / "pipeline_lora", weight_name=LORA_WEIGHT_NAME_SAFE
    )  # offline, diffusers <= 0.36 need it
    with torch.no_grad():
        torch.testing.assert_close(original.text_encoder(tokens)[0], features, atol=1e-6, rtol=0)
    torch.testing.assert_close(unet_output(original.unet, features), expected, atol=1e-6, rtol=0)
    assert (unet_output(plain_copy(parts.denoiser, merge=False), features) - expected).abs().max() > 1e-3
    with pytest.raises(ValueError, match="holds LoRA weights beside their base pipeline"):
        load_diffusion_module(tmp_path / "pipeline_lora", TINY_MODEL)  # evaluating the base alone would mislead


def test_lora_export_of_a_bert_text_encoder_beside_a_trained_unet_loads_in_diffusers(
    tiny_overrides, tiny_bert_dir, tmp_path
):
    """The embedded default's family (BERT/MiniLM): diffusers' own key conversion knows CLIP's names only."""
    module = tiny_module(
        tiny_overrides,
        f"model.text_encoder.pretrained={tiny_bert_dir}",
        "model.adapters.parts=[text_encoder]",
        "train.use_ema=false",
    )
    randomize_adapters(module)
    module.eval()
    folder = module.export_lora(tmp_path / "lora")
    pipeline = StableDiffusionPipeline.from_pretrained(folder, local_files_only=True)
    tokens = module.tokenizer(CAPTIONS, padding="max_length", max_length=16, return_tensors="pt").input_ids
    with torch.no_grad():
        expected = module.text_encoder(tokens)[0]
        base = pipeline.text_encoder(tokens)[0]
        pipeline.load_lora_weights(folder, weight_name=LORA_WEIGHT_NAME_SAFE)  # offline, diffusers <= 0.36 need it
        torch.testing.assert_close(pipeline.text_encoder(tokens)[0], expected, atol=1e-6, rtol=0)
    assert (base - expected).abs().max() > 1e-3
    torch.testing.assert_close(unet_output(pipeline.unet, expected), unet_output(module.unet, expected), atol=0, rtol=0)
