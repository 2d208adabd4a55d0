"""What a network predicts (eps, x0 or v) and how each converts to the others.

The eps / x0 / v switch is written once, in :data:`_PREDICTIONS`: how an output gives x0, what
a model is trained to output, and how its MSE compares with the x0 MSE (for loss weighting).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

from diffusion_jax import options
from diffusion_jax.diffusion.forward import check_same_shape, check_timesteps, extract
from diffusion_jax.schedules import Schedule

__all__ = [
    "mse_per_x0_mse",
    "predict_eps_from_x0",
    "predict_x0",
    "predict_x0_from_eps",
    "predict_x0_from_v",
    "training_target",
    "v_target",
]


def predict_x0_from_eps(
    schedule: Schedule, x_t: jax.Array, t: jax.Array, eps: jax.Array
) -> jax.Array:
    """x_0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t).

    Args:
      schedule: the diffusion's tables.
      x_t: ``[B, ...]`` noisy data.
      t: ``[B]`` int timesteps.
      eps: predicted noise, shape of ``x_t``.

    Returns:
      The implied x_0, shape of ``x_t``.
    """
    check_timesteps(x_t, t, "x_t")
    check_same_shape(x_t, eps, "x_t and eps")
    nd = jnp.ndim(x_t)
    return (
        extract(schedule.sqrt_recip_alphas_cumprod, t, nd) * x_t
        - extract(schedule.sqrt_recipm1_alphas_cumprod, t, nd) * eps
    )


def predict_eps_from_x0(
    schedule: Schedule, x_t: jax.Array, t: jax.Array, x0: jax.Array
) -> jax.Array:
    """eps = (x_t - sqrt(abar_t) x_0) / sqrt(1 - abar_t).

    Args:
      schedule: the diffusion's tables.
      x_t: ``[B, ...]`` noisy data.
      t: ``[B]`` int timesteps.
      x0: predicted clean data, shape of ``x_t``.

    Returns:
      The implied noise, shape of ``x_t``.
    """
    check_timesteps(x_t, t, "x_t")
    check_same_shape(x_t, x0, "x_t and x0")
    nd = jnp.ndim(x_t)
    # (x_t - sqrt(abar) x0) / sqrt(1 - abar): finite where abar = 0 (zero terminal SNR), where
    # the form with 1 / sqrt(abar) would give inf / inf.
    return (x_t - extract(schedule.sqrt_alphas_cumprod, t, nd) * x0) / extract(
        schedule.sqrt_one_minus_alphas_cumprod, t, nd
    )


def predict_x0_from_v(schedule: Schedule, x_t: jax.Array, t: jax.Array, v: jax.Array) -> jax.Array:
    """x_0 = sqrt(abar_t) x_t - sqrt(1 - abar_t) v (Salimans & Ho 2022).

    Args:
      schedule: the diffusion's tables.
      x_t: ``[B, ...]`` noisy data.
      t: ``[B]`` int timesteps.
      v: predicted velocity, shape of ``x_t``.

    Returns:
      The implied x_0, shape of ``x_t``.
    """
    check_timesteps(x_t, t, "x_t")
    check_same_shape(x_t, v, "x_t and v")
    nd = jnp.ndim(x_t)
    return (
        extract(schedule.sqrt_alphas_cumprod, t, nd) * x_t
        - extract(schedule.sqrt_one_minus_alphas_cumprod, t, nd) * v
    )


def v_target(schedule: Schedule, x0: jax.Array, t: jax.Array, noise: jax.Array) -> jax.Array:
    """The v-prediction target v = sqrt(abar_t) eps - sqrt(1 - abar_t) x_0.

    Args:
      schedule: the diffusion's tables.
      x0: ``[B, ...]`` clean data.
      t: ``[B]`` int timesteps.
      noise: the eps used to make x_t, shape of ``x0``.

    Returns:
      v, shape of ``x0``.
    """
    check_timesteps(x0, t, "x0")
    check_same_shape(x0, noise, "x0 and noise")
    nd = jnp.ndim(x0)
    return (
        extract(schedule.sqrt_alphas_cumprod, t, nd) * noise
        - extract(schedule.sqrt_one_minus_alphas_cumprod, t, nd) * x0
    )


class _Prediction(NamedTuple):
    """What one parameterisation means: how its output gives x0, what it is trained on, and how
    its MSE compares with the x0 MSE at a given SNR (for loss weighting)."""

    to_x0: Callable[[Schedule, jax.Array, jax.Array, jax.Array], jax.Array]
    target: Callable[[Schedule, jax.Array, jax.Array, jax.Array], jax.Array]
    mse_per_x0_mse: Callable[[jax.Array], jax.Array]


# The one table of the eps / x0 / v switch. eps = (x_t - sqrt(abar) x0) / sqrt(1 - abar), so
# its MSE is snr times the x0 MSE; v = sqrt(abar) eps - sqrt(1 - abar) x0 gives (snr + 1) times.
_PREDICTIONS: dict[str, _Prediction] = {
    "eps": _Prediction(
        to_x0=lambda schedule, out, x_t, t: predict_x0_from_eps(schedule, x_t, t, out),
        target=lambda schedule, x0, t, noise: noise,
        mse_per_x0_mse=lambda snr: snr,
    ),
    "x0": _Prediction(
        to_x0=lambda schedule, out, x_t, t: out,
        target=lambda schedule, x0, t, noise: x0,
        mse_per_x0_mse=jnp.ones_like,
    ),
    "v": _Prediction(
        to_x0=lambda schedule, out, x_t, t: predict_x0_from_v(schedule, x_t, t, out),
        target=lambda schedule, x0, t, noise: v_target(schedule, x0, t, noise),
        mse_per_x0_mse=lambda snr: snr + 1.0,
    ),
}
assert tuple(_PREDICTIONS) == options.PARAMETERIZATIONS


def predict_x0(
    schedule: Schedule,
    model_output: jax.Array,
    x_t: jax.Array,
    t: jax.Array,
    parameterization: options.Parameterization,
) -> jax.Array:
    """The x0 a model's (mean) output implies, for any parameterisation (unclipped).

    Args:
      schedule: the diffusion's tables.
      model_output: ``[B, ...]`` the prediction (the mean half of a learned-variance output).
      x_t: ``[B, ...]`` the noised input.
      t: ``[B]`` int timesteps.
      parameterization: one of :data:`~diffusion_jax.options.PARAMETERIZATIONS`.

    Returns:
      ``[B, ...]`` the predicted x0.
    """
    prediction = _PREDICTIONS[options.check("parameterization", parameterization)]
    return prediction.to_x0(schedule, model_output, x_t, t)


def training_target(
    schedule: Schedule,
    x0: jax.Array,
    t: jax.Array,
    noise: jax.Array,
    parameterization: options.Parameterization,
) -> jax.Array:
    """What a model of ``parameterization`` is trained to output for ``q_sample(x0, t, noise)``:
    ``noise``, ``x0`` or :func:`v_target`."""
    prediction = _PREDICTIONS[options.check("parameterization", parameterization)]
    return prediction.target(schedule, x0, t, noise)


def mse_per_x0_mse(snr: jax.Array, parameterization: options.Parameterization) -> jax.Array:
    """The factor by which the MSE of ``parameterization``'s output exceeds the x0 MSE at
    signal-to-noise ratio ``snr``: ``snr`` (eps), 1 (x0), ``snr + 1`` (v)."""
    return _PREDICTIONS[options.check("parameterization", parameterization)].mse_per_x0_mse(snr)
