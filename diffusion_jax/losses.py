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
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.scipy.special import log_ndtr, ndtr

from diffusion_jax import diffusion, options
from diffusion_jax.schedules import Schedule

__all__ = [
    "LOSS_TYPES",
    "NLLTerms",
    "discretized_gaussian_log_likelihood",
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
) -> jax.Array:
    """The per-timestep term of the variational bound, in bits/dim.

    L_{t} = KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)) for t > 0 (index convention: table
    index t), and the decoder -log p(x_0 | x_1) for t = 0.

    Args:
      schedule: the diffusion's tables.
      model_output: the network's output for ``(x_t, t)``.
      x0: ``[B, ...]`` clean data in [-1, 1] (on the ``num_bins`` grid for the decoder term).
      x_t: ``[B, ...]`` noisy data.
      t: ``[B]`` int timesteps.
      parameterization, variance, clip_x0: see :func:`diffusion_jax.diffusion.p_mean_variance`.
      num_bins: levels of the data for the decoder term.

    Returns:
      ``[B]`` bits/dim.
    """
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
    decoder_nll = -mean_flat(
        discretized_gaussian_log_likelihood(x0, mean, 0.5 * log_var, num_bins)
    ) / math.log(2.0)
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
    key: jax.Array,
    *,
    parameterization: options.Parameterization = "eps",
    variance: options.Variance = "fixed_small",
    loss_type: options.LossType = "simple",
    min_snr_gamma: float | None = None,
    model_kwargs: dict[str, Any] | None = None,
    timestep_probs: jax.Array | None = None,
    num_bins: int = 256,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """A training loss for a batch: draws t and the noise from ``key``, runs the model once.

    Args:
      model_fn: ``model_fn(params, x_t, t, **model_kwargs) -> output``.
      params: the model's parameters, passed to ``model_fn`` as they are.
      schedule: the diffusion's tables.
      x0: ``[B, ...]`` clean data (images scaled to [-1, 1]).
      key: a PRNG key; split into the timestep key and the noise key.
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

    Returns:
      ``(loss, metrics)``: the scalar batch-mean loss, and a dict with ``loss``, ``mse``, ``vb``
      (batch means; ``vb`` is 0 for ``simple``), and per-example ``t`` ``[B]`` and
      ``per_example_loss`` ``[B]`` (unweighted by importance sampling, for loss-aware samplers).
    """
    options.check("loss_type", loss_type)
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
    t_key, noise_key = jax.random.split(key)
    if timestep_probs is None:
        t = jax.random.randint(t_key, (batch,), 0, num_timesteps, dtype=jnp.int32)
        is_weight = jnp.ones((batch,), jnp.float32)
    else:
        if jnp.shape(timestep_probs) != (num_timesteps,):
            raise ValueError(
                f"timestep_probs must have shape [T] = ({num_timesteps},), "
                f"got {jnp.shape(timestep_probs)}."
            )
        t = jax.random.choice(t_key, num_timesteps, (batch,), p=timestep_probs).astype(jnp.int32)
        is_weight = 1.0 / (num_timesteps * jnp.take(timestep_probs, t))
    noise = jax.random.normal(noise_key, x0.shape, dtype=x0.dtype)
    x_t = diffusion.q_sample(schedule, x0, t, noise)
    model_output = model_fn(params, x_t, t, **model_kwargs).astype(jnp.float32)
    mean_out, var_out = diffusion.split_model_output(model_output, x_t, variance)

    target = diffusion.training_target(schedule, x0, t, noise, parameterization)
    mse = mean_flat((target - mean_out) ** 2)
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
    }
    return loss, metrics


class NLLTerms(NamedTuple):
    """The variational bound of a batch, per example, in bits/dim."""

    total_bpd: jax.Array  # [B] prior + sum of all terms
    prior_bpd: jax.Array  # [B] L_T
    terms_bpd: jax.Array  # [B, T] terms_bpd[:, 0] is the decoder L_0, [:, t] is L_t for t > 0
    mse: jax.Array  # [B, T] MSE of the predicted x_0 at every t (diagnostic)


def nll_bpd(
    model_fn: ModelFn,
    params: Any,
    schedule: Schedule,
    x0: jax.Array,
    key: jax.Array,
    *,
    parameterization: options.Parameterization = "eps",
    variance: options.Variance = "fixed_small",
    clip_x0: diffusion.ClipX0 = True,
    model_kwargs: dict[str, Any] | None = None,
    num_bins: int = 256,
) -> NLLTerms:
    """The full variational bound of a batch in bits/dim, over all T steps (one ``lax.scan``).

    One model call per timestep; the noise at step t is ``normal(fold_in(key, t))``.

    Args:
      model_fn: ``model_fn(params, x_t, t, **model_kwargs) -> output``.
      params: the model's parameters.
      schedule: the diffusion's tables.
      x0: ``[B, ...]`` data in [-1, 1] on the grid of ``num_bins`` levels.
      key: PRNG key for the noise.
      parameterization, variance, clip_x0: see :func:`diffusion_jax.diffusion.p_mean_variance`
        (improved-diffusion clips x_0 when it reports the bound; so do we by default).
      model_kwargs: passed through to ``model_fn``.
      num_bins: data levels for the decoder term.

    Returns:
      :class:`NLLTerms`.
    """
    model_kwargs = {} if model_kwargs is None else dict(model_kwargs)
    batch = x0.shape[0]

    def term(_, t_scalar):
        t = jnp.full((batch,), t_scalar, dtype=jnp.int32)
        noise = jax.random.normal(jax.random.fold_in(key, t_scalar), x0.shape, x0.dtype)
        x_t = diffusion.q_sample(schedule, x0, t, noise)
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

    timesteps = jnp.arange(schedule.num_timesteps, dtype=jnp.int32)
    _, (terms, mse) = jax.lax.scan(term, None, timesteps)
    terms, mse = terms.T, mse.T
    prior = prior_bpd(schedule, x0)
    return NLLTerms(
        total_bpd=jnp.sum(terms, axis=1) + prior, prior_bpd=prior, terms_bpd=terms, mse=mse
    )
