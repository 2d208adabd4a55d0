"""The building blocks of the bound: the KL between Gaussians and the decoders' log-likelihoods
(discretised for 8-bit data, Gaussian for continuous data), in nats per element."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.scipy.special import log_ndtr, ndtr

__all__ = [
    "discretized_gaussian_log_likelihood",
    "gaussian_log_likelihood",
    "mean_flat",
    "normal_kl",
]


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
