"""Training losses and the variational bound (Ho et al. 2020; Nichol & Dhariwal 2021).

A model is any function ``model_fn(params, x_t, t, **model_kwargs) -> output``; these functions
pass ``model_kwargs`` (labels ``y=``, dropout ``rngs=``, ...) through unchanged and never import
Flax. Bits per dimension are natural-log quantities divided by ``log(2)`` and averaged over every
non-batch dimension.

Example:
  >>> loss, metrics = training_loss(model_fn, params, schedule, x0, key)
  >>> grads = jax.grad(lambda p: training_loss(model_fn, p, schedule, x0, key)[0])(params)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
from jax.scipy.special import log_ndtr, ndtr

from diffusion_jax import diffusion, options
from diffusion_jax.schedules import Schedule, check_parameterization

__all__ = [
    "DECODERS",
    "LOSS_TYPES",
    "NLLTerms",
    "discretized_gaussian_log_likelihood",
    "gaussian_log_likelihood",
    "mean_flat",
    "min_snr_weight",
    "nll_bpd",
    "normal_kl",
    "prior_bpd",
    "training_loss",
    "vb_terms_bpd",
]

LOSS_TYPES = options.LOSS_TYPES
ModelFn = Callable[..., jax.Array]
Decoder = Literal["discretized", "gaussian"]
# The decoder L_0 = -log p(x_0 | x_1): "discretized" for data on a grid of num_bins levels in
# [-1, 1] (8-bit images; a probability, so the bound is a code length), "gaussian" for
# continuous data (a density: the bound is in differential units, not comparable with the
# discretized one).
DECODERS: tuple[str, ...] = ("discretized", "gaussian")

# improved-diffusion's hybrid weight: L_simple + lambda * L_vlb with lambda = 1e-3, where L_vlb
# is T times the per-step term, i.e. vb * T / 1000.
HYBRID_LAMBDA = 1e-3


def mean_flat(x: jax.Array) -> jax.Array:
    """Mean over every axis but the first: ``[B, ...] -> [B]``."""
    return jnp.mean(x.reshape(x.shape[0], -1), axis=1)


def normal_kl(
    mean1: jax.Array, logvar1: jax.Array, mean2: jax.Array, logvar2: jax.Array
) -> jax.Array:
    """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))), elementwise, in nats.

    Args:
      mean1, logvar1, mean2, logvar2: broadcastable arrays.

    Returns:
      The KL divergence, the broadcast shape of the inputs.
    """
    return 0.5 * (
        -1.0
        + logvar2
        - logvar1
        + jnp.exp(logvar1 - logvar2)
        + (mean1 - mean2) ** 2 * jnp.exp(-logvar2)
    )


def discretized_gaussian_log_likelihood(
    x: jax.Array, means: jax.Array, log_scales: jax.Array, num_bins: int = 256
) -> jax.Array:
    """log-likelihood of discrete data in [-1, 1] under a discretised Gaussian (the L_0 decoder).

    The data take ``num_bins`` evenly spaced values in [-1, 1]; each value owns the bin of width
    2 / (num_bins - 1) around it, and the two edge bins extend to -inf and +inf.

    Args:
      x: ``[B, ...]`` data on the grid of ``num_bins`` levels in [-1, 1].
      means: Gaussian means, shape of ``x``.
      log_scales: log standard deviations, broadcastable to ``x``.
      num_bins: the number of levels, 256 for 8-bit data.

    Returns:
      Elementwise log-probabilities in nats, shape of ``x``.
    """
    if num_bins < 2:
        raise ValueError(f"num_bins must be >= 2, got {num_bins=}.")
    half_bin = 1.0 / (num_bins - 1)
    inv_stdv = jnp.exp(-log_scales)
    centered = x - means
    upper = inv_stdv * (centered + half_bin)
    lower = inv_stdv * (centered - half_bin)
    log_cdf_upper = log_ndtr(upper)
    log_one_minus_cdf_lower = log_ndtr(-lower)
    # A bin's mass as a difference of CDFs cancels in the tail it lies in: take it from the
    # lower tail below the mean and from the upper tail above it.
    cdf_delta = jnp.where(lower > 0, ndtr(-lower) - ndtr(-upper), ndtr(upper) - ndtr(lower))
    log_cdf_delta = jnp.log(jnp.maximum(cdf_delta, 1e-12))
    edge = 0.5 * half_bin
    return jnp.where(
        x < -1.0 + edge,
        log_cdf_upper,
        jnp.where(x > 1.0 - edge, log_one_minus_cdf_lower, log_cdf_delta),
    )


def gaussian_log_likelihood(x: jax.Array, means: jax.Array, log_scales: jax.Array) -> jax.Array:
    """log N(x; means, exp(log_scales)^2), elementwise, in nats: the continuous-data decoder.

    Args:
      x: ``[B, ...]`` data.
      means: Gaussian means, shape of ``x``.
      log_scales: log standard deviations, broadcastable to ``x``.

    Returns:
      Elementwise log-densities in nats, shape of ``x``.

    Example:
      >>> gaussian_log_likelihood(jnp.zeros(3), jnp.zeros(3), jnp.zeros(3))  # -log(2 pi) / 2
    """
    z = (x - means) * jnp.exp(-log_scales)
    return -0.5 * (math.log(2.0 * math.pi) + z * z) - log_scales


def min_snr_weight(
    schedule: Schedule, t: jax.Array, gamma: float, parameterization: options.Parameterization
) -> jax.Array:
    """Min-SNR-gamma loss weights (Hang et al. 2023) for the MSE to each target.

    min(SNR, g) / SNR for eps, min(SNR, g) for x0, min(SNR, g) / (SNR + 1) for v; each weights
    the MSE so that all three equal min(SNR, g) times the MSE in x_0.

    Args:
      schedule: the diffusion's tables.
      t: ``[B]`` int timesteps.
      gamma: the clamp, > 0 (5 in the paper).
      parameterization: ``eps``, ``x0`` or ``v``.

    Returns:
      ``[B]`` float32 weights.
    """
    if not gamma > 0:
        raise ValueError(f"min_snr_gamma must be > 0, got {gamma}.")
    snr = jnp.exp(jnp.take(jnp.asarray(schedule.log_snr), t))
    return jnp.minimum(snr, gamma) / diffusion.mse_per_x0_mse(snr, parameterization)


def vb_terms_bpd(
    schedule: Schedule,
    model_output: jax.Array,
    x0: jax.Array,
    x_t: jax.Array,
    t: jax.Array,
    *,
    parameterization: options.Parameterization = "eps",
    variance: options.Variance = "fixed_small",
    clip_x0: diffusion.ClipX0 = False,
    num_bins: int = 256,
    decoder: Decoder = "discretized",
) -> jax.Array:
    """The per-timestep term of the variational bound, in bits/dim.

    L_{t} = KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)) for t > 0 (index convention: table
    index t), and the decoder -log p(x_0 | x_1) for t = 0. The discretized decoder uses the
    exact normal CDF; the DDPM and improved-DDPM reference codes use a tanh approximation of it,
    whose L_0 (and so total) differs by 1e-4..1e-3 bits/dim in general: 4.8e-4 higher on the
    input tests/test_losses.py pins, where the decoder mean is off by half its sigma.

    Args:
      schedule: the diffusion's tables.
      model_output: the network's output for ``(x_t, t)``.
      x0: ``[B, ...]`` clean data in [-1, 1] (on the ``num_bins`` grid for the decoder term).
      x_t: ``[B, ...]`` noisy data.
      t: ``[B]`` int timesteps.
      parameterization, variance, clip_x0: see :func:`diffusion_jax.diffusion.p_mean_variance`.
      num_bins: levels of the data for the decoder term.
      decoder: ``"discretized"`` (data on the ``num_bins`` grid) or ``"gaussian"`` (continuous
        data: L_0 = -log N(x0; mean, exp(log_var)), a density, in bits/dim of differential
        entropy; multiply by log(2) for nats/dim).

    Returns:
      ``[B]`` bits/dim.

    Example:
      >>> vb_terms_bpd(schedule, model_output, x0, x_t, t, parameterization="v")
    """
    if decoder not in DECODERS:
        raise ValueError(f"decoder must be one of {DECODERS}, got {decoder=}.")
    true_mean, _, true_log_var = diffusion.q_posterior_mean_variance(schedule, x0, x_t, t)
    mean, _, log_var, _ = diffusion.p_mean_variance(
        schedule,
        model_output,
        x_t,
        t,
        parameterization=parameterization,
        variance=variance,
        clip_x0=clip_x0,
    )
    kl = mean_flat(normal_kl(true_mean, true_log_var, mean, log_var)) / math.log(2.0)
    if decoder == "discretized":
        log_likelihood = discretized_gaussian_log_likelihood(x0, mean, 0.5 * log_var, num_bins)
    else:
        log_likelihood = gaussian_log_likelihood(x0, mean, 0.5 * log_var)
    decoder_nll = -mean_flat(log_likelihood) / math.log(2.0)
    return jnp.where(t == 0, decoder_nll, kl)


def prior_bpd(schedule: Schedule, x0: jax.Array) -> jax.Array:
    """L_T: KL(q(x_T | x_0) || N(0, I)) in bits/dim; no learned parameters.

    Args:
      schedule: the diffusion's tables.
      x0: ``[B, ...]`` clean data.

    Returns:
      ``[B]`` bits/dim.
    """
    t = jnp.full((x0.shape[0],), schedule.num_timesteps - 1, dtype=jnp.int32)
    mean, _, log_var = diffusion.q_mean_variance(schedule, x0, t)
    return mean_flat(normal_kl(mean, log_var, 0.0, 0.0)) / math.log(2.0)


def training_loss(
    model_fn: ModelFn,
    params: Any,
    schedule: Schedule,
    x0: jax.Array,
    key: jax.Array | None,
    *,
    parameterization: options.Parameterization = "eps",
    variance: options.Variance = "fixed_small",
    loss_type: options.LossType = "simple",
    min_snr_gamma: float | None = None,
    model_kwargs: dict[str, Any] | None = None,
    timestep_probs: jax.Array | None = None,
    num_bins: int = 256,
    t: jax.Array | None = None,
    noise: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """A training loss for a batch: draws t and the noise from ``key`` (unless given), runs the
    model once.

    ``t_key, noise_key = split(key)``; t is ``randint(t_key, [B], 0, T)`` (or drawn with
    ``timestep_probs``) and the noise ``normal(noise_key, x0.shape)``. Passing ``t`` and
    ``noise`` explicitly replaces either draw, so two models (or two parameterisations) can be
    compared on the same t and noise; a draw that is given is not taken from ``key``, and the
    other one is drawn exactly as without it.

    Args:
      model_fn: ``model_fn(params, x_t, t, **model_kwargs) -> output``.
      params: the model's parameters, passed to ``model_fn`` as they are.
      schedule: the diffusion's tables.
      x0: ``[B, ...]`` clean data (images scaled to [-1, 1]).
      key: a PRNG key; split into the timestep key and the noise key. May be None when both
        ``t`` and ``noise`` are given.
      parameterization: the network's target: ``eps``, ``x0`` or ``v``.
      variance: ``fixed_small``/``fixed_large``, or ``learned_range`` (2C-channel output).
      loss_type: ``simple`` (MSE to the target, optionally min-SNR weighted), ``hybrid``
        (MSE + vb * T / 1000 with the mean stop-gradiented in vb; needs a learned variance) or
        ``vlb`` (the per-step bound term alone, bits/dim; the full bound is T times its mean).
      min_snr_gamma: if set, weights the MSE by :func:`min_snr_weight`.
      model_kwargs: passed through to ``model_fn`` (``y=``, ``rngs=``, ...).
      timestep_probs: optional ``[T]`` sampling probabilities for t (importance sampling); the
        per-example losses are then weighted by 1 / (T p_t) so the estimate stays unbiased.
      num_bins: data levels for the decoder term of the bound.
      t: optional ``[B]`` int32 timesteps in [0, T-1] to use instead of drawing them (with
        ``timestep_probs`` the importance weights still apply to them).
      noise: optional standard normal noise of ``x0``'s shape to use instead of drawing it.

    Returns:
      ``(loss, metrics)``: the scalar batch-mean loss, and a dict with ``loss``, ``mse``, ``vb``
      (batch means; ``mse`` min-SNR weighted when asked, ``vb`` 0 for ``simple``), and per
      example ``[B]``: ``t`` (the timesteps used), ``per_example_loss`` (unweighted by
      importance sampling, for loss-aware samplers), ``per_example_mse`` (the MSE to the
      target, before any min-SNR weight) and, for ``hybrid`` and ``vlb``, ``per_example_vb``
      (the bound term L_t in bits/dim).

    Raises:
      ValueError: a bad option, ``x0`` without a data axis, ``t`` or ``noise`` of the wrong
        shape, or ``key=None`` while a draw is still needed.

    Example:
      >>> t = jnp.array([0, 500], jnp.int32)
      >>> noise = jax.random.normal(jax.random.key(1), x0.shape)
      >>> _, eps_metrics = training_loss(eps_fn, p, schedule, x0, None, t=t, noise=noise)
    """
    options.check("loss_type", loss_type)
    # The flag is static (pytree aux data), so this host check also works under jit.
    check_parameterization(schedule, parameterization)
    if loss_type == "hybrid" and variance != "learned_range":
        raise ValueError(
            "loss_type='hybrid' trains the variance and needs variance='learned_range', "
            f"got {variance=}."
        )
    if jnp.ndim(x0) < 2:
        raise ValueError(
            f"x0 must have shape [B, ...] with at least one data axis, got {x0.shape}."
        )
    model_kwargs = {} if model_kwargs is None else dict(model_kwargs)
    batch = x0.shape[0]
    num_timesteps = schedule.num_timesteps
    if t is not None and jnp.shape(t) != (batch,):
        raise ValueError(f"t must have shape [B] = ({batch},), got {jnp.shape(t)}.")
    if noise is not None and jnp.shape(noise) != x0.shape:
        raise ValueError(f"noise must have x0's shape {x0.shape}, got {jnp.shape(noise)}.")
    if key is None and (t is None or noise is None):
        raise ValueError("key=None needs both t and noise; pass a PRNG key to draw them.")
    if timestep_probs is not None and jnp.shape(timestep_probs) != (num_timesteps,):
        raise ValueError(
            f"timestep_probs must have shape [T] = ({num_timesteps},), "
            f"got {jnp.shape(timestep_probs)}."
        )
    if key is not None:
        t_key, noise_key = jax.random.split(key)
    if t is not None:
        t = jnp.asarray(t, jnp.int32)
    elif timestep_probs is None:
        t = jax.random.randint(t_key, (batch,), 0, num_timesteps, dtype=jnp.int32)
    else:
        t = jax.random.choice(t_key, num_timesteps, (batch,), p=timestep_probs).astype(jnp.int32)
    if timestep_probs is None:
        is_weight = jnp.ones((batch,), jnp.float32)
    else:
        is_weight = 1.0 / (num_timesteps * jnp.take(timestep_probs, t))
    if noise is None:
        noise = jax.random.normal(noise_key, x0.shape, dtype=x0.dtype)
    else:
        noise = jnp.asarray(noise, x0.dtype)
    x_t = diffusion.q_sample(schedule, x0, t, noise)
    model_output = model_fn(params, x_t, t, **model_kwargs).astype(jnp.float32)
    mean_out, var_out = diffusion.split_model_output(model_output, x_t, variance)

    target = diffusion.training_target(schedule, x0, t, noise, parameterization)
    unweighted_mse = mean_flat((target - mean_out) ** 2)
    mse = unweighted_mse
    if min_snr_gamma is not None:
        mse = mse * min_snr_weight(schedule, t, min_snr_gamma, parameterization)

    vb = jnp.zeros_like(mse)
    if loss_type in ("hybrid", "vlb"):
        if loss_type == "hybrid":
            # The bound trains only the variance; the mean learns from the MSE alone.
            frozen = jax.lax.stop_gradient(mean_out)
            vb_output = frozen if var_out is None else jnp.concatenate([frozen, var_out], -1)
        else:
            vb_output = model_output
        vb = vb_terms_bpd(
            schedule,
            vb_output,
            x0,
            x_t,
            t,
            parameterization=parameterization,
            variance=variance,
            clip_x0=False,
            num_bins=num_bins,
        )

    if loss_type == "simple":
        per_example = mse
    elif loss_type == "hybrid":
        per_example = mse + vb * (num_timesteps * HYBRID_LAMBDA)
    else:
        per_example = vb
    loss = jnp.mean(per_example * is_weight)
    metrics = {
        "loss": loss,
        "mse": jnp.mean(mse),
        "vb": jnp.mean(vb),
        "t": t,
        "per_example_loss": per_example,
        "per_example_mse": unweighted_mse,
    }
    if loss_type in ("hybrid", "vlb"):
        metrics["per_example_vb"] = vb
    return loss, metrics


class NLLTerms(NamedTuple):
    """The variational bound of a batch, per example, in bits/dim.

    ``x0_mse`` is the MSE of the (clipped) x_0 the model predicts, a diagnostic: it is *not*
    improved-diffusion's ``mse`` of its bound calculation, which is the MSE of the predicted eps.
    """

    total_bpd: jax.Array  # [B] prior + sum of all terms
    prior_bpd: jax.Array  # [B] L_T
    terms_bpd: jax.Array  # [B, T] terms_bpd[:, 0] is the decoder L_0, [:, t] is L_t for t > 0
    x0_mse: jax.Array  # [B, T] MSE of the predicted x_0 at every t (diagnostic)


def nll_bpd(
    model_fn: ModelFn,
    params: Any,
    schedule: Schedule,
    x0: jax.Array,
    key: jax.Array | None,
    *,
    parameterization: options.Parameterization = "eps",
    variance: options.Variance = "fixed_small",
    clip_x0: diffusion.ClipX0 = True,
    model_kwargs: dict[str, Any] | None = None,
    num_bins: int = 256,
    noise: jax.Array | None = None,
    decoder: Decoder = "discretized",
) -> NLLTerms:
    """The full variational bound of a batch in bits/dim, over all T steps (one ``lax.scan``).

    One model call per timestep; the noise at step t is ``normal(fold_in(key, t), x0.shape)``,
    or ``noise[t]`` when ``noise`` is given.

    Args:
      model_fn: ``model_fn(params, x_t, t, **model_kwargs) -> output``.
      params: the model's parameters.
      schedule: the diffusion's tables.
      x0: ``[B, ...]`` data in [-1, 1] on the grid of ``num_bins`` levels (any real values
        with ``decoder="gaussian"``).
      key: PRNG key for the noise; may be None when ``noise`` is given.
      parameterization, variance, clip_x0: see :func:`diffusion_jax.diffusion.p_mean_variance`
        (improved-diffusion clips x_0 when it reports the bound; so do we by default).
      model_kwargs: passed through to ``model_fn``.
      num_bins: data levels for the discretized decoder term.
      noise: optional ``[T, B, ...]`` standard normal noise, ``noise[t]`` for the term L_t,
        in place of the draws from ``key``.
      decoder: ``"discretized"`` (8-bit data; the bound is a code length in bits/dim) or
        ``"gaussian"`` (continuous data; see :func:`vb_terms_bpd`).

    Returns:
      :class:`NLLTerms`.

    Raises:
      ValueError: ``noise`` of the wrong shape, no ``key`` and no ``noise``, or a bad decoder.

    Example:
      >>> terms = nll_bpd(model_fn, params, schedule, x0, jax.random.key(0))
      >>> terms.total_bpd  # [B]
    """
    model_kwargs = {} if model_kwargs is None else dict(model_kwargs)
    batch = x0.shape[0]
    num_timesteps = schedule.num_timesteps
    if decoder not in DECODERS:
        raise ValueError(f"decoder must be one of {DECODERS}, got {decoder=}.")
    if noise is None and key is None:
        raise ValueError("nll_bpd needs a key to draw the noise, or the noise itself.")
    if noise is not None and jnp.shape(noise) != (num_timesteps, *x0.shape):
        raise ValueError(
            f"noise must have shape [T, B, ...] = {(num_timesteps, *x0.shape)}, "
            f"got {jnp.shape(noise)}."
        )

    def term(_, scanned):
        t_scalar, step_noise = scanned
        t = jnp.full((batch,), t_scalar, dtype=jnp.int32)
        if step_noise is None:
            step_noise = jax.random.normal(jax.random.fold_in(key, t_scalar), x0.shape, x0.dtype)
        x_t = diffusion.q_sample(schedule, x0, t, step_noise)
        output = model_fn(params, x_t, t, **model_kwargs).astype(jnp.float32)
        vb = vb_terms_bpd(
            schedule,
            output,
            x0,
            x_t,
            t,
            parameterization=parameterization,
            variance=variance,
            clip_x0=clip_x0,
            num_bins=num_bins,
            decoder=decoder,
        )
        _, _, _, pred_x0 = diffusion.p_mean_variance(
            schedule,
            output,
            x_t,
            t,
            parameterization=parameterization,
            variance=variance,
            clip_x0=clip_x0,
        )
        return None, (vb, mean_flat((pred_x0 - x0) ** 2))

    timesteps = jnp.arange(num_timesteps, dtype=jnp.int32)
    scanned_noise = None if noise is None else jnp.asarray(noise, x0.dtype)
    _, (terms, x0_mse) = jax.lax.scan(term, None, (timesteps, scanned_noise))
    terms, x0_mse = terms.T, x0_mse.T
    prior = prior_bpd(schedule, x0)
    return NLLTerms(
        total_bpd=jnp.sum(terms, axis=1) + prior, prior_bpd=prior, terms_bpd=terms, x0_mse=x0_mse
    )
