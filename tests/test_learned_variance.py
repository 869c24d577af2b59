"""PixArt-Σ's learned-variance objective against a hand computation and against PixArt-sigma's own formulas.

The reference (PixArt-alpha/PixArt-sigma, ``diffusion/model/gaussian_diffusion.py``, ``diffusion_utils.py``,
``iddpm.py``) is transcribed below in numpy float64, independently of the module under test.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler, DPMSolverMultistepScheduler

from lightning_modules.backbones.learned_variance import learned_variance_loss

# PixArt-alpha/PixArt-Sigma-XL-2-1024-MS, scheduler/scheduler_config.json (the β fields the Σ pipelines ship).
PUBLISHED_SCHEDULER = {
    "_class_name": "DPMSolverMultistepScheduler",
    "algorithm_type": "dpmsolver++",
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "beta_start": 0.0001,
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "solver_order": 2,
    "steps_offset": 0,
    "timestep_spacing": "linspace",
    "trained_betas": None,
}


# ------------------------------------------------------------------ the reference, transcribed in numpy float64
def reference_betas(steps: int = 1000) -> np.ndarray:
    """``get_named_beta_schedule("linear", steps)``, then ``SpacedDiffusion``'s β from ᾱ (IDDPM keeps all steps)."""
    scale = 1000 / steps
    betas = np.linspace(scale * 0.0001, scale * 0.02, steps, dtype=np.float64)
    alpha_bar = np.cumprod(1.0 - betas)
    return 1.0 - alpha_bar / np.append(1.0, alpha_bar[:-1])


def reference_loss(model_output: np.ndarray, x_0: np.ndarray, noise: np.ndarray, t: np.ndarray, betas: np.ndarray):
    """``training_losses(...)["loss"]`` for LEARNED_RANGE, EPSILON, LossType.MSE, snr off; x_t from ``q_sample``."""
    alphas = 1.0 - betas
    alpha_bar = np.cumprod(alphas)
    alpha_bar_prev = np.append(1.0, alpha_bar[:-1])
    posterior_variance = betas * (1.0 - alpha_bar_prev) / (1.0 - alpha_bar)
    posterior_log_variance_clipped = np.log(np.append(posterior_variance[1], posterior_variance[1:]))
    coef1 = betas * np.sqrt(alpha_bar_prev) / (1.0 - alpha_bar)
    coef2 = (1.0 - alpha_bar_prev) * np.sqrt(alphas) / (1.0 - alpha_bar)

    def per_sample(table):
        return table[t].reshape(-1, 1, 1, 1)

    def mean_flat(a):
        return a.mean(axis=(1, 2, 3))

    channels = x_0.shape[1]
    x_t = per_sample(np.sqrt(alpha_bar)) * x_0 + per_sample(np.sqrt(1.0 - alpha_bar)) * noise
    eps, values = model_output[:, :channels], model_output[:, channels:]
    # q_posterior_mean_variance
    true_mean = per_sample(coef1) * x_0 + per_sample(coef2) * x_t
    true_log_variance = per_sample(posterior_log_variance_clipped)
    # p_mean_variance, LEARNED_RANGE, clip_denoised=False
    min_log, max_log = per_sample(posterior_log_variance_clipped), per_sample(np.log(betas))
    frac = (values + 1) / 2
    model_log_variance = frac * max_log + (1 - frac) * min_log
    pred_xstart = per_sample(np.sqrt(1.0 / alpha_bar)) * x_t - per_sample(np.sqrt(1.0 / alpha_bar - 1)) * eps
    model_mean = per_sample(coef1) * pred_xstart + per_sample(coef2) * x_t
    # normal_kl
    kl = 0.5 * (
        -1.0
        + model_log_variance
        - true_log_variance
        + np.exp(true_log_variance - model_log_variance)
        + (true_mean - model_mean) ** 2 * np.exp(-model_log_variance)
    )
    kl = mean_flat(kl) / np.log(2.0)

    # discretized_gaussian_log_likelihood with approx_standard_normal_cdf
    def cdf(x):
        return 0.5 * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * np.power(x, 3))))

    centered = x_0 - model_mean
    inv_stdv = np.exp(-0.5 * model_log_variance)
    cdf_plus = cdf(inv_stdv * (centered + 1.0 / 255.0))
    cdf_min = cdf(inv_stdv * (centered - 1.0 / 255.0))
    log_probs = np.where(
        x_0 < -0.999,
        np.log(np.maximum(cdf_plus, 1e-12)),
        np.where(x_0 > 0.999, np.log(np.maximum(1.0 - cdf_min, 1e-12)), np.log(np.maximum(cdf_plus - cdf_min, 1e-12))),
    )
    decoder_nll = mean_flat(-log_probs) / np.log(2.0)
    vb = np.where(t == 0, decoder_nll, kl)
    mse = mean_flat((noise - eps) ** 2)
    return mse + vb


def random_case(timesteps: list[int], channels: int = 4, size: int = 4, seed: int = 0):
    """Latents, noise and a model output near a trained model's: eps close to the noise, v spread over [-1, 1]."""
    rng = np.random.default_rng(seed)
    shape = (len(timesteps), channels, size, size)
    x_0, noise = rng.standard_normal(shape), rng.standard_normal(shape)
    eps = noise + 0.5 * rng.standard_normal(shape)
    values = np.tanh(rng.standard_normal(shape))
    return np.concatenate([eps, values], axis=1), x_0, noise, np.array(timesteps)


def reference_noisy(x_0: np.ndarray, noise: np.ndarray, t: np.ndarray) -> np.ndarray:
    """The reference's ``q_sample`` in float64."""
    alpha_bar = np.cumprod(1.0 - reference_betas())[t].reshape(-1, 1, 1, 1)
    return np.sqrt(alpha_bar) * x_0 + np.sqrt(1.0 - alpha_bar) * noise


def torch_case(model_output, x_0, noise, t):
    """The module's inputs as float32 tensors, x_t the reference's own (add_noise's is checked separately)."""
    tensors = (torch.tensor(a, dtype=torch.float32) for a in (model_output, reference_noisy(x_0, noise, t), x_0, noise))
    return (*tensors, torch.tensor(t, dtype=torch.long))


@pytest.fixture(scope="module")
def scheduler() -> DDPMScheduler:
    return DDPMScheduler.from_config(PUBLISHED_SCHEDULER)


# ---------------------------------------------------------------------------------------------------- tests
def test_loss_on_a_known_input_equals_the_hand_computation():
    """β = (0.1, 0.2, 0.3); sample 0 at t = 2 takes the KL branch, sample 1 at t = 0 the decoder-NLL branch."""
    betas = [0.1, 0.2, 0.3]
    alpha_bar = [0.9, 0.9 * 0.8, 0.9 * 0.8 * 0.7]
    x0 = [[0.5, -0.25, 1.0, 0.0], [-1.0, 0.1, 1.0, -0.3]]  # sample 1: both open-ended bins and two inner ones
    noise = [[1.0, -0.5, 0.25, -1.0], [0.2, -0.4, 0.6, 0.0]]
    eps = [[0.8, -0.5, 0.0, -1.5], [0.2, -0.38, 0.5, 0.01]]
    v = [[-1.0, 1.0, 0.0, 0.5], [0.0, -0.5, 1.0, -1.0]]
    ts = [2, 0]

    def phi(x):  # the reference's tanh approximation of the normal CDF
        return 0.5 * (1.0 + math.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))

    # posterior variance at t = 1 and t = 2; its log at t = 0 is clipped to the t = 1 value
    var1 = 0.2 * (1 - 0.9) / (1 - 0.72)
    var2 = 0.3 * (1 - 0.72) / (1 - 0.504)
    clipped_log_var = {0: math.log(var1), 2: math.log(var2)}
    expected, noisy = [], []
    for i, t in enumerate(ts):
        a, a_prev, beta = alpha_bar[t], (alpha_bar[t - 1] if t > 0 else 1.0), betas[t]
        c1, c2 = beta * math.sqrt(a_prev) / (1 - a), (1 - a_prev) * math.sqrt(1 - beta) / (1 - a)
        x_t = [math.sqrt(a) * x + math.sqrt(1 - a) * n for x, n in zip(x0[i], noise[i], strict=True)]
        noisy.append(x_t)
        mse = sum((n - e) ** 2 for n, e in zip(noise[i], eps[i], strict=True)) / 4
        terms = []
        for x, xt, e, value in zip(x0[i], x_t, eps[i], v[i], strict=True):
            true_mean = c1 * x + c2 * xt
            model_mean = c1 * (xt - math.sqrt(1 - a) * e) / math.sqrt(a) + c2 * xt
            f = (value + 1) / 2
            log_var = f * math.log(beta) + (1 - f) * clipped_log_var[t]
            if t > 0:
                log_var_q = clipped_log_var[t]
                ratio = math.exp(log_var_q - log_var)
                terms.append(
                    0.5 * (-1 + log_var - log_var_q + ratio + (true_mean - model_mean) ** 2 / math.exp(log_var))
                )
            else:
                std = math.exp(0.5 * log_var)
                upper, lower = phi((x - model_mean + 1 / 255) / std), phi((x - model_mean - 1 / 255) / std)
                p = upper if x < -0.999 else (1 - lower if x > 0.999 else upper - lower)
                terms.append(-math.log(max(p, 1e-12)))
        expected.append(mse + sum(terms) / 4 / math.log(2))

    def image(rows):  # [N, 1, 2, 2]
        return torch.tensor(rows, dtype=torch.float32).view(2, 1, 2, 2)

    loss = learned_variance_loss(
        torch.cat([image(eps), image(v)], dim=1),
        image(noisy),
        image(x0),
        image(noise),
        torch.tensor(ts),
        torch.tensor(betas, dtype=torch.float64),
    )
    assert loss.dtype == torch.float32 and loss.shape == (2,)
    assert loss.tolist() == pytest.approx(expected, rel=1e-5)
    assert expected[0] > 0.1 and expected[1] > 1.0  # both vb terms weigh in, not just the MSE


def test_matches_the_reference_transcription_over_timesteps(scheduler):
    timesteps = [0, 0, 0, 0, 1, 2, 3, 10, 50, 100, 249, 250, 400, 500, 750, 900, 990, 998, 999, 999]
    timesteps += np.random.default_rng(1).integers(0, 1000, 44).tolist()
    case = random_case(timesteps)
    expected = reference_loss(*case, reference_betas())
    loss = learned_variance_loss(*torch_case(*case), scheduler.betas)
    np.testing.assert_allclose(loss.numpy(), expected, rtol=1e-5)


def test_the_bound_trains_only_the_variance(scheduler):
    """d(loss)/d(eps half) is the MSE's gradient alone (stop-gradient mean); the variance half gets the bound's.

    The bound's pull on v fades with t (the clipped posterior variance and β_t converge), so the non-zero check is on
    the early steps; the finite differences cover all."""
    timesteps = [0, 1, 10, 999]
    model_output, x_0, noise, t = random_case(timesteps, channels=2, size=2, seed=3)
    output, noisy, latents, noise_t, steps = torch_case(model_output, x_0, noise, t)
    output.requires_grad_(True)
    learned_variance_loss(output, noisy, latents, noise_t, steps, scheduler.betas).sum().backward()
    eps_grad, variance_grad = output.grad.split(2, dim=1)
    elements = 2 * 2 * 2
    torch.testing.assert_close(eps_grad, 2 * (output[:, :2].detach() - noise_t) / elements)

    # the variance half: central differences of the float64 reference, per element
    betas = reference_betas()
    numeric = np.zeros_like(model_output[:, 2:])
    step = 1e-5
    for index in np.ndindex(numeric.shape):
        shifted = [model_output.copy(), model_output.copy()]
        shifted[0][(index[0], index[1] + 2, *index[2:])] += step
        shifted[1][(index[0], index[1] + 2, *index[2:])] -= step
        up, down = (reference_loss(m, x_0, noise, t, betas)[index[0]] for m in shifted)
        numeric[index] = (up - down) / (2 * step)
    assert (np.abs(numeric[:3]).reshape(3, -1).max(axis=1) > 1e-4).all()
    np.testing.assert_allclose(variance_grad.numpy(), numeric, rtol=2e-3, atol=1e-5)


def test_snr_gamma_weights_the_mse_term_only(scheduler):
    timesteps = [0, 5, 100, 300, 600, 999]
    case = random_case(timesteps, seed=5)
    inputs = torch_case(*case)
    plain = learned_variance_loss(*inputs, scheduler.betas)
    weighted = learned_variance_loss(*inputs, scheduler.betas, snr_gamma=5.0)
    alpha_bar = np.cumprod(1.0 - reference_betas())[case[3]]
    snr = alpha_bar / (1.0 - alpha_bar)
    mse = ((case[2] - case[0][:, :4]) ** 2).mean(axis=(1, 2, 3))
    np.testing.assert_allclose((weighted - plain).numpy(), (np.minimum(snr, 5.0) / snr - 1.0) * mse, atol=2e-6)
    assert (snr[:3] > 5.0).all() and (snr[3:] < 5.0).all()  # both sides of the clamp are exercised


def test_pixart_sigma_scheduler_is_the_reference_schedule():
    """The published config's β (as DDPMScheduler for training and as the shipped DPM-Solver) are IDDPM's linear ones;
    its float32 β give the float64 schedule's loss; its add_noise is the reference's q_sample at the same t."""
    expected_betas = reference_betas()
    for cls in (DDPMScheduler, DPMSolverMultistepScheduler):
        published = cls.from_config(PUBLISHED_SCHEDULER)
        np.testing.assert_allclose(published.betas.double().numpy(), expected_betas, rtol=2e-7)
        np.testing.assert_allclose(published.alphas_cumprod.double().numpy(), np.cumprod(1 - expected_betas), rtol=1e-6)

    training = DDPMScheduler.from_config(PUBLISHED_SCHEDULER)
    case = random_case([0, 0, 1, 2, 500, 998, 999], seed=7)
    model_output, noisy, latents, noise, t = torch_case(*case)
    torch.testing.assert_close(
        learned_variance_loss(model_output, noisy, latents, noise, t, training.betas),
        learned_variance_loss(model_output, noisy, latents, noise, t, torch.from_numpy(expected_betas)),
        rtol=1e-5,
        atol=0.0,
    )
    # add_noise works from float32 ᾱ: for small t its sqrt(1 - ᾱ) is up to 8e-5 (relative; 1.1e-6 absolute) off the
    # float64 value, which moves the loss by ~1e-5 (relative); an off-by-one t would move x_t by ~5e-3 per unit noise.
    added = training.add_noise(latents, noise, t)
    torch.testing.assert_close(added, noisy, rtol=0.0, atol=5e-6)
    np.testing.assert_allclose(
        learned_variance_loss(model_output, added, latents, noise, t, training.betas).numpy(),
        reference_loss(*case, expected_betas),
        rtol=3e-5,
    )


def test_rejects_an_output_without_the_variance_half(scheduler):
    _, x_t, x_0, noise, t = torch_case(*random_case([5]))
    with pytest.raises(ValueError, match="2 x 4 output channels"):
        learned_variance_loss(torch.zeros_like(x_0), x_t, x_0, noise, t, scheduler.betas)
