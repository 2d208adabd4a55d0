"""EDM's training formulation (Karras et al. 2022, Table 1 and Section 5): the preconditioning
of a network into a denoiser, its loss weight, and the map between EDM's sigma and the
discrete VP chain.

EDM trains a denoiser ``D(x; sigma) = c_skip(sigma) x + c_out(sigma) F(c_in(sigma) x;
c_noise(sigma))`` of ``x = x0 + n``, ``n ~ N(0, sigma^2 I)``, with (Table 1, "Ours")

    c_skip  = sigma_data^2 / (sigma^2 + sigma_data^2)
    c_out   = sigma sigma_data / sqrt(sigma^2 + sigma_data^2)
    c_in    = 1 / sqrt(sigma^2 + sigma_data^2)
    c_noise = ln(sigma) / 4
    lambda  = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2      (the loss weight)

so that ``lambda c_out^2 = 1``: the weighted loss is the unit-weight MSE of ``F`` against its
effective target ``(x0 - c_skip x) / c_out``. For data of variance ``sigma_data^2`` per
dimension, the skip ``c_skip x`` alone is the best linear denoiser.

The VP chain of a :class:`~diffusion_jax.schedules.Schedule` is the same family of noisy data
rescaled: ``x_t = sqrt(abar_t) (x0 + sigma_t eps)`` with ``sigma_t = sqrt((1 - abar_t) /
abar_t)``, so ``x = x_t / sqrt(abar_t)`` and ``abar = 1 / (1 + sigma^2)``.
:func:`vp_preconditioning` gives the coefficients that act on ``x_t`` directly; they stay
finite as ``abar -> 0`` (only ``c_noise`` grows, as ``-ln(abar) / 8``).

Pure functions of arrays (no Flax, no keys). Sigma is any float array, typically ``[B]``; the
coefficients have its shape (broadcast them against ``[B, ...]`` data with
:func:`expand`).

Example:
  >>> c = preconditioning(jnp.array([0.5]), sigma_data=0.5)
  >>> float(c.c_skip[0]), float(loss_weight(jnp.array([0.5]), 0.5)[0])
  (0.5, 8.0)
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

__all__ = [
    "EDM_P_MEAN",
    "EDM_P_STD",
    "EDM_SIGMA_DATA",
    "Preconditioning",
    "alpha_bar_from_sigma",
    "check_settings",
    "edm_to_vp",
    "expand",
    "loss_weight",
    "preconditioning",
    "sigma_from_alpha_bar",
    "vp_preconditioning",
    "vp_to_edm",
]

# The paper's settings (Table 1): data scaled to [-1, 1] have sigma_data = 0.5, and training
# draws ln(sigma) ~ N(P_mean, P_std^2).
EDM_SIGMA_DATA = 0.5
EDM_P_MEAN = -1.2
EDM_P_STD = 1.2


class Preconditioning(NamedTuple):
    """The four coefficients of ``D = c_skip x + c_out F(c_in x; c_noise)``, each of sigma's
    shape (``[B]``)."""

    c_skip: jax.Array  # [B] weight of the input skipped past the network
    c_out: jax.Array  # [B] scale of the network's output
    c_in: jax.Array  # [B] scale of the network's input
    c_noise: jax.Array  # [B] the network's noise conditioning, ln(sigma) / 4


def check_settings(sigma_data: float, P_mean: float = EDM_P_MEAN, P_std: float = EDM_P_STD):
    """Checks EDM's training settings.

    Args:
      sigma_data: the data's standard deviation per dimension, > 0 and finite.
      P_mean: mean of ln(sigma) in training, finite.
      P_std: standard deviation of ln(sigma), > 0 and finite.

    Raises:
      ValueError: naming the first invalid setting.
    """
    for name, value, positive in (
        ("sigma_data", sigma_data, True),
        ("P_mean", P_mean, False),
        ("P_std", P_std, True),
    ):
        number = isinstance(value, int | float) and not isinstance(value, bool)
        if not number or not math.isfinite(value) or (positive and not value > 0):
            kind = "a finite number > 0" if positive else "a finite number"
            raise ValueError(f"EDM's {name} must be {kind}, got {name}={value!r}.")


def expand(coefficient: jax.Array, ndim: int) -> jax.Array:
    """``[B]`` coefficients reshaped to ``[B, 1, ..., 1]`` (``ndim`` axes) to scale data."""
    return jnp.reshape(coefficient, coefficient.shape + (1,) * (ndim - coefficient.ndim))


def preconditioning(sigma: jax.Array, sigma_data: float) -> Preconditioning:
    """EDM's c_skip, c_out, c_in and c_noise at noise level ``sigma`` (Table 1).

    Args:
      sigma: noise standard deviations, > 0, any shape (``[B]``).
      sigma_data: the data's standard deviation per dimension.

    Returns:
      A :class:`Preconditioning` of arrays shaped like ``sigma``.

    Example:
      >>> c = preconditioning(jnp.array([0.5, 80.0]), sigma_data=0.5)
      >>> c.c_in.shape
      (2,)
    """
    sigma = jnp.asarray(sigma, jnp.float32)
    total = sigma**2 + sigma_data**2
    return Preconditioning(
        c_skip=sigma_data**2 / total,
        c_out=sigma * sigma_data * jax.lax.rsqrt(total),
        c_in=jax.lax.rsqrt(total),
        c_noise=jnp.log(sigma) / 4.0,
    )


def loss_weight(sigma: jax.Array, sigma_data: float) -> jax.Array:
    """EDM's loss weight lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2, the
    inverse of ``c_out^2``.

    Args:
      sigma: noise standard deviations, > 0 (``[B]``).
      sigma_data: the data's standard deviation per dimension.

    Returns:
      Weights shaped like ``sigma``.
    """
    sigma = jnp.asarray(sigma, jnp.float32)
    return (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2


def sigma_from_alpha_bar(alpha_bar: jax.Array) -> jax.Array:
    """sigma = sqrt((1 - abar) / abar): the EDM noise level of a VP timestep (inf at abar = 0)."""
    alpha_bar = jnp.asarray(alpha_bar, jnp.float32)
    return jnp.sqrt((1.0 - alpha_bar) / alpha_bar)


def alpha_bar_from_sigma(sigma: jax.Array) -> jax.Array:
    """abar = 1 / (1 + sigma^2), the inverse of :func:`sigma_from_alpha_bar`."""
    sigma = jnp.asarray(sigma, jnp.float32)
    return 1.0 / (1.0 + sigma**2)


def vp_to_edm(x_t: jax.Array, alpha_bar: jax.Array) -> jax.Array:
    """x = x_t / sqrt(abar): VP data ``[B, ...]`` at ``abar`` (``[B]``) in EDM's scale."""
    return x_t * expand(jax.lax.rsqrt(jnp.asarray(alpha_bar, jnp.float32)), jnp.ndim(x_t))


def edm_to_vp(x: jax.Array, sigma: jax.Array) -> jax.Array:
    """x_t = x / sqrt(1 + sigma^2): EDM data ``[B, ...]`` at ``sigma`` (``[B]``) in VP scale."""
    sigma = jnp.asarray(sigma, jnp.float32)
    return x * expand(jax.lax.rsqrt(1.0 + sigma**2), jnp.ndim(x))


def vp_preconditioning(alpha_bar: jax.Array, sigma_data: float) -> Preconditioning:
    """The preconditioning applied to VP data: ``D(x_t / sqrt(abar); sigma) = c_skip x_t +
    c_out F(c_in x_t; c_noise)`` with sigma = sigma(abar).

    Written in abar so that it stays finite down to abar = 0 (sigma = inf), where
    ``c_skip = 0``, ``c_out = sigma_data`` and ``c_in = 1``; with ``s = 1 - abar + abar
    sigma_data^2``:

        c_skip = sigma_data^2 sqrt(abar) / s,   c_out = sigma_data sqrt(1 - abar) / sqrt(s),
        c_in = 1 / sqrt(s),                     c_noise = (ln(1 - abar) - ln(abar)) / 8.

    Args:
      alpha_bar: the timesteps' abar in (0, 1] (``[B]``).
      sigma_data: the data's standard deviation per dimension.

    Returns:
      A :class:`Preconditioning` whose ``c_skip`` and ``c_in`` act on ``x_t``.
    """
    alpha_bar = jnp.asarray(alpha_bar, jnp.float32)
    one_minus = 1.0 - alpha_bar
    total = one_minus + alpha_bar * sigma_data**2
    return Preconditioning(
        c_skip=sigma_data**2 * jnp.sqrt(alpha_bar) / total,
        c_out=sigma_data * jnp.sqrt(one_minus) * jax.lax.rsqrt(total),
        c_in=jax.lax.rsqrt(total),
        c_noise=(jnp.log(one_minus) - jnp.log(alpha_bar)) / 8.0,
    )
