"""Float64 NumPy reference of the diffusion core, written from the papers, not from the package.

Shared by ``test_schedules.py``, ``test_diffusion.py`` and ``test_losses.py``, with the two
helpers they have in common: the elementwise tolerance check (:func:`assert_close`) and
:func:`call_variant`, which runs a function under a ``chex.variants`` variant. Nothing here
imports ``diffusion_jax``; where the package uses a closed form, this module derives the same
quantity another way when one exists (the posterior by conditioning two Gaussians, the
cumulative product through ``log1p``/``expm1``, bin masses from the tail nearest the bin), so a
shared algebra slip cannot pass unnoticed.

Index convention (DDPM reference code, improved-diffusion, diffusers): table index ``i`` in
``{0, ..., T-1}`` is step ``i + 1`` of Ho et al. (2020).

Sources:
  Ho, Jain & Abbeel 2020 (DDPM): q(x_t | x_0) eq. 4, posterior eqs. 6-7, L_0 decoder eq. 13.
  Nichol & Dhariwal 2021 (improved DDPM): cosine schedule eq. 17, learned range eq. 15,
    L_hybrid = L_simple + lambda L_vlb with lambda = 1e-3 (sec. 3.1).
  Song, Meng & Ermon 2021 (DDIM): eq. 12 and sigma_t(eta) eq. 16.
  Salimans & Ho 2022: v = alpha_t eps - sigma_t x (with alpha_t^2 = abar_t, sigma_t^2 = 1 - abar_t).
  Hang et al. 2023 (min-SNR): per-target weights chosen so each loss is min(SNR, g) MSE(x_0).
"""

from __future__ import annotations

import math

import chex
import jax
import numpy as np
from scipy import special, stats

LN2 = math.log(2.0)


# --------------------------------------------------------------------------------------------
# Schedules.
# --------------------------------------------------------------------------------------------


def _ramp(num_timesteps: int, start: float, end: float) -> np.ndarray:
    """``num_timesteps`` evenly spaced points from ``start`` to ``end`` (just ``start`` if T=1)."""
    if num_timesteps == 1:
        return np.array([start], np.float64)
    fraction = np.arange(num_timesteps, dtype=np.float64) / (num_timesteps - 1)
    return start + (end - start) * fraction


def linear_betas(num_timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02):
    """DDPM sec. 4: beta_t increasing linearly from beta_1 = 1e-4 to beta_T = 0.02."""
    return _ramp(num_timesteps, beta_start, beta_end)


def quadratic_betas(num_timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02):
    """DDPM code's "quad": sqrt(beta_t) linear between the square roots of the endpoints."""
    return _ramp(num_timesteps, math.sqrt(beta_start), math.sqrt(beta_end)) ** 2


def sigmoid_betas(num_timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02):
    """beta_start + (beta_end - beta_start) * sigmoid(x), x evenly spaced on [-6, 6]."""
    return beta_start + (beta_end - beta_start) * special.expit(_ramp(num_timesteps, -6.0, 6.0))


def cosine_alpha_bar(step, num_timesteps: int, s: float = 0.008):
    """Improved DDPM eq. 17: abar(t) = f(t) / f(0), f(t) = cos^2(((t / T + s) / (1 + s)) pi / 2)."""

    def f(tau):
        return (
            np.cos((np.asarray(tau, np.float64) / num_timesteps + s) / (1.0 + s) * np.pi / 2) ** 2
        )

    return f(step) / f(0.0)


def cosine_betas(num_timesteps: int, s: float = 0.008, max_beta: float = 0.999):
    """Improved DDPM: beta_t = 1 - abar(t) / abar(t - 1), t = 1..T, clipped at 0.999."""
    steps = np.arange(1, num_timesteps + 1, dtype=np.float64)
    ratio = cosine_alpha_bar(steps, num_timesteps, s) / cosine_alpha_bar(
        steps - 1, num_timesteps, s
    )
    return np.minimum(1.0 - ratio, max_beta)


BETAS = {
    "linear": linear_betas,
    "quadratic": quadratic_betas,
    "sigmoid": sigmoid_betas,
    "cosine": cosine_betas,
}


def tables(betas) -> dict[str, np.ndarray]:
    """Every per-timestep quantity of the diffusion, float64, from the betas (T >= 2).

    The posterior q(x_{t-1} | x_t, x_0) is obtained by conditioning: its precision is the sum of
    the precision of q(x_{t-1} | x_0) = N(sqrt(abar_{t-1}) x_0, 1 - abar_{t-1}) and that of the
    likelihood q(x_t | x_{t-1}) = N(sqrt(alpha_t) x_{t-1}, beta_t) seen as a function of
    x_{t-1} (alpha_t / beta_t); its mean is the precision-weighted sum of the two. At index 0
    (paper step 1) x_{t-1} is x_0 itself: variance 0, mean x_0.
    """
    betas = np.asarray(betas, np.float64)
    alphas = 1.0 - betas
    log_alphas_cumprod = np.cumsum(np.log1p(-betas))
    alphas_cumprod = np.exp(log_alphas_cumprod)
    one_minus_alphas_cumprod = -np.expm1(log_alphas_cumprod)
    alphas_cumprod_prev = np.concatenate([[1.0], alphas_cumprod[:-1]])
    one_minus_prev = np.concatenate([[0.0], one_minus_alphas_cumprod[:-1]])

    posterior_variance = np.zeros_like(betas)
    coef_x0 = np.ones_like(betas)
    coef_xt = np.zeros_like(betas)
    rest = slice(1, None)
    precision = 1.0 / one_minus_prev[rest] + alphas[rest] / betas[rest]
    posterior_variance[rest] = 1.0 / precision
    coef_x0[rest] = (
        posterior_variance[rest] * np.sqrt(alphas_cumprod_prev[rest]) / one_minus_prev[rest]
    )
    coef_xt[rest] = posterior_variance[rest] * np.sqrt(alphas[rest]) / betas[rest]

    log_posterior_clipped = np.log(
        np.concatenate([posterior_variance[1:2], posterior_variance[1:]])
    )
    fixed_large = np.concatenate([posterior_variance[1:2], betas[1:]])
    return dict(
        betas=betas,
        alphas=alphas,
        alphas_cumprod=alphas_cumprod,
        alphas_cumprod_prev=alphas_cumprod_prev,
        sqrt_alphas_cumprod=np.sqrt(alphas_cumprod),
        sqrt_one_minus_alphas_cumprod=np.sqrt(one_minus_alphas_cumprod),
        log_one_minus_alphas_cumprod=np.log(one_minus_alphas_cumprod),
        sqrt_recip_alphas_cumprod=np.exp(-0.5 * log_alphas_cumprod),
        sqrt_recipm1_alphas_cumprod=np.sqrt(one_minus_alphas_cumprod / alphas_cumprod),
        posterior_variance=posterior_variance,
        posterior_log_variance_clipped=log_posterior_clipped,
        posterior_mean_coef1=coef_x0,
        posterior_mean_coef2=coef_xt,
        fixed_large_variance=fixed_large,
        fixed_large_log_variance=np.log(fixed_large),
        log_snr=log_alphas_cumprod - np.log(one_minus_alphas_cumprod),
        one_minus_alphas_cumprod=one_minus_alphas_cumprod,
    )


def schedule_tables(name: str, num_timesteps: int, **kwargs) -> dict[str, np.ndarray]:
    """Reference tables of a named schedule."""
    return tables(BETAS[name](num_timesteps, **kwargs))


# --------------------------------------------------------------------------------------------
# Forward process, posterior, reverse step.
# --------------------------------------------------------------------------------------------


def at(table: np.ndarray, t, ndim: int) -> np.ndarray:
    """``table[t]`` shaped ``[B, 1, ..., 1]`` to broadcast against rank-``ndim`` data."""
    values = np.asarray(table, np.float64)[np.asarray(t)]
    return values.reshape(values.shape + (1,) * (ndim - 1))


def q_sample(tab, x0, t, noise):
    """DDPM eq. 4: x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps."""
    nd = np.ndim(x0)
    return np.sqrt(at(tab["alphas_cumprod"], t, nd)) * x0 + np.sqrt(
        at(tab["one_minus_alphas_cumprod"], t, nd)
    ) * np.asarray(noise, np.float64)


def q_mean_variance(tab, x0, t):
    """Mean, variance and log-variance of q(x_t | x_0), variance shaped ``[B, 1, ...]``."""
    nd = np.ndim(x0)
    abar = at(tab["alphas_cumprod"], t, nd)
    variance = at(tab["one_minus_alphas_cumprod"], t, nd)
    return np.sqrt(abar) * x0, variance, np.log(variance)


def q_posterior(tab, x0, x_t, t):
    """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x_0)."""
    nd = np.ndim(x_t)
    mean = (
        at(tab["posterior_mean_coef1"], t, nd) * x0 + at(tab["posterior_mean_coef2"], t, nd) * x_t
    )
    return (
        mean,
        at(tab["posterior_variance"], t, nd),
        at(tab["posterior_log_variance_clipped"], t, nd),
    )


def x0_from_eps(tab, x_t, t, eps):
    """Invert eq. 4 for x_0 given eps."""
    nd = np.ndim(x_t)
    abar = at(tab["alphas_cumprod"], t, nd)
    return (x_t - np.sqrt(at(tab["one_minus_alphas_cumprod"], t, nd)) * eps) / np.sqrt(abar)


def eps_from_x0(tab, x_t, t, x0):
    """Invert eq. 4 for eps given x_0."""
    nd = np.ndim(x_t)
    abar = at(tab["alphas_cumprod"], t, nd)
    return (x_t - np.sqrt(abar) * x0) / np.sqrt(at(tab["one_minus_alphas_cumprod"], t, nd))


def v_target(tab, x0, t, noise):
    """Salimans & Ho: v = alpha eps - sigma x_0."""
    nd = np.ndim(x0)
    alpha = np.sqrt(at(tab["alphas_cumprod"], t, nd))
    sigma = np.sqrt(at(tab["one_minus_alphas_cumprod"], t, nd))
    return alpha * noise - sigma * x0


def x0_from_v(tab, x_t, t, v):
    """Solve [x_t; v] = [[alpha, sigma], [-sigma, alpha]] [x_0; eps] for x_0.

    The matrix is a rotation (alpha^2 + sigma^2 = 1), so its inverse is its transpose:
    x_0 = alpha x_t - sigma v.
    """
    nd = np.ndim(x_t)
    alpha = np.sqrt(at(tab["alphas_cumprod"], t, nd))
    sigma = np.sqrt(at(tab["one_minus_alphas_cumprod"], t, nd))
    return alpha * x_t - sigma * v


def predict_x0(tab, out, x_t, t, parameterization):
    """The x_0 implied by a model output of the given parameterization."""
    if parameterization == "eps":
        return x0_from_eps(tab, x_t, t, out)
    if parameterization == "x0":
        return np.asarray(out, np.float64)
    if parameterization == "v":
        return x0_from_v(tab, x_t, t, out)
    raise ValueError(parameterization)


def clip(x0, clip_x0):
    """The ``clip_x0`` option: False, True ([-1, 1]) or a (low, high) range."""
    if clip_x0 is False:
        return x0
    low, high = (-1.0, 1.0) if clip_x0 is True else clip_x0
    return np.minimum(np.maximum(x0, low), high)


def p_mean_variance(tab, model_output, x_t, t, parameterization, variance, clip_x0):
    """The reverse Gaussian: posterior mean at the (clipped) predicted x_0, and its variance.

    fixed_small: sigma^2 = posterior variance (log clipped at index 0); fixed_large:
    sigma^2 = beta_t with index 0 taking the posterior variance of index 1 (improved-diffusion);
    learned_range (improved DDPM eq. 15): log sigma^2 = f log beta_t + (1 - f) log beta~_t with
    f = (v + 1) / 2 and v the second half of the output channels.
    """
    model_output = np.asarray(model_output, np.float64)
    x_t = np.asarray(x_t, np.float64)
    nd = x_t.ndim
    shape = x_t.shape
    if variance == "learned_range":
        channels = shape[-1]
        out, var_out = model_output[..., :channels], model_output[..., channels:]
        frac = (var_out + 1.0) / 2.0
        log_var = frac * np.log(at(tab["betas"], t, nd)) + (1.0 - frac) * at(
            tab["posterior_log_variance_clipped"], t, nd
        )
        var = np.exp(log_var)
    elif variance == "fixed_small":
        out = model_output
        var = at(tab["posterior_variance"], t, nd)
        log_var = at(tab["posterior_log_variance_clipped"], t, nd)
    elif variance == "fixed_large":
        out = model_output
        var = at(tab["fixed_large_variance"], t, nd)
        log_var = np.log(var)
    else:
        raise ValueError(variance)
    pred_x0 = clip(predict_x0(tab, out, x_t, t, parameterization), clip_x0)
    mean, _, _ = q_posterior(tab, pred_x0, x_t, t)
    return mean, np.broadcast_to(var, shape), np.broadcast_to(log_var, shape), pred_x0


def p_sample(tab, model_output, x_t, t, noise, parameterization, variance, clip_x0):
    """Ancestral step x_{t-1} = mean + sigma z, with z = 0 at the last step (index 0)."""
    mean, _, log_var, _ = p_mean_variance(
        tab, model_output, x_t, t, parameterization, variance, clip_x0
    )
    last = at(np.asarray(t) == 0, np.arange(len(t)), np.ndim(x_t))
    return np.where(last, mean, mean + np.exp(0.5 * log_var) * noise)


def ddim_step(tab, model_output, x_t, t, t_prev, noise, eta, parameterization, clip_x0):
    """DDIM eq. 12 from index t to index t_prev (-1: to x_0, abar = 1); eps re-derived from x_0.

    sigma(eta) = eta sqrt((1 - a_prev) / (1 - a_t)) sqrt(1 - a_t / a_prev) (eq. 16), computed
    with 1 - a_t / a_prev = (a_prev - a_t) / a_prev and one-minus terms taken from the table
    (no cancellation).
    """
    x_t = np.asarray(x_t, np.float64)
    nd = x_t.ndim
    channels = x_t.shape[-1]
    out = np.asarray(model_output, np.float64)[..., :channels]
    pred_x0 = clip(predict_x0(tab, out, x_t, t, parameterization), clip_x0)
    eps = eps_from_x0(tab, x_t, t, pred_x0)
    a_t = at(tab["alphas_cumprod"], t, nd)
    one_minus_a_t = at(tab["one_minus_alphas_cumprod"], t, nd)
    t_prev = np.asarray(t_prev)
    to_x0 = at(t_prev < 0, np.arange(len(t_prev)), nd)
    safe_prev = np.maximum(t_prev, 0)
    a_prev = np.where(to_x0, 1.0, at(tab["alphas_cumprod"], safe_prev, nd))
    one_minus_a_prev = np.where(to_x0, 0.0, at(tab["one_minus_alphas_cumprod"], safe_prev, nd))
    sigma = eta * np.sqrt(one_minus_a_prev / one_minus_a_t * (a_prev - a_t) / a_prev)
    direction = np.sqrt(np.maximum(one_minus_a_prev - sigma**2, 0.0))
    return np.sqrt(a_prev) * pred_x0 + direction * eps + sigma * noise


# --------------------------------------------------------------------------------------------
# Losses.
# --------------------------------------------------------------------------------------------


def normal_kl(mean1, logvar1, mean2, logvar2):
    """KL(N(m1, s1^2) || N(m2, s2^2)) = log(s2 / s1) + (s1^2 + (m1 - m2)^2) / (2 s2^2) - 1/2."""
    var1, var2 = np.exp(logvar1), np.exp(logvar2)
    return 0.5 * (logvar2 - logvar1) + (var1 + (mean1 - mean2) ** 2) / (2.0 * var2) - 0.5


def bin_log_prob(x, mean, log_scale, num_bins: int = 256):
    """log P(bin of x) under N(mean, exp(log_scale)^2), DDPM eq. 13 (scipy, float64).

    The ``num_bins`` levels of [-1, 1] are 2 / (num_bins - 1) apart; each owns the interval of
    that width around it, the first extending to -inf and the last to +inf. The mass of an
    interior bin is taken from the tail nearest to it, so it keeps its relative precision.
    """
    x, mean = np.asarray(x, np.float64), np.asarray(mean, np.float64)
    scale = np.exp(np.asarray(log_scale, np.float64))
    half = 1.0 / (num_bins - 1)
    level = np.rint((x + 1.0) / (2.0 * half)).astype(np.int64)
    upper = (x + half - mean) / scale
    lower = (x - half - mean) / scale
    with np.errstate(divide="ignore"):  # a mass that underflows float64 has log -inf
        interior = np.where(
            lower > 0,
            np.log(stats.norm.sf(lower) - stats.norm.sf(upper)),
            np.log(stats.norm.cdf(upper) - stats.norm.cdf(lower)),
        )
    return np.where(
        level <= 0,
        stats.norm.logcdf(upper),
        np.where(level >= num_bins - 1, stats.norm.logsf(lower), interior),
    )


def mean_flat(x):
    """Mean over every axis but the first."""
    x = np.asarray(x, np.float64)
    return x.reshape(x.shape[0], -1).mean(axis=1)


def prior_bpd(tab, x0):
    """L_T = KL(q(x_T | x_0) || N(0, I)), bits/dim."""
    t = np.full((x0.shape[0],), len(tab["betas"]) - 1)
    mean, _, log_var = q_mean_variance(tab, x0, t)
    return mean_flat(normal_kl(mean, log_var, 0.0, 0.0)) / LN2


def vb_terms_bpd(tab, model_output, x0, x_t, t, parameterization, variance, clip_x0, num_bins=256):
    """L_t in bits/dim: KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)) for t > 0.

    At index 0 it is the decoder's -log p(x_0 | x_1), the reverse mean and scale at t = 0.
    """
    true_mean, _, true_log_var = q_posterior(tab, x0, x_t, t)
    mean, _, log_var, _ = p_mean_variance(
        tab, model_output, x_t, t, parameterization, variance, clip_x0
    )
    kl = mean_flat(normal_kl(true_mean, true_log_var, mean, log_var)) / LN2
    decoder = -mean_flat(bin_log_prob(x0, mean, 0.5 * log_var, num_bins)) / LN2
    return np.where(np.asarray(t) == 0, decoder, kl)


def snr(tab, t):
    """SNR_t = abar_t / (1 - abar_t)."""
    t = np.asarray(t)
    return tab["alphas_cumprod"][t] / tab["one_minus_alphas_cumprod"][t]


def min_snr_weight(tab, t, gamma, parameterization):
    """Hang et al.: weights making each target's MSE equal min(SNR, gamma) MSE(x_0).

    MSE(eps) = SNR MSE(x_0) and MSE(v) = (SNR + 1) MSE(x_0) at fixed x_t.
    """
    ratio = snr(tab, t)
    clamped = np.minimum(ratio, gamma)
    return {"eps": clamped / ratio, "x0": clamped, "v": clamped / (ratio + 1.0)}[parameterization]


# --------------------------------------------------------------------------------------------
# Tolerances.
# --------------------------------------------------------------------------------------------


def assert_close(got, want, rtol=1e-5, extra=0.0, scale=None, what=""):
    """|got - want| <= rtol (|want| + scale) + extra, elementwise.

    ``scale`` is the quantity's magnitude (default: the RMS of ``want``), so values that cross
    zero are compared relative to the size of the quantity, not to themselves; ``extra`` adds a
    per-element allowance (e.g. the 1 / sqrt(abar_t) amplification when recovering x_0).
    """
    got = np.asarray(got, np.float64)
    want = np.asarray(want, np.float64)
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
    if scale is None:
        scale = np.sqrt(np.mean(want**2)) if want.size else 0.0
    tol = rtol * (np.abs(want) + scale) + extra
    err = np.abs(got - want)
    bad = ~(err <= tol)
    if np.any(bad):
        tol = np.broadcast_to(tol, err.shape)
        i = np.unravel_index(np.argmax(np.where(bad, err - tol, -np.inf)), err.shape)
        raise AssertionError(
            f"{what}: {bad.sum()} of {bad.size} elements out of tolerance; worst at {i}: "
            f"got {got[i]!r}, want {want[i]!r}, |err| {err[i]:.3g} > tol {tol[i]:.3g}"
        )


# --------------------------------------------------------------------------------------------
# chex variants.
# --------------------------------------------------------------------------------------------


def call_variant(variant, fn, *args, shared=(0,)):
    """``fn(*args)`` under a chex variant: ``variant`` is ``self.variant`` of a ``chex.TestCase``.

    ``with_jit`` and ``without_jit`` call ``fn`` on the arguments as they are. ``with_pmap``
    splits the batch over the devices (eight fake CPU devices, see ``conftest.py``): each
    argument not in ``shared`` has its leading axis ``[B, ...]`` reshaped to
    ``[n_devices, B / n_devices, ...]``, the ``shared`` ones (the schedule) reach every device
    whole, and each output is joined back to ``[B, ...]``. So ``fn`` must be per-example, with
    its string options closed over (they are static, never traced).
    """
    if variant.type is not chex.ChexVariantType.WITH_PMAP:
        return variant(fn)(*args)
    n_devices = jax.device_count()

    def split(x):
        batch = np.shape(x)[0]
        assert batch % n_devices == 0, f"batch {batch} does not split over {n_devices} devices"
        return x.reshape((n_devices, batch // n_devices) + np.shape(x)[1:])

    in_axes = tuple(None if i in shared else 0 for i in range(len(args)))
    args = [arg if i in shared else jax.tree.map(split, arg) for i, arg in enumerate(args)]
    pmapped = variant(fn, broadcast_args_to_devices=False, in_axes=in_axes, reduce_fn=None)
    return jax.tree.map(lambda y: y.reshape((-1,) + y.shape[2:]), pmapped(*args))
