"""Under bf16 autocast, forward noising, the regression target and the loss are computed in float32.

In bf16, sqrt(1 - alpha_bar_t) rounds to 0 at t = 0 and 1 (the UNet sees the clean latent while the target is the
noise) and is 10-25 % off at t = 2..10; the references below are the float32 formula
x_t = sqrt(alpha_bar_t) x + sqrt(1 - alpha_bar_t) eps, v = sqrt(alpha_bar_t) eps - sqrt(1 - alpha_bar_t) x.
"""

from __future__ import annotations

import csv

import pytest
import torch
import torch.nn.functional as F
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from diffusers.training_utils import compute_snr

import train
from lightning_modules.latent_diffusion import LatentDiffusionModule
from tests.test_latent_diffusion import CAPTIONS, fit_steps, tiny_batches, tiny_module

SMALL_TIMESTEPS = torch.arange(11)  # t = 0 ... 10, where bf16 noising is worst


class Recorder:
    """What ``diffusion_loss`` hands the UNet and the MSE, and the noise it draws (as drawn, in float32)."""

    def __init__(self, module: LatentDiffusionModule, monkeypatch: pytest.MonkeyPatch) -> None:
        self.unet_inputs: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.predictions: list[torch.Tensor] = []
        self.targets: list[torch.Tensor] = []
        self.noises: list[torch.Tensor] = []
        self.latents: list[torch.Tensor] = []
        self.losses: list[torch.Tensor] = []
        self.loss_noises: list[torch.Tensor] = []  # per diffusion_loss call: the noise it drew
        module.unet.register_forward_pre_hook(
            lambda _, args: self.unet_inputs.append((args[0].detach().clone(), args[1].detach().clone()))
        )
        mse, randn = F.mse_loss, torch.randn

        def recording_mse(prediction, target, **kwargs):
            self.predictions.append(prediction.detach().clone())
            self.targets.append(target.detach().clone())
            return mse(prediction, target, **kwargs)

        def recording_randn(*args, **kwargs):
            noise = randn(*args, **kwargs)
            self.noises.append(noise.detach().clone())
            return noise

        monkeypatch.setattr(F, "mse_loss", recording_mse)
        monkeypatch.setattr(torch, "randn", recording_randn)
        batch_latents, diffusion_loss = module.batch_latents, module.diffusion_loss

        def recording_batch_latents(*args, **kwargs):
            latents = batch_latents(*args, **kwargs)
            self.latents.append(latents.detach().clone())
            return latents

        def recording_loss(latents, *args, **kwargs):
            drawn_before = len(self.noises)
            loss = diffusion_loss(latents, *args, **kwargs)
            self.losses.append(loss.detach().clone())
            self.loss_noises += [noise for noise in self.noises[drawn_before:] if noise.shape == latents.shape]
            return loss

        module.batch_latents, module.diffusion_loss = recording_batch_latents, recording_loss


def fp32_reference(module: LatentDiffusionModule, latents, noise, timesteps) -> tuple[torch.Tensor, torch.Tensor]:
    alpha_bar = module.noise_scheduler.alphas_cumprod.float()[timesteps].view(-1, 1, 1, 1)
    x, eps = latents.float(), noise.float()
    noisy = alpha_bar.sqrt() * x + (1 - alpha_bar).sqrt() * eps
    v = alpha_bar.sqrt() * eps - (1 - alpha_bar).sqrt() * x
    return noisy, eps if module.noise_scheduler.config.prediction_type == "epsilon" else v


def assert_fp32_exact(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual.float(), expected, rtol=1e-6, atol=1e-6)
    assert actual.dtype == torch.float32


@pytest.mark.parametrize(
    "extra", [[], ["model.prediction_type=v_prediction", "train.snr_gamma=5.0"]], ids=["epsilon", "v_snr"]
)
def test_noising_target_and_loss_match_fp32_at_small_timesteps_under_bf16_autocast(tiny_overrides, monkeypatch, extra):
    module = tiny_module(tiny_overrides, *extra).eval()
    batch = tiny_batches(1)[0]
    batch["pixel_values"] = batch["pixel_values"][:1].expand(len(SMALL_TIMESTEPS), -1, -1, -1)
    captions = [CAPTIONS[0]] * len(SMALL_TIMESTEPS)
    recorder = Recorder(module, monkeypatch)
    monkeypatch.setattr(torch, "randint", lambda low, high, size, **kwargs: SMALL_TIMESTEPS.clone())
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        latents = module.batch_latents(batch, torch.Generator().manual_seed(0))
        loss = module.diffusion_loss(latents, captions, torch.Generator().manual_seed(1))

    assert latents.dtype == torch.float32  # the posterior is sampled in float32 too
    ((noisy, timesteps),) = recorder.unet_inputs
    assert torch.equal(timesteps, SMALL_TIMESTEPS)
    expected_noisy, expected_target = fp32_reference(module, latents, recorder.loss_noises[0], timesteps)
    assert_fp32_exact(noisy, expected_noisy)
    assert_fp32_exact(recorder.targets[-1], expected_target)
    assert recorder.predictions[-1].dtype == torch.float32
    per_sample = (recorder.predictions[-1] - expected_target).pow(2).mean(dim=(1, 2, 3))
    if module.snr_gamma is not None:
        snr = compute_snr(module.noise_scheduler, timesteps)
        per_sample = per_sample * torch.clamp(snr, max=module.snr_gamma) / (snr + 1)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, per_sample.mean(), rtol=1e-6, atol=0)


def test_bf16_mixed_training_noises_in_fp32_inside_lightning(tiny_overrides, monkeypatch, tmp_path):
    """The real path: Lightning's bf16-mixed autocast around training_step; the VAE itself runs in bf16."""
    module = tiny_module(tiny_overrides)
    recorder = Recorder(module, monkeypatch)
    encoder_outputs = []
    module.vae.encoder.register_forward_hook(lambda *args: encoder_outputs.append(args[-1].dtype))
    fit_steps(module, tiny_batches(2), tmp_path, precision="bf16-mixed")

    assert encoder_outputs == [torch.bfloat16] * 2  # autocast was on: without the fix the latents were bf16
    assert len(recorder.unet_inputs) == len(recorder.latents) == 2
    for (noisy, timesteps), latents, noise, target, loss in zip(
        recorder.unet_inputs, recorder.latents, recorder.loss_noises, recorder.targets, recorder.losses, strict=True
    ):
        expected_noisy, expected_target = fp32_reference(module, latents, noise, timesteps)
        assert_fp32_exact(noisy, expected_noisy)
        assert_fp32_exact(target, expected_target)
        assert loss.dtype == torch.float32 and torch.isfinite(loss)


def test_cached_posteriors_are_sampled_in_fp32_whatever_the_vae_dtype(tiny_overrides):
    """``latent_moments`` are stored in float32; a bf16 VAE (``bf16-true``) must not round them before sampling."""
    module = tiny_module(tiny_overrides).to(torch.bfloat16)
    moments = torch.randn(2, 8, 8, 8, generator=torch.Generator().manual_seed(0))
    latents = module.batch_latents({"latent_moments": moments}, torch.Generator().manual_seed(1))
    expected = DiagonalGaussianDistribution(moments).sample(torch.Generator().manual_seed(1))
    assert latents.dtype == torch.float32
    assert torch.equal(latents, expected * module.vae.config.scaling_factor)


def test_train_main_runs_in_bf16_mixed(tiny_training_overrides):
    outputs = train.main([*tiny_training_overrides, "trainer.precision=bf16-mixed", "callbacks.export_pipeline=false"])
    with outputs["metrics"].open() as file:
        losses = [float(row["train/loss"]) for row in csv.DictReader(file) if row.get("train/loss")]
    assert len(losses) == 3 and torch.isfinite(torch.tensor(losses)).all()
    assert outputs["checkpoint"].is_file()
