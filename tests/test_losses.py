"""Tests of ``diffusion_jax.losses`` against the float64 reference in ``reference.py``.

What is checked, and how closely:
  * ``normal_kl`` against the closed form: within 1e-5 of the sum of the magnitudes of its
    terms (float32 cancels them); KL >= -1e-6 nats (hypothesis), and 0 within 1e-6 for equal
    Gaussians.
  * ``discretized_gaussian_log_likelihood`` against ``scipy.stats.norm``: edge bins within
    1e-5 (|log p| + 1) for any mean; every interior bin's mass P within 1e-4 P + 3e-7 (a float32
    difference of two CDF values is good to ~1e-7 absolute), and bins below the mean within 3
    sigma within 1e-5 (|log p| + 1); the 2, 16 or 256 bin probabilities of a Gaussian sum to 1
    within 2e-6; bins above the mean are as precise as their mirror images below it.
  * ``prior_bpd`` (L_T) and ``vb_terms_bpd`` (KL for t > 0, decoder at t = 0) for every
    parameterisation x variance x schedule: within 1e-5 relative plus 1e-6 bits absolute (KLs
    and bits near zero are compared absolutely).
  * ``min_snr_weight``: 1e-5 relative to min(SNR, g)/SNR, min(SNR, g), min(SNR, g)/(SNR + 1),
    and the three weighted MSEs all equal min(SNR, g) * MSE(x_0) to 1e-5 relative.
  * ``training_loss`` for simple (with and without min-SNR), hybrid and vlb with a toy linear
    model, recomputed in float64 from the same key split (``t_key, noise_key = split(key)``):
    1e-5 relative plus 1e-6 absolute; under ``jit`` it compiles once; hybrid's mean gets the
    MSE's gradient (1e-6 relative) and its variance T/1000 times the vlb's; importance sampling
    weights by 1 / (T p_t) and draws t with frequencies p (5 standard errors).
  * ``nll_bpd``: total = prior + sum of terms (1e-6 relative); every term against the reference
    with the documented noise ``normal(fold_in(key, t))``; closed-form bounds (hypothesis) for a
    one-point dataset and its ideal denoiser: with fixed_small every KL term is 0 (|L_t| <= 1e-6
    bits), so the bound is L_0 + L_T, both in closed form; with fixed_large every KL term is
    the KL between two Gaussians of one mean and known variances (1e-5 relative).
  * explicit randomness: ``training_loss`` given the t and noise its key would draw returns
    the keyed loss and metrics bit for bit; ``nll_bpd`` given ``noise[t]`` the keyed bound to
    1e-6; one predictor written as an eps and as a v model, fed the same t and noise, gives the
    same x0 MSE and bound terms (1e-3 / 5e-3 relative: eps -> x0 amplifies float32 rounding).
  * the decoder against the published tanh approximation of the normal CDF: the gap on a pinned
    input is 4.78e-4 bits/dim (1e-5 absolute), see ``TANH_GAP_BPD``.
  * the Gaussian decoder of continuous data: log N against scipy (1e-5 (|log p| + 1)); L_0
    against float64 (1e-5 relative plus 1e-6 bits), the KL terms unchanged bit for bit; the
    closed-form bound of a continuous one-point dataset.

Under ``chex.variants`` (``LossesUnderVariantsTest``) the same reference checks run each loss
function under ``with_jit`` and ``without_jit``, and the per-example ones (``normal_kl``,
``mean_flat``, the decoder, ``prior_bpd``, ``vb_terms_bpd``, the Gaussian decoder,
``min_snr_weight``) also under ``with_pmap`` with their batch split over the eight fake CPU
devices of ``conftest.py``. ``training_loss`` and ``nll_bpd`` draw their noise for the whole
batch from one key, so splitting the batch would change the draws: they run under jit and
eagerly only. The sweeps over every
option run eagerly. Tolerances are checked with ``chex.assert_trees_all_close`` where they are
``rtol |want| + atol``; ``normal_kl``'s per-element bound is checked by hand.
"""

from __future__ import annotations

import functools
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference as ref
from absl.testing import parameterized
from hypothesis import given
from hypothesis import strategies as st
from scipy import special, stats

from diffusion_jax import diffusion, losses, schedules

NAMES = ("linear", "quadratic", "sigmoid", "cosine")
PARAMETERIZATIONS = ("eps", "x0", "v")
VARIANCES = ("fixed_small", "fixed_large", "learned_range")
# A batch of 8: the pmap variant gives one example to each of the eight fake devices.
SHAPES = {"image": (8, 4, 4, 2), "vector": (8, 3)}
RTOL = 1e-5
BITS_ATOL = 1e-6


@functools.cache
def schedule_pair(name: str, num_timesteps: int):
    """(the package's Schedule, the reference tables).

    The DDPM-family schedules scale their beta range by 1000 / T (improved-diffusion's
    ``get_named_beta_schedule``), capped at 0.999 when that raises it; so do these references.
    """
    if name == "cosine":
        betas = ref.BETAS[name](num_timesteps)
    else:
        scale = 1000.0 / num_timesteps
        betas = ref.BETAS[name](num_timesteps, beta_start=1e-4 * scale, beta_end=0.02 * scale)
        betas = np.minimum(betas, 0.999) if scale > 1.0 else betas
    return schedules.get_schedule(name, num_timesteps), ref.tables(betas)


def binary_data(rng, shape):
    """Data in {-1, 1}: the decoder's edge bins, whose log Phi is exact for any mean.

    The training-loss and bound tests check wiring with a toy model whose decoder mean can sit
    many sigma from the data; interior bins there are limited by float32 (see the decoder
    tests), edge bins are not.
    """
    return np.where(rng.uniform(size=shape) < 0.5, -1.0, 1.0).astype(np.float32)


def grid_data(rng, shape, num_bins=256):
    """Data on the grid of ``num_bins`` levels in [-1, 1], including both edge levels."""
    levels = rng.integers(0, num_bins, shape)
    flat = levels.reshape(-1)
    flat[:2] = [0, num_bins - 1]
    return (2.0 * levels / (num_bins - 1) - 1.0).astype(np.float32)


def bits_close(got, want, rtol=RTOL, atol=BITS_ATOL, what=""):
    """|got - want| <= rtol |want| + atol."""
    want = np.asarray(want, np.float64)
    chex.assert_trees_all_close(got, want, rtol=rtol, atol=atol, custom_message=what)


def log_prob_close(got, want, what=""):
    """|got - want| <= RTOL (|want| + 1), for log-probabilities in nats."""
    chex.assert_trees_all_close(got, want, rtol=RTOL, atol=RTOL, custom_message=what)


def eager(fn, *args):
    """Calls ``fn`` as it is: the sweeps' way of running a loss function."""
    return fn(*args)


# ---------------------------------------------------------------------------- normal_kl


def kl_tolerance(mean1, logvar1, mean2, logvar2):
    terms = 1.0 + np.abs(logvar1) + np.abs(logvar2) + np.exp(logvar1 - logvar2)
    return RTOL * (terms + (mean1 - mean2) ** 2 * np.exp(-logvar2))


def check_normal_kl(call=eager):
    rng = np.random.default_rng(0)
    shape = (64,)
    mean1, mean2 = rng.normal(0, 2, shape), rng.normal(0, 2, shape)
    logvar1, logvar2 = rng.uniform(-10, 3, shape), rng.uniform(-10, 3, shape)
    args = [a.astype(np.float32) for a in (mean1, logvar1, mean2, logvar2)]
    got = call(losses.normal_kl, *args)
    chex.assert_shape(got, shape)
    want = ref.normal_kl(*[a.astype(np.float64) for a in args])
    assert np.all(np.abs(np.asarray(got, np.float64) - want) <= kl_tolerance(*args))
    # Zero for identical Gaussians: -1 + lv - lv + exp(0) rounds, ~6e-8.
    same = call(losses.normal_kl, args[0], args[1], args[0], args[1])
    chex.assert_trees_all_close(same, np.zeros(shape), rtol=0.0, atol=1e-6)


def test_normal_kl_matches_closed_form():
    check_normal_kl()
    # Broadcasting.
    chex.assert_shape(losses.normal_kl(jnp.zeros((3, 1)), 0.0, jnp.zeros((1, 4)), 0.0), (3, 4))


@given(
    mean1=st.floats(-5, 5),
    mean2=st.floats(-5, 5),
    logvar1=st.floats(-12, 4),
    logvar2=st.floats(-12, 4),
)
def test_normal_kl_nonnegative(mean1, mean2, logvar1, logvar2):
    args = [np.float32(a) for a in (mean1, logvar1, mean2, logvar2)]
    got = float(losses.normal_kl(*args))
    assert got >= -1e-6
    want = ref.normal_kl(*[np.float64(a) for a in args])
    assert abs(got - want) <= kl_tolerance(*args)


# ---------------------------------------------------------------------------- decoder


@functools.partial(jax.jit, static_argnames="num_bins")
def _decoder_padded(x, mean, log_scale, num_bins):
    return losses.discretized_gaussian_log_likelihood(x, mean, log_scale, num_bins=num_bins)


def decoder(x, mean, log_scale, num_bins=256):
    """The package's decoder on 1-D inputs, padded to 256 so that it compiles once."""
    x = np.asarray(x, np.float32)
    mean = np.broadcast_to(np.asarray(mean, np.float32), x.shape)
    log_scale = np.broadcast_to(np.asarray(log_scale, np.float32), x.shape)
    size = x.shape[0]
    assert size <= 256
    pad = [(0, 256 - size)]
    got = _decoder_padded(np.pad(x, pad), np.pad(mean, pad), np.pad(log_scale, pad), num_bins)
    return np.asarray(got, np.float64)[:size]


def assert_bin_probs_close(got_log, want_log, what=""):
    """|P_got - P_want| <= 1e-4 P_want + 3e-7: a float32 difference of two CDF values is good
    to ~1e-7 absolute, so a bin's mass is compared relatively only where it is large enough."""
    got, want = np.exp(np.asarray(got_log, np.float64)), np.exp(want_log)
    chex.assert_trees_all_close(got, want, rtol=1e-4, atol=3e-7, custom_message=what)


@pytest.mark.parametrize("scale", [1e-3, 7e-3, 0.05, 0.3, 1.0])
def test_decoder_interior_bins_match_scipy(scale):
    grid = np.linspace(-1.0, 1.0, 256)
    for mean in np.linspace(-1.1, 1.1, 23):
        x = grid[1:-1]
        mean32 = np.float32(mean)
        log_scale32 = np.float32(np.log(scale))
        got = decoder(x, np.full_like(x, mean32), log_scale32)
        want = ref.bin_log_prob(x, mean32, log_scale32)
        assert_bin_probs_close(got, want, what=f"mean {mean}")
        # Where the bins below the mean are concerned, the CDFs are small and exact.
        below = (x < mean32) & (np.abs(x - mean32) / scale <= 3.0)
        log_prob_close(got[below], want[below], f"below {mean}")
        assert np.all(got <= 0.0) and np.all(np.isfinite(got))


def test_decoder_edge_bins_match_scipy():
    """The edge bins own (-inf, -1 + 1/255] and [1 - 1/255, inf): log Phi is accurate far out."""
    means = np.linspace(-3.0, 3.0, 61, dtype=np.float32)
    for scale in (1e-3, 0.01, 0.1, 1.0):
        log_scale = np.float32(np.log(scale))
        for edge in (-1.0, 1.0):
            x = np.full_like(means, edge)
            got = decoder(x, means, log_scale)
            want = ref.bin_log_prob(x, means, log_scale)
            finite = want > -80.0  # float32 log Phi underflows beyond ~ -100 nats
            log_prob_close(got[finite], want[finite], f"edge {edge}")


@pytest.mark.parametrize("num_bins", [2, 16, 256])
def test_decoder_probabilities_sum_to_one(num_bins):
    grid = np.linspace(-1.0, 1.0, num_bins)
    for mean, scale in [(0.0, 0.1), (0.3, 0.01), (-0.95, 0.05), (1.4, 0.2), (0.0, 3.0)]:
        log_probs = decoder(grid, np.full_like(grid, mean), np.log(scale), num_bins=num_bins)
        assert abs(np.exp(log_probs).sum() - 1.0) <= 2e-6
        want = ref.bin_log_prob(grid, mean, np.log(scale), num_bins)
        assert_bin_probs_close(log_probs, want, what=f"{num_bins} bins")


def test_decoder_bad_num_bins():
    with pytest.raises(ValueError, match="num_bins must be >= 2"):
        losses.discretized_gaussian_log_likelihood(jnp.zeros(3), jnp.zeros(3), 0.0, num_bins=1)


def test_decoder_interior_bins_are_mirror_symmetric_and_accurate_to_six_sigma():
    grid = np.linspace(-1.0, 1.0, 256)[1:-1]
    for scale in (0.05, 0.1):
        for mean in (-0.4, 0.0, 0.4):
            near = np.abs(grid - mean) / scale <= 6.0
            x = grid[near]
            above = decoder(x, np.full_like(x, mean), np.log(scale))
            mirrored = decoder(-x, np.full_like(x, -mean), np.log(scale))
            want = ref.bin_log_prob(x, np.float32(mean), np.float32(np.log(scale)))
            log_prob_close(above, want, "scipy")
            log_prob_close(above, mirrored, "mirror")


def check_decoder(call=eager):
    """Eight Gaussians, one per row (one per device under pmap), each scored on the 30 levels
    nearest its mean and on the two edge levels."""
    grid = np.linspace(-1.0, 1.0, 256)
    means = np.linspace(-0.9, 0.9, 8).astype(np.float32)
    log_scales = np.log(np.geomspace(1e-3, 0.3, 8)).astype(np.float32)
    x = np.stack([np.sort(grid[np.argsort(np.abs(grid - m))[:30]]) for m in means])
    x = np.concatenate([np.full((8, 1), -1.0), x, np.full((8, 1), 1.0)], axis=1)
    x = x.astype(np.float32)
    mean = np.broadcast_to(means[:, None], x.shape)
    log_scale = np.broadcast_to(log_scales[:, None], x.shape)
    log_likelihood = functools.partial(losses.discretized_gaussian_log_likelihood, num_bins=256)
    got = call(log_likelihood, x, mean, log_scale)
    chex.assert_shape(got, x.shape)
    want = ref.bin_log_prob(x, mean, log_scale)
    assert_bin_probs_close(got, want, what="bins near the mean")
    edges = np.abs(x) == 1.0
    finite = edges & (want > -80.0)  # float32 log Phi underflows beyond ~ -100 nats
    log_prob_close(np.asarray(got)[finite], want[finite], "edge bins")


def test_decoder_of_eight_gaussians():
    check_decoder()


# ---------------------------------------------------------------------------- prior, terms


def check_prior_bpd(name, call=eager):
    schedule, tab = schedule_pair(name, 1000)
    x0 = grid_data(np.random.default_rng(1), SHAPES["image"])
    got = call(losses.prior_bpd, schedule, x0)
    chex.assert_shape(got, (8,))
    bits_close(got, ref.prior_bpd(tab, x0), what="L_T")
    # Closed form at x_0 = 0: KL(N(0, 1 - abar) || N(0, 1)) = (-abar - log(1 - abar)) / 2.
    abar = tab["alphas_cumprod"][-1]
    want = 0.5 * (-abar - math.log1p(-abar)) / math.log(2.0)
    got = call(losses.prior_bpd, schedule, jnp.zeros((8, 5)))
    bits_close(got, np.full(8, want), what="L_T(0)")


@pytest.mark.parametrize("name", NAMES)
def test_prior_bpd(name):
    check_prior_bpd(name)


def consistent_outputs(tab, x0, t, noise, parameterization, error, rng):
    """x_t, and a model output whose implied x_0 is x_0 + error * N(0, 1)."""
    x_t = ref.q_sample(tab, x0, t, noise).astype(np.float32)
    pred_x0 = x0 + error * rng.standard_normal(x0.shape)
    if parameterization == "x0":
        out = pred_x0
    else:
        eps = ref.eps_from_x0(tab, x_t, t, pred_x0)
        out = eps if parameterization == "eps" else ref.v_target(tab, pred_x0, t, eps)
    return x_t, out.astype(np.float32)


# Each schedule with one data shape keeps the matrix small; both shapes meet every option.
SCHEDULE_SHAPES = [
    pytest.param(name, SHAPES[kind], id=f"{name}-{kind}")
    for name, kind in [
        ("linear", "image"),
        ("quadratic", "vector"),
        ("sigmoid", "image"),
        ("cosine", "vector"),
    ]
]


def check_vb_terms_bpd(name, shape, parameterization, variance, clips, call=eager):
    num_timesteps = 100
    schedule, tab = schedule_pair(name, num_timesteps)
    rng = np.random.default_rng(2)
    x0 = grid_data(rng, shape)
    noise = rng.standard_normal(shape).astype(np.float32)
    t = np.array([0, 1, num_timesteps - 1, 37, 0, 2, 60, 0])
    for error in (3e-3, 0.3):
        if error > 0.01:  # the decoder only within 3 sigma: no t = 0
            t = np.array([5, 1, num_timesteps - 1, 37, 3, 2, 60, 80])
        x_t, out = consistent_outputs(tab, x0, t, noise, parameterization, error, rng)
        if variance == "learned_range":
            out = np.concatenate([out, rng.uniform(-1, 1, shape).astype(np.float32)], axis=-1)
        for clip_x0 in clips:
            options = dict(parameterization=parameterization, variance=variance, clip_x0=clip_x0)
            terms = functools.partial(losses.vb_terms_bpd, **options)
            got = call(terms, schedule, out, x0, x_t, jnp.asarray(t, jnp.int32))
            chex.assert_shape(got, (shape[0],))
            want = ref.vb_terms_bpd(tab, out, x0, x_t, t, parameterization, variance, clip_x0)
            bits_close(got, want, what=f"error={error} clip={clip_x0}")
            assert np.all(np.asarray(got) >= -BITS_ATOL)


@pytest.mark.parametrize("variance", VARIANCES)
@pytest.mark.parametrize("parameterization", PARAMETERIZATIONS)
@pytest.mark.parametrize(("name", "shape"), SCHEDULE_SHAPES)
def test_vb_terms_bpd(name, shape, parameterization, variance):
    check_vb_terms_bpd(name, shape, parameterization, variance, (False, True))


# ---------------------------------------------------------------------------- min-SNR


def check_min_snr_weight(name, gamma, parameterization, call=eager):
    schedule, tab = schedule_pair(name, 1000)
    t = np.append(np.arange(0, 1000, 7), 999)  # 144 steps, 18 per device under pmap
    weight = functools.partial(
        losses.min_snr_weight, gamma=gamma, parameterization=parameterization
    )
    got = call(weight, schedule, jnp.asarray(t, jnp.int32))
    want = ref.min_snr_weight(tab, t, gamma, parameterization)
    # Relative: the weights span 1e-9 .. 5; the atol only lets an exact 0 match.
    chex.assert_trees_all_close(got, want, rtol=RTOL, atol=1e-30, custom_message=parameterization)


@pytest.mark.parametrize("gamma", [0.5, 5.0])
@pytest.mark.parametrize("name", NAMES)
def test_min_snr_weight(name, gamma):
    for parameterization in PARAMETERIZATIONS:
        check_min_snr_weight(name, gamma, parameterization)


@pytest.mark.parametrize("name", NAMES)
def test_min_snr_weighted_losses_equal_min_snr_times_x0_mse(name):
    """Hang et al.: every parameterisation's weighted MSE is min(SNR, g) MSE(x_0) at fixed x_t."""
    gamma = 5.0
    schedule, tab = schedule_pair(name, 1000)
    rng = np.random.default_rng(3)
    t = np.array([0, 1, 50, 300, 600, 999])
    x0 = rng.uniform(-1, 1, (6, 8))
    noise = rng.standard_normal((6, 8))
    x_t = ref.q_sample(tab, x0, t, noise)
    pred_x0 = x0 + 0.2 * rng.standard_normal(x0.shape)
    pred_eps = ref.eps_from_x0(tab, x_t, t, pred_x0)
    predictions = {
        "eps": (pred_eps, noise),
        "x0": (pred_x0, x0),
        "v": (ref.v_target(tab, pred_x0, t, pred_eps), ref.v_target(tab, x0, t, noise)),
    }
    want = np.minimum(ref.snr(tab, t), gamma) * ref.mean_flat((pred_x0 - x0) ** 2)
    for parameterization, (prediction, target) in predictions.items():
        weight = losses.min_snr_weight(schedule, jnp.asarray(t), gamma, parameterization)
        got = np.asarray(weight, np.float64) * ref.mean_flat((prediction - target) ** 2)
        chex.assert_trees_all_close(got, want, rtol=RTOL, custom_message=parameterization)


def test_min_snr_weight_errors():
    schedule, _ = schedule_pair("linear", 1000)
    t = jnp.zeros((2,), jnp.int32)
    with pytest.raises(ValueError, match="min_snr_gamma must be > 0"):
        losses.min_snr_weight(schedule, t, 0.0, "eps")
    with pytest.raises(ValueError, match="Unknown parameterization 'score'"):
        losses.min_snr_weight(schedule, t, 5.0, "score")


# ---------------------------------------------------------------------------- training loss

TRAIN_T = 20


def init_params(channels: int, learned: bool, seed: int = 4):
    """A linear model of x_t and t; ``w_var``/``b_var`` only with a learned variance."""
    rng = np.random.default_rng(seed)
    params = {
        "w_mean": 0.3 * np.eye(channels) + 0.1 * rng.standard_normal((channels, channels)),
        "b_mean": 0.05 * rng.standard_normal(channels),
        "t_mean": 0.05 * rng.standard_normal(channels),
    }
    if learned:
        params["w_var"] = 0.3 * rng.standard_normal((channels, channels))
        params["b_var"] = 0.1 * rng.standard_normal(channels)
    return {k: v.astype(np.float32) for k, v in params.items()}


def toy_model(params, x_t, t, *, gain=1.0):
    """out = gain (x_t W + b + (t / T) c), plus tanh(x_t W_var + b_var) channels if learned."""
    time = (t.astype(jnp.float32) / TRAIN_T).reshape((-1,) + (1,) * (x_t.ndim - 1))
    mean = gain * (x_t @ params["w_mean"] + params["b_mean"] + time * params["t_mean"])
    if "w_var" not in params:
        return mean
    return jnp.concatenate([mean, jnp.tanh(x_t @ params["w_var"] + params["b_var"])], axis=-1)


def toy_model_reference(params, x_t, t, gain=1.0):
    params = {k: np.asarray(v, np.float64) for k, v in params.items()}
    time = (np.asarray(t, np.float64) / TRAIN_T).reshape((-1,) + (1,) * (x_t.ndim - 1))
    mean = gain * (x_t @ params["w_mean"] + params["b_mean"] + time * params["t_mean"])
    if "w_var" not in params:
        return mean
    return np.concatenate([mean, np.tanh(x_t @ params["w_var"] + params["b_var"])], axis=-1)


def documented_draws(key, batch, num_timesteps, shape):
    """t and noise exactly as training_loss documents: t_key, noise_key = split(key)."""
    t_key, noise_key = jax.random.split(key)
    t = jax.random.randint(t_key, (batch,), 0, num_timesteps, dtype=jnp.int32)
    return np.asarray(t), np.asarray(jax.random.normal(noise_key, shape), np.float64)


def reference_training_loss(
    params, tab, x0, t, noise, parameterization, variance, loss_type, gamma, gain
):
    """Per-example loss, MSE and VB of training_loss, float64."""
    num_timesteps = len(tab["betas"])
    x0 = np.asarray(x0, np.float64)
    x_t = ref.q_sample(tab, x0, t, noise)
    out = toy_model_reference(params, x_t, t, gain)
    target = {"eps": noise, "x0": x0, "v": ref.v_target(tab, x0, t, noise)}[parameterization]
    mse = ref.mean_flat((target - out[..., : x0.shape[-1]]) ** 2)
    if gamma is not None:
        mse = mse * ref.min_snr_weight(tab, t, gamma, parameterization)
    vb = np.zeros_like(mse)
    if loss_type != "simple":
        vb = ref.vb_terms_bpd(tab, out, x0, x_t, t, parameterization, variance, False)
    per_example = {"simple": mse, "hybrid": mse + vb * num_timesteps / 1000.0, "vlb": vb}
    return per_example[loss_type], mse, vb


TRAINING_CASES = [
    (loss_type, parameterization, variance, gamma)
    for parameterization in PARAMETERIZATIONS
    for loss_type, variance, gamma in [
        ("simple", "fixed_small", None),
        ("simple", "fixed_large", 5.0),
        ("simple", "learned_range", 0.5),
        ("hybrid", "learned_range", None),
        ("vlb", "fixed_small", None),
        ("vlb", "fixed_large", None),
        ("vlb", "learned_range", None),
    ]
]


def check_training_loss(loss_type, parameterization, variance, gamma, name, shape, call=eager):
    schedule, tab = schedule_pair(name, TRAIN_T)
    batch = 16
    shape = (batch, *shape[1:])
    x0 = binary_data(np.random.default_rng(5), shape)
    params = init_params(shape[-1], variance == "learned_range")
    key = jax.random.key(6)
    t, noise = documented_draws(key, batch, TRAIN_T, shape)
    assert 0 in t and TRAIN_T - 1 in t  # the decoder and the last step are both exercised
    loss_fn = functools.partial(
        losses.training_loss,
        toy_model,
        parameterization=parameterization,
        variance=variance,
        loss_type=loss_type,
        min_snr_gamma=gamma,
        model_kwargs={"gain": 0.9},
    )
    loss, metrics = call(loss_fn, params, schedule, x0, key)
    per_example, mse, vb = reference_training_loss(
        params, tab, x0, t, noise, parameterization, variance, loss_type, gamma, 0.9
    )
    chex.assert_shape((metrics["t"], metrics["per_example_loss"]), (batch,))
    chex.assert_trees_all_equal(metrics["t"], t.astype(np.int32))
    bits_close(metrics["per_example_loss"], per_example, what="per-example loss")
    bits_close(loss, per_example.mean(), what="loss")
    bits_close(metrics["loss"], per_example.mean(), what="metrics loss")
    bits_close(metrics["mse"], mse.mean(), what="mse")
    bits_close(metrics["vb"], vb.mean(), what="vb")
    _, unweighted_mse, _ = reference_training_loss(
        params, tab, x0, t, noise, parameterization, variance, loss_type, None, 0.9
    )
    bits_close(metrics["per_example_mse"], unweighted_mse, what="per-example mse")
    if loss_type == "simple":
        assert "per_example_vb" not in metrics
    else:
        bits_close(metrics["per_example_vb"], vb, what="per-example vb")


@pytest.mark.parametrize(("name", "shape"), [SCHEDULE_SHAPES[0], SCHEDULE_SHAPES[3]])
@pytest.mark.parametrize(("loss_type", "parameterization", "variance", "gamma"), TRAINING_CASES)
def test_training_loss_matches_reference(loss_type, parameterization, variance, gamma, name, shape):
    check_training_loss(loss_type, parameterization, variance, gamma, name, shape)


def hybrid_case(batch=32):
    schedule, _ = schedule_pair("cosine", TRAIN_T)
    x0 = grid_data(np.random.default_rng(7), (batch, 3))
    return schedule, x0, init_params(3, learned=True), jax.random.key(8)


def test_hybrid_loss_trains_the_mean_by_mse_alone():
    """The vb term sees a stop-gradiented mean: mean grads are the MSE's, variance grads vb's.

    Run under jit for two keys with one trace: the loss and its gradients compile once. (The
    stop-gradient does not depend on the parameterisation; hybrid's value is checked for all
    three by test_training_loss_matches_reference.)
    """
    parameterization = "eps"
    schedule, x0, params, _ = hybrid_case()
    chex.clear_trace_counter()

    @jax.jit
    @chex.assert_max_traces(n=1)
    def gradients(p, key):
        def loss(loss_type, p):
            return losses.training_loss(
                toy_model,
                p,
                schedule,
                x0,
                key,
                parameterization=parameterization,
                variance="learned_range",
                loss_type=loss_type,
            )[0]

        hybrid_value = loss("hybrid", p)
        grads = [jax.grad(functools.partial(loss, kind))(p) for kind in ("hybrid", "simple", "vlb")]
        return hybrid_value, grads

    for seed in (8, 9):
        value, (hybrid, simple, vlb) = gradients(params, jax.random.key(seed))
        eager = losses.training_loss(
            toy_model,
            params,
            schedule,
            x0,
            jax.random.key(seed),
            parameterization=parameterization,
            variance="learned_range",
            loss_type="hybrid",
        )[0]
        chex.assert_trees_all_close(value, eager, rtol=1e-5)

        def part(grads, names):
            return {name: grads[name] for name in names}

        mean_names, var_names = ("w_mean", "b_mean", "t_mean"), ("w_var", "b_var")
        chex.assert_trees_all_close(
            part(hybrid, mean_names), part(simple, mean_names), rtol=1e-6, atol=1e-9
        )
        # The check has teeth: the bound alone does move the mean.
        assert all(np.max(np.abs(vlb[name])) > 1e-3 for name in mean_names)
        zeros = jax.tree.map(np.zeros_like, part(simple, var_names))
        chex.assert_trees_all_equal(part(simple, var_names), zeros)
        scaled_vlb = jax.tree.map(lambda g: g * TRAIN_T / 1000.0, part(vlb, var_names))
        chex.assert_trees_all_close(part(hybrid, var_names), scaled_vlb, rtol=1e-5)
        assert all(np.max(np.abs(hybrid[name])) > 0.0 for name in var_names)


def test_training_loss_importance_weights():
    schedule, tab = schedule_pair("cosine", TRAIN_T)
    x0 = grid_data(np.random.default_rng(9), (32, 3))
    params = init_params(3, learned=False)
    probs = np.linspace(1.0, 3.0, TRAIN_T)
    probs /= probs.sum()
    key = jax.random.key(10)
    loss, metrics = losses.training_loss(
        toy_model, params, schedule, x0, key, timestep_probs=jnp.asarray(probs, jnp.float32)
    )
    t = np.asarray(metrics["t"])
    _, noise = documented_draws(key, 32, TRAIN_T, x0.shape)
    per_example, _, _ = reference_training_loss(
        params, tab, x0, t, noise, "eps", "fixed_small", "simple", None, 1.0
    )
    # Per-example losses are unweighted; the loss weights them by 1 / (T p_t).
    bits_close(metrics["per_example_loss"], per_example, what="per-example")
    bits_close(loss, np.mean(per_example / (TRAIN_T * probs[t])), what="weighted loss")
    # All mass on one step: every t is that step, and the weight is 1 / T.
    one_hot = jnp.zeros(TRAIN_T).at[7].set(1.0)
    loss, metrics = losses.training_loss(
        toy_model, params, schedule, x0, key, timestep_probs=one_hot
    )
    chex.assert_trees_all_equal(metrics["t"], np.full(32, 7, np.int32))
    bits_close(loss, np.mean(metrics["per_example_loss"]) / TRAIN_T, what="one-hot")


def test_training_loss_importance_sampling_frequencies():
    """t is drawn with the given probabilities: counts within 5 standard errors."""
    schedule, _ = schedule_pair("linear", TRAIN_T)
    batch = 20_000
    probs = np.arange(1.0, TRAIN_T + 1.0) ** 2
    probs /= probs.sum()
    _, metrics = losses.training_loss(
        lambda p, x, t: x * p,
        jnp.float32(0.5),
        schedule,
        jnp.zeros((batch, 1)),
        jax.random.key(11),
        timestep_probs=jnp.asarray(probs, jnp.float32),
    )
    counts = np.bincount(np.asarray(metrics["t"]), minlength=TRAIN_T)
    expected = batch * probs
    assert np.all(np.abs(counts - expected) <= 5.0 * np.sqrt(expected * (1 - probs)) + 1)


def test_training_loss_under_jit_compiles_once():
    schedule, x0, _, _ = hybrid_case()
    params = init_params(3, learned=False)
    chex.clear_trace_counter()

    @jax.jit
    @chex.assert_max_traces(n=1)
    def loss(params, schedule, x0, key):
        return losses.training_loss(
            toy_model, params, schedule, x0, key, parameterization="v", min_snr_gamma=5.0
        )[0]

    values = [loss(params, schedule, x0, jax.random.key(seed)) for seed in range(3)]
    other_schedule, _ = schedule_pair("linear", TRAIN_T)  # same T: no new trace
    values.append(loss(params, other_schedule, x0, jax.random.key(0)))
    assert len(set(np.asarray(values).tolist())) == 4
    eager = losses.training_loss(
        toy_model, params, schedule, x0, jax.random.key(2), parameterization="v", min_snr_gamma=5.0
    )[0]
    chex.assert_trees_all_close(values[2], eager, rtol=1e-5)


def test_training_loss_errors():
    schedule, x0, params, key = hybrid_case(batch=4)
    call = functools.partial(losses.training_loss, toy_model, params, schedule)
    with pytest.raises(ValueError, match=r"Unknown loss_type 'kl'.*'simple', 'hybrid', 'vlb'"):
        call(x0, key, loss_type="kl", variance="learned_range")
    with pytest.raises(ValueError, match=r"hybrid.*needs variance='learned_range'"):
        call(x0, key, loss_type="hybrid", variance="fixed_small")
    with pytest.raises(ValueError, match="x0 must have shape"):
        call(x0[:, 0], key)
    with pytest.raises(ValueError, match="Unknown parameterization 'score'"):
        call(x0, key, parameterization="score", variance="learned_range")
    with pytest.raises(ValueError, match=r"timestep_probs must have shape \[T\] = \(20,\)"):
        call(x0, key, variance="learned_range", timestep_probs=jnp.ones(10) / 10)
    with pytest.raises(ValueError, match="twice the channels"):
        losses.training_loss(
            toy_model, init_params(3, False), schedule, x0, key, variance="learned_range"
        )


def test_training_loss_with_explicit_t_and_noise_is_the_keyed_loss_bit_for_bit():
    """Passing the draws training_loss makes from its key (t_key, noise_key = split(key))
    gives the same loss and metrics, bit for bit; so does passing only one of them."""
    schedule, _ = schedule_pair("cosine", TRAIN_T)
    x0 = binary_data(np.random.default_rng(20), (12, 4, 4, 2))
    params = init_params(2, learned=True)
    key = jax.random.key(21)
    t, noise = documented_draws(key, 12, TRAIN_T, x0.shape)
    noise = noise.astype(np.float32)
    options = dict(parameterization="v", variance="learned_range", loss_type="hybrid")
    keyed = losses.training_loss(toy_model, params, schedule, x0, key, **options)
    explicit = losses.training_loss(
        toy_model, params, schedule, x0, None, t=t, noise=noise, **options
    )
    only_t = losses.training_loss(toy_model, params, schedule, x0, key, t=t, **options)
    only_noise = losses.training_loss(toy_model, params, schedule, x0, key, noise=noise, **options)
    for other in (explicit, only_t, only_noise):
        chex.assert_trees_all_equal(keyed, other)
    chex.assert_shape([keyed[1][k] for k in ("t", "per_example_mse", "per_example_vb")], (12,))
    # Other t: another loss, from the same noise.
    shifted = losses.training_loss(
        toy_model, params, schedule, x0, None, t=(t + 1) % TRAIN_T, noise=noise, **options
    )
    assert not np.array_equal(shifted[1]["per_example_loss"], keyed[1]["per_example_loss"])


def test_training_loss_explicit_draws_errors():
    schedule, x0, params, key = hybrid_case(batch=4)
    call = functools.partial(losses.training_loss, toy_model, params, schedule, x0)
    t = jnp.zeros((4,), jnp.int32)
    with pytest.raises(ValueError, match=r"t must have shape \[B\] = \(4,\)"):
        call(key, t=jnp.zeros((3,), jnp.int32))
    with pytest.raises(ValueError, match="noise must have x0's shape"):
        call(key, noise=jnp.zeros((4, 2)))
    with pytest.raises(ValueError, match="key=None needs both t and noise"):
        call(None, t=t)


def imperfect_x0(params, x_t, t):
    """An imperfect x_0 predictor of a one-point dataset: x0* + a smooth error in (x_t, t)."""
    time = (t.astype(jnp.float32) / params["num_timesteps"])[:, None]
    return params["point"] + 0.2 * jnp.sin(x_t + time)


def imperfect_as(parameterization):
    """The same predictor as imperfect_x0, written as an eps or v model (exact algebra)."""

    def model_fn(params, x_t, t):
        x0 = imperfect_x0(params, x_t, t)
        sqrt_abar = jnp.take(params["sqrt_alphas_cumprod"], t)[:, None]
        sqrt_one_minus = jnp.take(params["sqrt_one_minus_alphas_cumprod"], t)[:, None]
        eps = (x_t - sqrt_abar * x0) / sqrt_one_minus
        return eps if parameterization == "eps" else sqrt_abar * eps - sqrt_one_minus * x0

    return model_fn


def test_paired_comparison_of_two_parameterisations():
    """The same predictor as an eps and as a v model, fed the same t and noise: their training
    MSEs differ by exactly the documented factor (each is a multiple of the x0 MSE) and their
    bound terms and x0 MSEs agree, per example. With independent draws they would differ by
    the draws' noise instead; a paired comparison removes it."""
    num_timesteps = 40
    schedule = schedules.get_schedule("linear", num_timesteps)
    rng = np.random.default_rng(22)
    x0 = np.repeat(rng.uniform(-1, 1, (1, 3)), 16, axis=0).astype(np.float32)
    params = {
        "point": jnp.asarray(x0[:1]),
        "num_timesteps": num_timesteps,
        "sqrt_alphas_cumprod": schedule.sqrt_alphas_cumprod,
        "sqrt_one_minus_alphas_cumprod": schedule.sqrt_one_minus_alphas_cumprod,
    }
    t = jnp.asarray(rng.integers(1, num_timesteps, 16), jnp.int32)
    noise = jnp.asarray(rng.standard_normal(x0.shape), jnp.float32)
    per_x0 = {}
    for parameterization in ("eps", "v"):
        _, metrics = losses.training_loss(
            imperfect_as(parameterization),
            params,
            schedule,
            x0,
            None,
            parameterization=parameterization,
            loss_type="vlb",
            t=t,
            noise=noise,
        )
        snr = np.exp(np.asarray(schedule.log_snr, np.float64)[np.asarray(t)])
        factor = {"eps": snr, "v": snr + 1.0}[parameterization]
        per_x0[parameterization] = (metrics["per_example_mse"] / factor, metrics["per_example_vb"])
    # The x0 MSE implied by each model's training MSE, and the bound term, per example; to
    # 1e-3 relative, as eps -> x0 amplifies float32 rounding by 1/sqrt(abar).
    chex.assert_trees_all_close(per_x0["eps"], per_x0["v"], rtol=1e-3, atol=1e-7)
    # The whole bound with one set of per-timestep noise: the same terms and x0 MSEs.
    bound_noise = jnp.asarray(rng.standard_normal((num_timesteps, *x0.shape)), jnp.float32)
    terms = {
        p: losses.nll_bpd(
            imperfect_as(p),
            params,
            schedule,
            x0,
            None,
            parameterization=p,
            noise=bound_noise,
            clip_x0=False,
            decoder="gaussian",
        )
        for p in ("eps", "v")
    }
    chex.assert_trees_all_close(terms["eps"], terms["v"], rtol=5e-3, atol=1e-6)
    assert float(jnp.min(terms["eps"].x0_mse)) > 1e-5  # an imperfect model: a real comparison


# The decoder of the DDPM and improved-DDPM reference codes: the normal CDF's tanh
# approximation. With x0 on random 8-bit levels, the decoder scale of fixed_small at t = 0 on
# linear T = 1000 (sigma = 7.4e-3) and a decoder mean off by 0.5 sigma N(0, 1), the
# approximation scores L_0 (and so the total bound) 4.78e-4 bits/dim higher on average than
# the exact CDF, 4.48e-4 .. 5.02e-4 per example. The gap depends on the input: a mean off by
# 1.0 sigma gives -2.9e-4 on average, by 1.5 sigma +6.8e-3 (up to 1.4e-2 on one example).
TANH_GAP_BPD = 4.78e-4


def approx_standard_normal_cdf(x):
    return 0.5 * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def tanh_decoder_log_likelihood(x, mean, log_scale):
    """The published decoder, from its formula: the tanh CDF, log clamped at 1e-12, edge
    levels beyond +-0.999."""
    inv_stdv = np.exp(-log_scale)
    cdf_upper = approx_standard_normal_cdf(inv_stdv * (x - mean + 1.0 / 255.0))
    cdf_lower = approx_standard_normal_cdf(inv_stdv * (x - mean - 1.0 / 255.0))
    log_cdf_upper = np.log(np.maximum(cdf_upper, 1e-12))
    log_one_minus_cdf_lower = np.log(np.maximum(1.0 - cdf_lower, 1e-12))
    log_delta = np.log(np.maximum(cdf_upper - cdf_lower, 1e-12))
    return np.where(
        x < -0.999, log_cdf_upper, np.where(x > 0.999, log_one_minus_cdf_lower, log_delta)
    )


def test_exact_cdf_decoder_against_the_published_tanh_approximation():
    _, tab = schedule_pair("linear", 1000)
    # fixed_small's decoder variance: the posterior variance of index 1 (log clipped at 0).
    log_scale = 0.5 * math.log(tab["posterior_variance"][1])
    rng = np.random.default_rng(0)
    x0 = 2.0 * rng.integers(0, 256, (16, 8, 8, 3)) / 255.0 - 1.0
    mean = x0 + 0.5 * math.exp(log_scale) * rng.standard_normal(x0.shape)
    exact = -losses.mean_flat(
        losses.discretized_gaussian_log_likelihood(
            jnp.asarray(x0, jnp.float32), jnp.asarray(mean, jnp.float32), log_scale
        )
    ) / math.log(2.0)
    tanh = -ref.mean_flat(tanh_decoder_log_likelihood(x0, mean, log_scale)) / ref.LN2
    gap = tanh - np.asarray(exact, np.float64)
    # float32 rounding of the exact decoder is below 1e-5 bits/dim here; the gap is 50x that.
    chex.assert_trees_all_close(gap.mean(), TANH_GAP_BPD, atol=1e-5)
    assert 4.4e-4 < gap.min() and gap.max() < 5.1e-4, (gap.min(), gap.max())


# ---------------------------------------------------------------------------- gaussian decoder


def test_gaussian_log_likelihood_matches_scipy():
    rng = np.random.default_rng(23)
    x, mean = rng.normal(0, 3, (2, 64))
    log_scale = rng.uniform(-6, 2, 64)
    got = losses.gaussian_log_likelihood(
        *[jnp.asarray(a, jnp.float32) for a in (x, mean, log_scale)]
    )
    want = stats.norm.logpdf(x, mean, np.exp(log_scale))
    log_prob_close(got, want, what="log N")


def check_gaussian_decoder(name, parameterization, variance, call=eager):
    """L_0 = -log N(x0; mu(x_1, 1), sigma_1^2) / log 2 in float64 at t = 0; the KL terms at
    t > 0 do not depend on the decoder (test_vb_terms_bpd checks them against the reference).
    L_0 within 1e-5 relative plus 1e-6 bits absolute. (T = 1000: the DDPM-family betas there
    do not depend on scaling to T.)"""
    num_timesteps = 1000
    schedule, tab = schedule_pair(name, num_timesteps)
    rng = np.random.default_rng(24)
    shape = (8, 3)
    x0 = rng.normal(0, 2, shape).astype(np.float32)  # continuous, outside [-1, 1]
    noise = rng.standard_normal(shape).astype(np.float32)
    t = np.array([0, 0, 0, 1, 5, 370, 0, num_timesteps - 1])
    x_t, out = consistent_outputs(tab, x0, t, noise, parameterization, 3e-3, rng)
    if variance == "learned_range":
        out = np.concatenate([out, rng.uniform(-1, 1, shape).astype(np.float32)], axis=-1)
    options = dict(parameterization=parameterization, variance=variance)
    args = (schedule, out, x0, x_t, jnp.asarray(t, jnp.int32))
    got = call(functools.partial(losses.vb_terms_bpd, decoder="gaussian", **options), *args)
    discretized = call(functools.partial(losses.vb_terms_bpd, **options), *args)
    chex.assert_shape(got, (8,))
    mean, _, log_var, _ = ref.p_mean_variance(tab, out, x_t, t, parameterization, variance, False)
    decoder_bits = -ref.mean_flat(stats.norm.logpdf(x0, mean, np.exp(0.5 * log_var))) / ref.LN2
    decoder = t == 0
    bits_close(np.asarray(got)[decoder], decoder_bits[decoder], what="gaussian decoder L_0")
    chex.assert_trees_all_equal(np.asarray(got)[t > 0], np.asarray(discretized)[t > 0])


@pytest.mark.parametrize(
    ("name", "parameterization", "variance"),
    [
        ("cosine", "eps", "fixed_small"),
        ("linear", "v", "learned_range"),
        ("sigmoid", "x0", "fixed_large"),
    ],
)
def test_vb_terms_with_gaussian_decoder_match_reference(name, parameterization, variance):
    check_gaussian_decoder(name, parameterization, variance)


def test_unknown_decoder_is_an_error():
    schedule, _ = schedule_pair("cosine", 10)
    x = jnp.zeros((2, 3))
    t = jnp.zeros((2,), jnp.int32)
    with pytest.raises(ValueError, match="decoder must be one of"):
        losses.vb_terms_bpd(schedule, x, x, x, t, decoder="logistic")


# ---------------------------------------------------------------------------- nll_bpd

NLL_T = 30


@functools.partial(jax.jit, static_argnames=("model_fn", "parameterization", "variance"))
def jitted_nll(params, schedule, x0, key, *, model_fn, parameterization, variance):
    return losses.nll_bpd(
        model_fn,
        params,
        schedule,
        x0,
        key,
        parameterization=parameterization,
        variance=variance,
    )


def check_nll_bpd_terms(parameterization, variance, call):
    """nll_bpd against the reference term by term: the scan's wiring (the per-term maths is
    checked for every option by test_vb_terms_bpd)."""
    schedule, tab = schedule_pair("cosine", NLL_T)
    shape = (3, 4, 4, 2)
    x0 = binary_data(np.random.default_rng(12), shape)
    params = init_params(2, variance == "learned_range")
    key = jax.random.key(13)
    bound = functools.partial(
        losses.nll_bpd, toy_model, parameterization=parameterization, variance=variance
    )
    result = call(bound, params, schedule, x0, key)
    chex.assert_shape((result.terms_bpd, result.x0_mse), (3, NLL_T))
    chex.assert_shape((result.total_bpd, result.prior_bpd), (3,))
    chex.assert_trees_all_close(
        result.total_bpd, result.prior_bpd + result.terms_bpd.sum(axis=1), rtol=1e-6
    )
    bits_close(result.prior_bpd, ref.prior_bpd(tab, x0), what="prior")
    for t_scalar in range(NLL_T):
        noise = np.asarray(jax.random.normal(jax.random.fold_in(key, t_scalar), shape), np.float64)
        t = np.full((3,), t_scalar)
        x_t = ref.q_sample(tab, x0, t, noise)
        out = toy_model_reference(params, x_t, t)
        want = ref.vb_terms_bpd(tab, out, x0, x_t, t, parameterization, variance, True)
        bits_close(result.terms_bpd[:, t_scalar], want, what=f"L_{t_scalar}")
        pred_x0 = ref.p_mean_variance(tab, out, x_t, t, parameterization, variance, True)[3]
        bits_close(result.x0_mse[:, t_scalar], ref.mean_flat((pred_x0 - x0) ** 2), what="mse")


def test_nll_bpd_terms_match_reference_under_jit():
    """The other parameterisation and variance; both variants run v with learned_range."""
    check_nll_bpd_terms("eps", "fixed_small", lambda fn, *args: jax.jit(fn)(*args))


def ideal_noise(params, x_t, t):
    """The exact eps of a one-point dataset {x0*}: params hold x0* and the schedule's tables.

    The tables are the precise sqrt(abar) and sqrt(1 - abar); forming 1 - abar in float32 would
    cost the decoder term 1e-4 nats at the edge levels.
    """
    nd = x_t.ndim
    sqrt_abar = diffusion.extract(params["sqrt_alphas_cumprod"], t, nd)
    sqrt_one_minus = diffusion.extract(params["sqrt_one_minus_alphas_cumprod"], t, nd)
    return (x_t - sqrt_abar * params["point"]) / sqrt_one_minus, sqrt_abar, sqrt_one_minus


def ideal_eps(params, x_t, t):
    return ideal_noise(params, x_t, t)[0]


def ideal_x0(params, x_t, t):
    return jnp.broadcast_to(params["point"], x_t.shape)


def ideal_v(params, x_t, t):
    eps, sqrt_abar, sqrt_one_minus = ideal_noise(params, x_t, t)
    return sqrt_abar * eps - sqrt_one_minus * params["point"]


IDEAL = {"eps": ideal_eps, "x0": ideal_x0, "v": ideal_v}


def closed_form_bound(tab, point, variance):
    """(L_0, L_T, sum of KL terms) in bits/dim for the ideal denoiser of the point x0*.

    At t = 0 the reverse mean is x0* exactly and its variance is the posterior variance at
    index 1 (for both fixed variances), so L_0 = -log P(bin of x0* | N(x0*, s^2)):
    erf(h / (s sqrt 2)) for an interior level, Phi(h / s) for an edge one, h = 1 / 255. The
    reverse mean equals the true posterior mean for t > 0, so each KL is between Gaussians with
    one mean: 0 for fixed_small, (log(beta / b~) + b~ / beta - 1) / 2 for fixed_large.
    """
    point = np.asarray(point, np.float64)
    sigma = math.sqrt(tab["posterior_variance"][1])
    half = 1.0 / 255.0
    edge = np.abs(point) == 1.0
    prob = np.where(edge, special.ndtr(half / sigma), special.erf(half / (sigma * math.sqrt(2))))
    decoder_bits = -np.mean(np.log(prob)) / ref.LN2
    abar = tab["alphas_cumprod"][-1]
    prior = np.mean(0.5 * (-abar - np.log1p(-abar) + abar * point**2)) / ref.LN2
    ratio = tab["posterior_variance"][1:] / tab["betas"][1:]
    kl = 0.5 * (-np.log(ratio) + ratio - 1.0) / ref.LN2
    terms = np.zeros(len(tab["betas"]) - 1) if variance == "fixed_small" else kl
    return decoder_bits, prior, terms


@given(
    name=st.sampled_from(NAMES),
    levels=st.lists(st.integers(0, 255), min_size=6, max_size=6),
    parameterization=st.sampled_from(PARAMETERIZATIONS),
    variance=st.sampled_from(("fixed_small", "fixed_large")),
    seed=st.integers(0, 2**31 - 1),
)
def test_nll_bpd_closed_form_for_a_one_point_dataset(
    name, levels, parameterization, variance, seed
):
    schedule, tab = schedule_pair(name, NLL_T)
    point = (2.0 * np.asarray(levels, np.float64) / 255.0 - 1.0).reshape(1, 6).astype(np.float32)
    x0 = np.repeat(point, 2, axis=0)  # two copies of the one data point
    params = {
        "point": jnp.asarray(point),
        "sqrt_alphas_cumprod": schedule.sqrt_alphas_cumprod,
        "sqrt_one_minus_alphas_cumprod": schedule.sqrt_one_minus_alphas_cumprod,
    }
    result = jitted_nll(
        params,
        schedule,
        x0,
        jax.random.key(seed),
        model_fn=IDEAL[parameterization],
        parameterization=parameterization,
        variance=variance,
    )
    decoder_bits, prior, terms = closed_form_bound(tab, point, variance)
    bits_close(result.terms_bpd[:, 0], [decoder_bits] * 2, what="L_0")
    bits_close(result.prior_bpd, [prior] * 2, what="L_T")
    for example in range(2):
        bits_close(result.terms_bpd[example, 1:], terms, what="L_t, t > 0")
    bits_close(result.total_bpd, [decoder_bits + prior + terms.sum()] * 2, what="total")
    # The ideal denoiser recovers x0 up to float32 rounding, which x0 = (x_t - sqrt(1 - abar)
    # eps) / sqrt(abar) amplifies by 1/sqrt(abar): about 1e-4 at cosine's last step (T = 30).
    rounding = (8 * np.finfo(np.float32).eps / np.sqrt(tab["alphas_cumprod"])) ** 2
    excess = np.asarray(result.x0_mse) - np.maximum(rounding, 1e-12)
    assert np.all(excess <= 0.0), (
        f"x0 MSE above float32 rounding at t = {np.argmax(excess) % NLL_T}"
    )


def test_nll_bpd_compiles_once_and_passes_model_kwargs():
    schedule, _ = schedule_pair("linear", NLL_T)
    x0 = grid_data(np.random.default_rng(14), (2, 3))
    params = init_params(3, learned=False)
    chex.clear_trace_counter()

    @jax.jit
    @chex.assert_max_traces(n=1)
    def bound(params, x0, key, gain):
        return losses.nll_bpd(
            toy_model, params, schedule, x0, key, model_kwargs={"gain": gain}
        ).total_bpd

    totals = [bound(params, x0, jax.random.key(i), jnp.float32(g)) for i, g in [(0, 1), (1, 0.5)]]
    assert not np.allclose(totals[0], totals[1])
    eager = losses.nll_bpd(
        toy_model, params, schedule, x0, jax.random.key(1), model_kwargs={"gain": 0.5}
    )
    chex.assert_trees_all_close(totals[1], eager.total_bpd, rtol=1e-5)


@pytest.mark.parametrize(("name", "num_timesteps"), [("cosine", NLL_T), ("linear", 1000)])
def test_nll_bpd_gaussian_decoder_closed_form_for_a_one_point_dataset(name, num_timesteps):
    """Continuous one-point data {x0*} and its ideal denoiser (fixed_small): every KL term is 0,
    L_0 = log(2 pi s^2) / 2 with s^2 the decoder variance, L_T the prior's closed form."""
    schedule, tab = schedule_pair(name, num_timesteps)
    point = np.array([[2.5, -3.0, 0.1]], np.float32)
    params = {
        "point": jnp.asarray(point),
        "sqrt_alphas_cumprod": schedule.sqrt_alphas_cumprod,
        "sqrt_one_minus_alphas_cumprod": schedule.sqrt_one_minus_alphas_cumprod,
    }
    bound = jax.jit(
        functools.partial(
            losses.nll_bpd, ideal_v, parameterization="v", clip_x0=False, decoder="gaussian"
        )
    )
    result = bound(params, schedule, np.repeat(point, 2, axis=0), jax.random.key(25))
    decoder_bits = 0.5 * math.log(2.0 * math.pi * tab["posterior_variance"][1]) / ref.LN2
    abar = tab["alphas_cumprod"][-1]
    prior = np.mean(0.5 * (-abar - np.log1p(-abar) + abar * point.astype(np.float64) ** 2))
    bits_close(result.terms_bpd[:, 0], [decoder_bits] * 2, atol=1e-5, what="L_0")
    bits_close(result.terms_bpd[:, 1:], np.zeros((2, num_timesteps - 1)), atol=1e-5, what="L_t")
    bits_close(result.prior_bpd, [prior / ref.LN2] * 2, what="L_T")


def test_nll_bpd_with_explicit_noise():
    """noise[t] in place of normal(fold_in(key, t)): the same bound up to XLA's rounding (the
    draws fuse differently with the scan), and an error naming the expected shape."""
    schedule, _ = schedule_pair("cosine", NLL_T)
    x0 = binary_data(np.random.default_rng(26), (3, 4, 4, 2))
    params = init_params(2, learned=False)
    key = jax.random.key(27)
    drawn = jnp.stack(
        [jax.random.normal(jax.random.fold_in(key, t), x0.shape) for t in range(NLL_T)]
    )
    keyed = losses.nll_bpd(toy_model, params, schedule, x0, key)
    explicit = losses.nll_bpd(toy_model, params, schedule, x0, None, noise=drawn)
    chex.assert_trees_all_close(keyed, explicit, rtol=1e-6, atol=1e-6)
    with pytest.raises(
        ValueError, match=r"noise must have shape \[T, B, ...\] = \(30, 3, 4, 4, 2\)"
    ):
        losses.nll_bpd(toy_model, params, schedule, x0, None, noise=drawn[1:])
    with pytest.raises(ValueError, match="needs a key"):
        losses.nll_bpd(toy_model, params, schedule, x0, None)


# ---------------------------------------------------------------------------- chex variants

ALL_THREE = dict(with_jit=True, without_jit=True, with_pmap=True)


class LossesUnderVariantsTest(chex.TestCase):
    """Each loss function under ``jit`` and eagerly, the per-example ones also under ``pmap``
    (one example or one row per device), against the same references as the sweeps above."""

    def call(self, fn, *args):
        """Per-example functions: the batch is split over the devices under pmap."""
        return ref.call_variant(self.variant, fn, *args)

    def call_unsplit(self, fn, *args):
        return self.variant(fn)(*args)

    @chex.variants(**ALL_THREE)
    def test_normal_kl(self):
        check_normal_kl(functools.partial(ref.call_variant, self.variant, shared=()))

    @chex.variants(**ALL_THREE)
    def test_mean_flat(self):
        x = np.random.default_rng(16).normal(size=SHAPES["image"]).astype(np.float32)
        got = ref.call_variant(self.variant, losses.mean_flat, x, shared=())
        chex.assert_shape(got, (8,))
        chex.assert_trees_all_close(got, ref.mean_flat(x), rtol=1e-6, atol=1e-7)

    @chex.variants(**ALL_THREE)
    def test_decoder(self):
        check_decoder(functools.partial(ref.call_variant, self.variant, shared=()))

    @chex.variants(**ALL_THREE)
    def test_prior_bpd(self):
        check_prior_bpd("cosine", self.call)

    # Every parameterisation and every variance once: each is its own traced code path.
    @chex.variants(**ALL_THREE)
    @parameterized.parameters(*zip(PARAMETERIZATIONS, VARIANCES, strict=True))
    def test_vb_terms_bpd(self, parameterization, variance):
        check_vb_terms_bpd("cosine", SHAPES["image"], parameterization, variance, [True], self.call)

    @chex.variants(**ALL_THREE)
    def test_gaussian_decoder(self):
        check_gaussian_decoder("cosine", "v", "learned_range", self.call)

    @chex.variants(**ALL_THREE)
    @parameterized.parameters(*PARAMETERIZATIONS)
    def test_min_snr_weight(self, parameterization):
        check_min_snr_weight("cosine", 5.0, parameterization, self.call)

    # min-SNR weighting, and the bound with a learned variance (hybrid runs every term); the
    # eager sweep above covers the other combinations.
    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters(
        ("simple", "eps", "fixed_small", 5.0),
        ("hybrid", "v", "learned_range", None),
    )
    def test_training_loss(self, loss_type, parameterization, variance, gamma):
        image = SHAPES["image"]
        check_training_loss(
            loss_type, parameterization, variance, gamma, "sigmoid", image, self.call_unsplit
        )

    @chex.variants(with_jit=True, without_jit=True)
    def test_nll_bpd_terms(self):
        check_nll_bpd_terms("v", "learned_range", self.call_unsplit)
