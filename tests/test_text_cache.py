"""The frozen-text-feature cache encodes a batch's misses together, in calls of one fixed shape, and a caption's
cached feature is the same whichever batch filled the cache (a resumed run starts with an empty cache)."""

from __future__ import annotations

import pytest
import torch

from configs import load_config
from lightning_modules.latent_diffusion import LatentDiffusionModule
from lightning_modules.text_conditioning import text_feature_batch_size
from tests.test_latent_diffusion import tiny_module

CAPTIONS = [
    "Small left pleural effusion.",
    "Moderate cardiomegaly.",
    "Right lower lobe consolidation.",
    "Left apical pneumothorax.",
    "Mild pulmonary edema.",
    "No acute cardiopulmonary process.",
]


def record_encoder_calls(module: LatentDiffusionModule) -> list[list[str]]:
    calls: list[list[str]] = []
    run = module._run_text_encoder
    module._run_text_encoder = lambda captions, *args: calls.append(list(captions)) or run(captions, *args)
    return calls


def test_a_batch_of_misses_is_one_encoder_call_of_the_fixed_shape(tiny_overrides):
    module = tiny_module(tiny_overrides, "train.text_feature_batch_size=4").eval()
    calls = record_encoder_calls(module)
    module.encode_text([CAPTIONS[0], CAPTIONS[1], CAPTIONS[0], ""])  # 3 distinct misses
    assert calls == [[CAPTIONS[0], CAPTIONS[1], "", ""]]  # padded to 4 with the empty caption

    calls.clear()
    module.encode_text(CAPTIONS)  # 2 hits, 4 misses: still one call
    assert calls == [CAPTIONS[2:]]

    calls.clear()
    module.text_feature_cache.clear()
    module.encode_text(CAPTIONS)  # 6 misses: two calls, both of 4 captions
    assert calls == [CAPTIONS[:4], [*CAPTIONS[4:], "", ""]]
    assert all(len(call) == module.text_feature_batch_size for call in calls)


def test_the_default_batch_size_is_one_on_cpu_and_a_data_batch_on_an_accelerator(tiny_overrides):
    """null: CPU is FLOP-bound (a padded row costs its compute), a GPU latency-bound (one call beats one per miss)."""
    assert text_feature_batch_size(load_config([], [*tiny_overrides, "trainer.accelerator=cpu"])) == 1
    assert text_feature_batch_size(load_config([], [*tiny_overrides, "trainer.accelerator=gpu"])) == 4
    explicit = load_config([], [*tiny_overrides, "trainer.accelerator=cpu", "train.text_feature_batch_size=3"])
    assert text_feature_batch_size(explicit) == 3
    assert tiny_module(tiny_overrides, "trainer.accelerator=cpu").text_feature_batch_size == 1


def test_cached_rows_are_their_own_memory(tiny_overrides):
    """A cached feature is one caption's row, not a view that keeps its whole padded call alive."""
    module = tiny_module(tiny_overrides, "train.text_feature_batch_size=4").eval()
    module.encode_text(CAPTIONS[:1])
    feature = module.text_feature_cache[CAPTIONS[0]]
    assert feature.untyped_storage().nbytes() == feature.numel() * feature.element_size()


@pytest.mark.parametrize("encoder", ["tiny_clip", "minilm"])
def test_a_cached_feature_does_not_depend_on_the_batch_that_filled_it(tiny_overrides, encoder):
    """The resume condition: features of one caption filled alone, with other companions, at another position
    or in a differently composed batch are bit-identical, and equal the uncached encoder's."""
    if encoder == "minilm":  # the embedded default's real encoder (BERT, 77 tokens, attention mask)
        overrides = [o for o in tiny_overrides if not o.startswith("model.")]
        extra = ["model.vae.pretrained=null"]
    else:
        overrides, extra = tiny_overrides, []
    extra.append("train.text_feature_batch_size=4")
    module = tiny_module(overrides, *extra).eval()
    compositions = [
        [CAPTIONS[0]],
        [CAPTIONS[1], CAPTIONS[0]],
        [CAPTIONS[3], CAPTIONS[4], CAPTIONS[5], CAPTIONS[0]],
        [CAPTIONS[0], *CAPTIONS[1:]],  # two calls; the caption in the first
        [*CAPTIONS[1:], "", CAPTIONS[0]],  # two calls; the caption in the second, beside padding
    ]
    features = []
    for captions in compositions:
        module.text_feature_cache.clear()
        module.encode_text(captions)
        features.append(module.text_feature_cache[CAPTIONS[0]])
    assert all(torch.equal(feature, features[0]) for feature in features)
    # The uncached encoder in the cache's call shape runs the same kernels on the same rows: bit-identical anywhere.
    same_shape = module._run_text_encoder([CAPTIONS[0], *[""] * (module.text_feature_batch_size - 1)])[0]
    assert torch.equal(features[0], same_shape)
    # Alone (batch 1) it runs differently blocked float32 GEMMs, whose summation order depends on the batch shape,
    # the CPU's vector width and the thread count: seen 1.7e-6 and 3.3e-6 on two machines, 3-6 units in the last
    # place of the largest feature (~5 for MiniLM). 64 such units allow that on any CPU and still catch a feature
    # of the wrong caption, row or attention mask (differences of order 0.1).
    bound = 64 * torch.finfo(torch.float32).eps * features[0].abs().max().item()
    alone = module._run_text_encoder([CAPTIONS[0]])[0]
    torch.testing.assert_close(features[0], alone, rtol=0, atol=bound)
