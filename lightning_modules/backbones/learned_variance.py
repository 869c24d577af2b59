"""PixArt-Σ's training objective: noise MSE plus the variational bound that trains the learned variance.

PixArt-Σ's transformer outputs 2C channels: the noise prediction and, per element, a value v in [-1, 1] that
interpolates the log variance of p(x_{t-1} | x_t) between the clipped posterior variance (v = -1) and β_t (v = 1)
(IDDPM's ``LEARNED_RANGE``, Nichol & Dhariwal 2021). Its reference training code trains it with IDDPM's hybrid loss:

* ``train_scripts/train.py`` builds ``IDDPM(str(config.train_sampling_steps), learn_sigma=..., pred_sigma=...,
  snr=config.snr_loss)`` and minimises ``training_losses(...)["loss"].mean()``; the Σ configs inherit
  ``train_sampling_steps = 1000`` and ``snr_loss = False`` from ``configs/PixArt_xl2_internal.py``.
* ``diffusion/iddpm.py`` ``IDDPM()``: linear β schedule (``get_named_beta_schedule("linear", 1000)``: 1e-4..0.02),
  ``learn_sigma=True`` → ``LEARNED_RANGE``, epsilon prediction, and, with ``use_kl`` and ``rescale_learned_sigmas``
  left False, ``LossType.MSE``: the vb term is *not* multiplied by ``num_timesteps / 1000`` (that is
  ``RESCALED_MSE``; at 1000 steps the factor would be 1 anyway).
* ``diffusion/model/gaussian_diffusion.py`` ``GaussianDiffusion.training_losses``: ``loss = mse + vb`` per sample,
  ``mse = mean_flat((noise - eps) ** 2)``; ``vb = _vb_terms_bpd(...)`` on the output with the eps half detached
  (the bound trains the variance only). ``_vb_terms_bpd``: for t > 0 the KL between q(x_{t-1} | x_t, x_0)
  (``q_posterior_mean_variance``) and p (``p_mean_variance``: mean from x_0 = (x_t - sqrt(1 - ᾱ_t) eps) / sqrt(ᾱ_t),
  unclipped), for t == 0 the decoder NLL ``-discretized_gaussian_log_likelihood(x_0, mean, 0.5 log var)``
  (``diffusion/model/diffusion_utils.py``: tanh approximation of the normal CDF, bins of ±1/255, the ±0.999 edge
  cases, logs floored at 1e-12); each averaged over all non-batch dimensions and divided by log 2 (bits).
  The posterior log variance is clipped at t = 0 by using the t = 1 posterior variance there.
* The reference's ``snr`` option is not a loss weight: for t <= 249 it swaps the eps target for x_0. Σ trains with it
  off, so it is not implemented.

Precision follows the reference: schedule quantities are computed in float64 (the reference uses numpy float64) and
cast to float32 before they meet the tensors (``_extract_into_tensor``'s ``.float()``); the loss is float32, with
autocast off.

Deliberate differences from the reference:

* The schedule comes in as the diffusers scheduler's ``betas``, not its ``alphas_cumprod``: diffusers stores ᾱ in
  float32, from which β_t = 1 - ᾱ_t / ᾱ_{t-1} is off by up to 3.5e-4 relative (1 - ᾱ_0 by 1.7e-4) for the linear
  schedule, while its float32 β are within 1.1e-7 of the reference's float64 ones; ᾱ is then the float64 cumprod.
* ``noisy_latents`` is taken as given (the caller's diffusers ``add_noise``) instead of the reference's ``q_sample``
  (float64 coefficients cast to float32). add_noise reads float32 ᾱ, so for small t its sqrt(1 - ᾱ) is up to 8e-5
  (relative) off the reference's, which moves the loss by ~1e-5 (relative).
* ``snr_gamma`` (this project's Min-SNR-γ option, off by default and not used by PixArt-Σ) weights the MSE term by
  min(SNR, γ) / SNR and leaves the vb term unweighted, as Min-SNR's own learned-variance code does
  (TiankaiHang/Min-SNR-Diffusion-Training, ``guided_diffusion/gaussian_diffusion.py``).
* The reference's masked-token (``mask_ratio``) branch is left out: PixArt-Σ's training passes no mask ratio.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

BIN_HALF_WIDTH = 1.0 / 255.0  # the reference's decoder treats x_0 as uint8 levels rescaled to [-1, 1]
EDGE = 0.999  # beyond ±EDGE the decoder's bin extends to ∓infinity


class _Schedule(NamedTuple):
    """Per-timestep float32 columns of the reference's float64 schedule, indexed by the batch's timesteps."""

    posterior_mean_x0: torch.Tensor
    posterior_mean_xt: torch.Tensor
    posterior_log_variance: torch.Tensor  # clipped: the t = 1 value at t = 0
    log_beta: torch.Tensor
    sqrt_recip_alpha_bar: torch.Tensor
    sqrt_recip_alpha_bar_minus_one: torch.Tensor
    snr: torch.Tensor


def _schedule_at(betas: torch.Tensor, timesteps: torch.Tensor, ndim: int) -> _Schedule:
    """The reference's ``GaussianDiffusion.__init__`` tables in float64, cast to float32 and picked per sample."""
    beta = betas.detach().to("cpu", torch.float64)
    alpha_bar = torch.cumprod(1.0 - beta, dim=0)
    alpha_bar_prev = torch.cat([alpha_bar.new_ones(1), alpha_bar[:-1]])
    posterior_variance = beta * (1.0 - alpha_bar_prev) / (1.0 - alpha_bar)
    tables = _Schedule(
        posterior_mean_x0=beta * alpha_bar_prev.sqrt() / (1.0 - alpha_bar),
        posterior_mean_xt=(1.0 - alpha_bar_prev) * (1.0 - beta).sqrt() / (1.0 - alpha_bar),
        posterior_log_variance=torch.cat([posterior_variance[1:2], posterior_variance[1:]]).log(),
        log_beta=beta.log(),
        sqrt_recip_alpha_bar=(1.0 / alpha_bar).sqrt(),
        sqrt_recip_alpha_bar_minus_one=(1.0 / alpha_bar - 1.0).sqrt(),
        snr=alpha_bar / (1.0 - alpha_bar),
    )
    shape = (-1,) + (1,) * (ndim - 1)
    return _Schedule(
        *(table.to(device=timesteps.device, dtype=torch.float32)[timesteps].view(shape) for table in tables)
    )


def _gaussian_kl(
    mean1: torch.Tensor, logvar1: torch.Tensor, mean2: torch.Tensor, logvar2: torch.Tensor
) -> torch.Tensor:
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) per element, in nats (the reference's ``normal_kl``)."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def _approx_standard_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    """The tanh approximation of Φ the reference uses (not erf), so the t = 0 term matches it exactly."""
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def _discretized_gaussian_nll(x: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor) -> torch.Tensor:
    """-log P(bin of x) under N(mean, e^(2 log_scale)) per element, in nats; bins of ±1/255, open-ended past ±0.999."""
    inv_std = torch.exp(-log_scale)
    cdf_plus = _approx_standard_normal_cdf(inv_std * (x - mean + BIN_HALF_WIDTH))
    cdf_min = _approx_standard_normal_cdf(inv_std * (x - mean - BIN_HALF_WIDTH))
    log_probs = torch.where(
        x < -EDGE,
        cdf_plus.clamp(min=1e-12).log(),
        torch.where(x > EDGE, (1.0 - cdf_min).clamp(min=1e-12).log(), (cdf_plus - cdf_min).clamp(min=1e-12).log()),
    )
    return -log_probs


def learned_variance_loss(
    model_output: torch.Tensor,
    noisy_latents: torch.Tensor,
    latents: torch.Tensor,
    noise: torch.Tensor,
    timesteps: torch.Tensor,
    betas: torch.Tensor,
    *,
    snr_gamma: float | None = None,
) -> torch.Tensor:
    """Per-sample float32 loss [N] of PixArt-Σ's training: ``mse + vb`` (module docstring for the reference).

    ``model_output`` [N, 2C, ...]: the eps prediction, then the variance value v in [-1, 1]; ``noisy_latents``,
    ``latents`` (x_0) and ``noise`` [N, C, ...]; ``timesteps`` [N] integer indices into ``betas`` (the training
    scheduler's ``betas``, e.g. ``DDPMScheduler.betas``; at least two steps). The training loss is the mean over
    the batch, as in the reference's ``train.py``.
    """
    channels = latents.shape[1]
    if model_output.shape[1] != 2 * channels:
        raise ValueError(f"learned variance needs 2 x {channels} output channels, got {model_output.shape[1]}")
    with torch.autocast(model_output.device.type, enabled=False):
        eps, variance_value = model_output.float().split(channels, dim=1)
        x_t, x_0, noise = noisy_latents.float(), latents.float(), noise.float()
        at = _schedule_at(betas, timesteps, x_0.ndim)
        dims = tuple(range(1, x_0.ndim))

        mse = ((noise - eps) ** 2).mean(dim=dims)
        if snr_gamma is not None:
            mse = mse * at.snr.flatten().clamp(max=snr_gamma) / at.snr.flatten()

        # x_t's weight cancels in the KL and is 0 at t = 0, but both means are formed as the reference forms them,
        # so the float32 rounding is the reference's.
        true_mean = at.posterior_mean_x0 * x_0 + at.posterior_mean_xt * x_t
        predicted_x0 = at.sqrt_recip_alpha_bar * x_t - at.sqrt_recip_alpha_bar_minus_one * eps.detach()
        model_mean = at.posterior_mean_x0 * predicted_x0 + at.posterior_mean_xt * x_t
        fraction = (variance_value + 1.0) / 2.0
        model_log_variance = fraction * at.log_beta + (1.0 - fraction) * at.posterior_log_variance

        kl = _gaussian_kl(true_mean, at.posterior_log_variance, model_mean, model_log_variance).mean(dim=dims)
        decoder_nll = _discretized_gaussian_nll(x_0, model_mean, 0.5 * model_log_variance).mean(dim=dims)
        vb = torch.where(timesteps == 0, decoder_nll, kl) / math.log(2.0)
        return mse + vb
