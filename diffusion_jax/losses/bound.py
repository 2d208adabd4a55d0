"""The variational bound (Ho et al. 2020): its per-timestep terms L_t, the prior L_T and the
whole bound of a batch in one ``lax.scan``, in bits/dim (nats/dim with the Gaussian decoder)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp

from diffusion_jax import diffusion, options
from diffusion_jax.losses.likelihoods import (
    discretized_gaussian_log_likelihood,
    gaussian_log_likelihood,
    mean_flat,
    normal_kl,
)
from diffusion_jax.schedules import Schedule

__all__ = ["DECODERS", "NLLTerms", "nll_bpd", "prior_bpd", "vb_terms_bpd"]

ModelFn = Callable[..., jax.Array]
Decoder = Literal["discretized", "gaussian"]
# The decoder L_0 = -log p(x_0 | x_1): "discretized" for data on a grid of num_bins levels in
# [-1, 1] (8-bit images; a probability, so the bound is a code length), "gaussian" for
# continuous data (a density: the bound is in differential units, not comparable with the
# discretized one).
DECODERS: tuple[str, ...] = ("discretized", "gaussian")


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
