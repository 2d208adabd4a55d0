"""The forward process q(x_t | x_0) and its posterior q(x_{t-1} | x_t, x_0).

Pure, ``jit``-able functions of a :class:`~diffusion_jax.schedules.Schedule`. They take noise,
never keys. Data may have any shape ``[B, ...]``; ``t`` holds one int32 timestep in
``{0, ..., T-1}`` per example, shape ``[B]``.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp

from diffusion_jax.schedules import Schedule

__all__ = [
    "check_same_shape",
    "check_timesteps",
    "extract",
    "q_mean_variance",
    "q_posterior_mean_variance",
    "q_sample",
]


def check_timesteps(x: jax.Array, t: jax.Array, what: str = "x") -> None:
    """Checks that ``t`` is an integer vector with one timestep per example of ``x``."""
    if jnp.ndim(x) < 1:
        raise ValueError(f"{what} must have a batch axis, shape [B, ...]; got a scalar.")
    batch = jnp.shape(x)[0]
    chex.assert_shape(
        t,
        (batch,),
        custom_message=f"t must have shape [B] = ({batch},), one timestep per example of {what}",
        exception_type=ValueError,
    )
    if not jnp.issubdtype(jnp.result_type(t), jnp.integer):
        raise ValueError(
            f"t must hold integer timesteps in [0, T-1], got dtype {jnp.result_type(t)}."
        )


def check_same_shape(a: jax.Array, b: jax.Array, names: str) -> None:
    """A ValueError naming ``names`` unless ``a`` and ``b`` have one shape."""
    if jnp.shape(a) != jnp.shape(b):
        raise ValueError(
            f"{names} must have the same shape, got {jnp.shape(a)} and {jnp.shape(b)}."
        )


def extract(table: jax.Array, t: jax.Array, ndim: int) -> jax.Array:
    """Gathers ``table[t]`` and reshapes it to broadcast against data of rank ``ndim``.

    Args:
      table: ``[T]`` per-timestep values.
      t: ``[B]`` integer timesteps.
      ndim: rank of the data, e.g. 4 for ``[B, H, W, C]``.

    Returns:
      float32 ``[B, 1, ..., 1]`` with ``ndim`` axes.
    """
    values = jnp.take(jnp.asarray(table), t, axis=0)
    return values.reshape(values.shape + (1,) * (ndim - 1))


def q_sample(schedule: Schedule, x0: jax.Array, t: jax.Array, noise: jax.Array) -> jax.Array:
    """Samples x_t ~ q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I) by reparameterisation.

    Args:
      schedule: the diffusion's tables.
      x0: ``[B, ...]`` clean data.
      t: ``[B]`` int timesteps.
      noise: standard normal noise of ``x0``'s shape.

    Returns:
      x_t, shape of ``x0``.
    """
    check_timesteps(x0, t, "x0")
    check_same_shape(x0, noise, "x0 and noise")
    nd = jnp.ndim(x0)
    return (
        extract(schedule.sqrt_alphas_cumprod, t, nd) * x0
        + extract(schedule.sqrt_one_minus_alphas_cumprod, t, nd) * noise
    )


def q_mean_variance(
    schedule: Schedule, x0: jax.Array, t: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Mean, variance and log-variance of q(x_t | x_0).

    Args:
      schedule: the diffusion's tables.
      x0: ``[B, ...]`` clean data.
      t: ``[B]`` int timesteps.

    Returns:
      ``(mean, variance, log_variance)``: mean has ``x0``'s shape, the others ``[B, 1, ..., 1]``.
    """
    check_timesteps(x0, t, "x0")
    nd = jnp.ndim(x0)
    mean = extract(schedule.sqrt_alphas_cumprod, t, nd) * x0
    # Not 1 - abar in float32: that loses 2e-4 relative at t = 0.
    variance = extract(schedule.sqrt_one_minus_alphas_cumprod, t, nd) ** 2
    log_variance = extract(schedule.log_one_minus_alphas_cumprod, t, nd)
    return mean, variance, log_variance


def q_posterior_mean_variance(
    schedule: Schedule, x0: jax.Array, x_t: jax.Array, t: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The forward-process posterior q(x_{t-1} | x_t, x_0) (Ho et al. 2020, eqs. 6-7).

    Args:
      schedule: the diffusion's tables.
      x0: ``[B, ...]`` clean data (or a prediction of it).
      x_t: ``[B, ...]`` noisy data at step ``t``.
      t: ``[B]`` int timesteps.

    Returns:
      ``(mean, variance, log_variance_clipped)``; mean has ``x_t``'s shape, the others
      ``[B, 1, ..., 1]``. The log-variance at t = 0 takes the value at t = 1 (the variance there
      is 0).
    """
    check_timesteps(x_t, t, "x_t")
    check_same_shape(x0, x_t, "x0 and x_t")
    nd = jnp.ndim(x_t)
    mean = (
        extract(schedule.posterior_mean_coef1, t, nd) * x0
        + extract(schedule.posterior_mean_coef2, t, nd) * x_t
    )
    variance = extract(schedule.posterior_variance, t, nd)
    log_variance = extract(schedule.posterior_log_variance_clipped, t, nd)
    return mean, variance, log_variance
