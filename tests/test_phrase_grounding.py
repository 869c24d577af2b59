from pathlib import Path

import pytest
import torch

from datamodules.mscxr import load_grounding_sample, read_ms_cxr
from grounding.phrase_grounding import (
    HeatmapSettings,
    generation_heatmaps,
    item_noise_seed,
    phrase_grounding_heatmaps,
)
from lightning_modules.components import sampling_scheduler
from lightning_modules.loading import load_diffusion_module

TINY_MODEL_OVERRIDES = ["model.text_encoder.max_length=16", "model.text_encoder.use_attention_mask=false"]
SETTINGS = HeatmapSettings(num_inference_steps=10, last_k_steps=4, seed=3)
PHRASE, CATEGORY = "small left pleural effusion", "Pleural Effusion"
IMAGE_IDS = ("dicom-a", "dicom-b")
KNOWN_SEED = 7205395516723060086  # item_noise_seed(0, "dicom-a", "a") when this was written


def expected_noise(num_steps: int, latent_shape: torch.Size) -> list[torch.Tensor]:
    """Each item's (num_steps, *latent_shape) noise, drawn from its own seed (seed, image id, phrase)."""
    return [
        torch.randn(
            (num_steps, *latent_shape), generator=torch.Generator().manual_seed(item_noise_seed(3, image, PHRASE))
        )
        for image in IMAGE_IDS
    ]


@pytest.fixture(scope="module")
def module(tiny_model_dir: Path):
    module, _ = load_diffusion_module(tiny_model_dir, TINY_MODEL_OVERRIDES)
    return module


@pytest.fixture(scope="module")
def two_xrays(synthetic_root: Path) -> torch.Tensor:
    """Two different real (synthetic) X-rays at the tiny model's 32 px."""
    items = read_ms_cxr(synthetic_root / "MS_CXR_Local_Alignment_v1.1.0.csv")
    samples = [load_grounding_sample(item, synthetic_root, 32) for item in items]
    pixels = [sample["pixel_values"] for sample in samples if sample is not None][:2]
    assert not torch.equal(pixels[0], pixels[1])
    return torch.stack(pixels)


def batch_timestep(timesteps: torch.Tensor) -> int:
    """The one timestep every item of a grounding batch is noised to (the denoiser gets it per item)."""
    assert timesteps.shape == (2,) and timesteps.unique().numel() == 1
    return int(timesteps[0])


def test_unet_sees_the_real_latent_forward_noised_with_fresh_seeded_noise_at_the_last_k_steps(module, two_xrays):
    calls = []

    def spy(_unet, args, kwargs):
        calls.append((args[0].clone(), batch_timestep(args[1]), kwargs["encoder_hidden_states"].clone()))

    hook = module.unet.register_forward_pre_hook(spy, with_kwargs=True)
    try:
        phrase_grounding_heatmaps(module, two_xrays, [PHRASE, PHRASE], [CATEGORY, CATEGORY], SETTINGS, IMAGE_IDS)
    finally:
        hook.remove()

    # Independent manual computation: posterior mean, DDIM timesteps, per-item noise seeded by (seed, image, phrase).
    with torch.no_grad():
        latents = module.vae.encode(two_xrays).latent_dist.mean * module.vae.config.scaling_factor
        text = module.encode_text([PHRASE, PHRASE])
    scheduler = sampling_scheduler(module.noise_scheduler)
    scheduler.set_timesteps(SETTINGS.num_inference_steps)
    k = SETTINGS.last_k_steps
    noise = expected_noise(k, latents.shape[1:])
    alphas_cumprod = module.noise_scheduler.alphas_cumprod

    assert len(calls) == k
    assert [int(t) for _, t, _ in calls] == scheduler.timesteps[-k:].tolist()
    for step, (noisy, timestep, text_features) in enumerate(calls):
        alpha_bar = alphas_cumprod[int(timestep)]
        expected = alpha_bar.sqrt() * latents + (1 - alpha_bar).sqrt() * torch.stack([n[step] for n in noise])
        torch.testing.assert_close(noisy, expected)
        torch.testing.assert_close(text_features, text)
    assert not torch.allclose(calls[0][0], calls[1][0])  # fresh noise every step


def test_each_item_has_its_own_noise_seed_stable_across_versions():
    seeds = {item_noise_seed(seed, image, phrase) for seed in (0, 1) for image in IMAGE_IDS for phrase in ("a", "b")}
    assert len(seeds) == 8 and all(0 <= seed < 2**63 for seed in seeds)
    assert item_noise_seed(0, "dicom-a", "a") == item_noise_seed(0, "dicom-a", "a")
    # sha256-derived, so a stored result keeps its noise on every machine and Python version
    assert item_noise_seed(0, "dicom-a", "a") == KNOWN_SEED


def test_same_image_ids_give_the_same_noise_whatever_the_batch_order(module, two_xrays):
    forward = phrase_grounding_heatmaps(module, two_xrays, [PHRASE] * 2, [CATEGORY] * 2, SETTINGS, IMAGE_IDS)
    backward = phrase_grounding_heatmaps(
        module, two_xrays.flip(0), [PHRASE] * 2, [CATEGORY] * 2, SETTINGS, IMAGE_IDS[::-1]
    )
    torch.testing.assert_close(forward, backward.flip(0))
    swapped = phrase_grounding_heatmaps(module, two_xrays, [PHRASE] * 2, [CATEGORY] * 2, SETTINGS, IMAGE_IDS[::-1])
    assert not torch.allclose(forward, swapped)  # the noise follows the id, not the position


def test_same_seed_gives_identical_heatmaps_another_seed_different_ones(module, two_xrays):
    first = phrase_grounding_heatmaps(module, two_xrays, [PHRASE] * 2, [CATEGORY] * 2, SETTINGS)
    again = phrase_grounding_heatmaps(module, two_xrays, [PHRASE] * 2, [CATEGORY] * 2, SETTINGS)
    other_seed = HeatmapSettings(num_inference_steps=10, last_k_steps=4, seed=4)
    reseeded = phrase_grounding_heatmaps(module, two_xrays, [PHRASE] * 2, [CATEGORY] * 2, other_seed)
    assert first.shape == (2, 8, 8)  # the tiny model's latent size
    assert torch.equal(first, again)
    assert not torch.allclose(first, reseeded)


def test_heatmaps_are_read_on_each_items_own_image_whatever_its_batch(module, two_xrays):
    both = phrase_grounding_heatmaps(module, two_xrays, [PHRASE] * 2, [CATEGORY] * 2, SETTINGS)
    alone = [phrase_grounding_heatmaps(module, xray[None], [PHRASE], [CATEGORY], SETTINGS)[0] for xray in two_xrays]
    assert not torch.allclose(both[0], both[1], atol=1e-4)  # same phrase, different images
    torch.testing.assert_close(both, torch.stack(alone))


def test_heatmap_resolution_and_layer_filter(module, two_xrays):
    settings = HeatmapSettings(num_inference_steps=10, last_k_steps=2, resolution=16, layer_resolutions=(4,))
    only_coarse = phrase_grounding_heatmaps(module, two_xrays, [PHRASE] * 2, [CATEGORY] * 2, settings)
    every_layer = phrase_grounding_heatmaps(
        module, two_xrays, [PHRASE] * 2, [CATEGORY] * 2, HeatmapSettings(10, 2, resolution=16)
    )
    assert only_coarse.shape == every_layer.shape == (2, 16, 16)
    assert not torch.allclose(only_coarse, every_layer)


def test_generation_mode_images_equal_plain_sampling_and_heatmaps_follow_the_prompt(module):
    prompts = ["large right pleural effusion", "moderate cardiomegaly"]
    settings = HeatmapSettings(num_inference_steps=4, last_k_steps=3, seed=5)
    heatmaps, images = generation_heatmaps(module, prompts, [CATEGORY, None], settings, guidance_scale=4.0)
    plain = module.sample(prompts, 4, 4.0, seed=5)
    torch.testing.assert_close(images, plain, atol=1e-5, rtol=0)
    assert heatmaps.shape == (2, 8, 8)
    assert torch.isfinite(heatmaps).all()
    assert not torch.allclose(heatmaps[0], heatmaps[1], atol=1e-4)


def test_unguided_generation_keeps_the_whole_batch(module):
    settings = HeatmapSettings(num_inference_steps=3, last_k_steps=3)
    heatmaps, images = generation_heatmaps(module, ["moderate cardiomegaly"] * 3, [None] * 3, settings, 1.0)
    assert heatmaps.shape == (3, 8, 8)
    assert images.shape == (3, 3, 32, 32)


@pytest.mark.parametrize("last_k_steps", [0, 11])
def test_last_k_steps_must_fit_the_schedule(last_k_steps):
    with pytest.raises(ValueError, match="last_k_steps"):
        HeatmapSettings(num_inference_steps=10, last_k_steps=last_k_steps)


def test_forward_noising_is_float32_with_a_bf16_vae(tiny_model_dir: Path, two_xrays):
    """In bf16 sqrt(1 - alpha_bar_t) rounds to 0 at t = 1, the last step read: the UNet would see the clean latent."""
    module, _ = load_diffusion_module(tiny_model_dir, TINY_MODEL_OVERRIDES)
    module.vae.to(torch.bfloat16)
    seen = []
    hook = module.unet.register_forward_pre_hook(
        lambda _unet, args: seen.append((args[0].clone(), batch_timestep(args[1])))
    )
    try:
        phrase_grounding_heatmaps(module, two_xrays, [PHRASE, PHRASE], [CATEGORY, CATEGORY], SETTINGS, IMAGE_IDS)
    finally:
        hook.remove()
    with torch.no_grad():
        mean = module.vae.encode(two_xrays.to(torch.bfloat16)).latent_dist.mean
    latents = mean.float() * module.vae.config.scaling_factor
    noise = torch.stack(expected_noise(SETTINGS.last_k_steps, latents.shape[1:]), dim=1)
    assert seen[-1][1] == 1
    for step, (noisy, timestep) in enumerate(seen):
        alpha_bar = module.noise_scheduler.alphas_cumprod[timestep]
        assert noisy.dtype == torch.float32
        torch.testing.assert_close(noisy, alpha_bar.sqrt() * latents + (1 - alpha_bar).sqrt() * noise[step])
