"""The learned reverse Gaussian p(x_{t-1} | x_t): its mean and variance, ancestral and DDIM
steps, and the clipping of the predicted x0.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from diffusion_jax import options
from diffusion_jax.diffusion.forward import (
    check_float,
    check_same_shape,
    check_timesteps,
    extract,
    q_posterior_mean_variance,
)
from diffusion_jax.diffusion.parameterization import predict_eps_from_x0, predict_x0
from diffusion_jax.schedules import Schedule

__all__ = [
    "VARIANCES",
    "ClipX0",
    "clip_pred_x0",
    "ddim_step",
    "dynamic_threshold",
    "p_mean_variance",
    "p_sample",
    "split_model_output",
]

VARIANCES = options.VARIANCES

# clip_x0 accepts: False (off), True ([-1, 1]), a (low, high) range, or a callable x0 -> x0.
ClipX0 = bool | tuple[float, float] | Callable[[jax.Array], jax.Array]


def dynamic_threshold(percentile: float = 0.995, max_value: float = 1.0) -> Callable:
    """Imagen's dynamic thresholding (Saharia et al. 2022), for ``clip_x0=``.

    Each example's x_0 is clipped to [-s, s] and divided by s, where s is the ``percentile``
    quantile of |x_0| over the example, but at least ``max_value``.

    Args:
      percentile: quantile in (0, 1].
      max_value: the smallest threshold; 1 leaves in-range predictions untouched.

    Returns:
      A function ``[B, ...] -> [B, ...]``.
    """
    if not 0.0 < percentile <= 1.0:
        raise ValueError(f"percentile must be in (0, 1], got {percentile=}.")

    def threshold(x0: jax.Array) -> jax.Array:
        flat = jnp.abs(x0.reshape(x0.shape[0], -1))
        s = jnp.maximum(jnp.quantile(flat, percentile, axis=1), max_value)
        s = s.reshape((-1,) + (1,) * (x0.ndim - 1))
        return jnp.clip(x0, -s, s) / s * max_value

    return threshold


def clip_pred_x0(x0: jax.Array, clip_x0: ClipX0) -> jax.Array:
    """Applies a ``clip_x0`` option to a predicted x_0.

    Args:
      x0: ``[B, ...]`` predicted clean data.
      clip_x0: ``False`` (no clipping), ``True`` (clip to [-1, 1]), a ``(low, high)`` range, or a
        function of x_0 such as :func:`dynamic_threshold`.

    Returns:
      The clipped prediction.
    """
    if clip_x0 is False or clip_x0 is None:
        return x0
    if clip_x0 is True:
        return jnp.clip(x0, -1.0, 1.0)
    if callable(clip_x0):
        return clip_x0(x0)
    if isinstance(clip_x0, tuple | list) and len(clip_x0) == 2:
        low, high = clip_x0
        if not low < high:
            raise ValueError(f"clip_x0 range must have low < high, got {tuple(clip_x0)}.")
        return jnp.clip(x0, low, high)
    raise ValueError(
        f"clip_x0 must be False, True, a (low, high) range or a callable, got {clip_x0!r}."
    )


def split_model_output(
    model_output: jax.Array, x_t: jax.Array, variance: options.Variance
) -> tuple[jax.Array, jax.Array | None]:
    """Splits a model output into its mean part and (for ``learned_range``) its variance part.

    Args:
      model_output: ``[B, ..., C]`` (or ``[B, ..., 2C]`` with ``variance="learned_range"``).
      x_t: ``[B, ..., C]`` the model's input.
      variance: one of :data:`VARIANCES`.

    Returns:
      ``(mean_output, variance_output)``; ``variance_output`` is ``None`` unless learned.
    """
    options.check("variance", variance)
    x_shape, out_shape = jnp.shape(x_t), jnp.shape(model_output)
    if variance == "learned_range":
        want = x_shape[:-1] + (2 * x_shape[-1],)
        if out_shape != want:
            raise ValueError(
                f"variance='learned_range' needs a model output with twice the channels of x_t "
                f"on the last axis: expected {want}, got {out_shape}."
            )
        mean_out, var_out = jnp.split(model_output, 2, axis=-1)
        return mean_out, var_out
    if out_shape != x_shape:
        raise ValueError(
            f"variance={variance!r} needs a model output of x_t's shape {x_shape}, got "
            f"{out_shape}. (A 2C-channel output needs variance='learned_range'.)"
        )
    return model_output, None


def p_mean_variance(
    schedule: Schedule,
    model_output: jax.Array,
    x_t: jax.Array,
    t: jax.Array,
    *,
    parameterization: options.Parameterization = "eps",
    variance: options.Variance = "fixed_small",
    clip_x0: ClipX0 = True,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """The learned reverse Gaussian p(x_{t-1} | x_t) = N(mean, variance).

    The mean is the posterior mean q(x_{t-1} | x_t, x_0 = pred_x0) of the (clipped) prediction.

    Args:
      schedule: the diffusion's tables.
      model_output: the network's output for ``(x_t, t)``: ``x_t``'s shape, or twice its
        channels on the last axis for ``variance="learned_range"``.
      x_t: ``[B, ..., C]`` noisy data.
      t: ``[B]`` int timesteps.
      parameterization: what the network predicts: ``eps``, ``x0`` or ``v``.
      variance: ``fixed_small`` (the posterior variance), ``fixed_large`` (beta_t, with
        posterior_variance[1] at t = 0) or ``learned_range`` (Nichol & Dhariwal 2021: the
        second half of the output, v in [-1, 1], interpolates the log-variance between
        log(beta_t) and the clipped posterior log-variance).
      clip_x0: see :func:`clip_pred_x0`.

    Returns:
      ``(mean, variance, log_variance, pred_x0)``, each of ``x_t``'s shape.
    """
    check_timesteps(x_t, t, "x_t", schedule.num_timesteps)
    check_float(x_t, "x_t")
    out, var_out = split_model_output(model_output, x_t, variance)
    nd = jnp.ndim(x_t)
    if variance == "fixed_small":
        log_variance = extract(schedule.posterior_log_variance_clipped, t, nd)
        # The log is clipped at t = 0 but the variance itself is exactly 0 there.
        var = extract(schedule.posterior_variance, t, nd)
    elif variance == "fixed_large":
        log_variance = extract(schedule.fixed_large_log_variance, t, nd)
        var = extract(schedule.fixed_large_variance, t, nd)
    else:
        min_log = extract(schedule.posterior_log_variance_clipped, t, nd)
        max_log = jnp.log(extract(schedule.betas, t, nd))
        frac = (var_out.astype(jnp.float32) + 1.0) / 2.0
        log_variance = frac * max_log + (1.0 - frac) * min_log
        var = jnp.exp(log_variance)
    log_variance = jnp.broadcast_to(log_variance, x_t.shape)
    var = jnp.broadcast_to(var, x_t.shape)
    pred_x0 = clip_pred_x0(predict_x0(schedule, out, x_t, t, parameterization), clip_x0)
    mean, _, _ = q_posterior_mean_variance(schedule, pred_x0, x_t, t)
    return mean, var, log_variance, pred_x0


def p_sample(
    schedule: Schedule,
    model_output: jax.Array,
    x_t: jax.Array,
    t: jax.Array,
    noise: jax.Array,
    *,
    parameterization: options.Parameterization = "eps",
    variance: options.Variance = "fixed_small",
    clip_x0: ClipX0 = True,
) -> jax.Array:
    """One ancestral step: x_{t-1} = mean + exp(log_variance / 2) * noise, noiseless at t = 0.

    Args:
      schedule: the diffusion's tables.
      model_output: the network's output for ``(x_t, t)``.
      x_t: ``[B, ...]`` noisy data.
      t: ``[B]`` int timesteps.
      noise: standard normal noise of ``x_t``'s shape.
      parameterization: see :func:`p_mean_variance`.
      variance: see :func:`p_mean_variance`.
      clip_x0: see :func:`p_mean_variance`.

    Returns:
      x_{t-1}, shape of ``x_t``.
    """
    check_same_shape(x_t, noise, "x_t and noise")
    mean, _, log_variance, _ = p_mean_variance(
        schedule,
        model_output,
        x_t,
        t,
        parameterization=parameterization,
        variance=variance,
        clip_x0=clip_x0,
    )
    nonzero = (t != 0).astype(x_t.dtype).reshape((-1,) + (1,) * (x_t.ndim - 1))
    return mean + nonzero * jnp.exp(0.5 * log_variance) * noise


def ddim_step(
    schedule: Schedule,
    model_output: jax.Array,
    x_t: jax.Array,
    t: jax.Array,
    t_prev: jax.Array,
    noise: jax.Array,
    *,
    eta: float | jax.Array = 0.0,
    parameterization: options.Parameterization = "eps",
    variance: options.Variance = "fixed_small",
    clip_x0: ClipX0 = True,
) -> jax.Array:
    """One DDIM step from ``t`` to ``t_prev`` (Song et al. 2021, eq. 12).

    eps is re-derived from the (clipped) predicted x_0, so that with ``t_prev = t - 1`` and
    ``eta = 1`` the step equals :func:`p_sample` with ``fixed_small`` given the same noise.

    Args:
      schedule: the diffusion's tables.
      model_output: the network's output for ``(x_t, t)``; with ``variance="learned_range"``
        it has 2C channels and only the first C are used.
      x_t: ``[B, ...]`` noisy data.
      t: ``[B]`` int timesteps.
      t_prev: ``[B]`` int target timesteps, ``< t``; ``-1`` means "to x_0" (abar = 1).
      noise: standard normal noise of ``x_t``'s shape (scaled by sigma, which is 0 for eta = 0).
      eta: 0 is deterministic DDIM, 1 is DDPM-like stochasticity.
      parameterization: see :func:`p_mean_variance`.
      variance: only used to split a learned-variance output.
      clip_x0: see :func:`clip_pred_x0`.

    Returns:
      x_{t_prev}, shape of ``x_t``.
    """
    check_timesteps(x_t, t, "x_t", schedule.num_timesteps)
    check_timesteps(x_t, t_prev, "x_t", schedule.num_timesteps, lowest=-1, name="t_prev")
    check_float(x_t, "x_t")
    check_same_shape(x_t, noise, "x_t and noise")
    out, _ = split_model_output(model_output, x_t, variance)
    nd = jnp.ndim(x_t)
    pred_x0 = clip_pred_x0(predict_x0(schedule, out, x_t, t, parameterization), clip_x0)
    eps = predict_eps_from_x0(schedule, x_t, t, pred_x0)
    # 1 - abar comes from the float64-built tables, never from a float32 subtraction, which
    # loses up to 5e-4 relative at small t where abar is close to 1.
    abar_t = extract(schedule.alphas_cumprod, t, nd)
    one_minus_abar_t = extract(schedule.sqrt_one_minus_alphas_cumprod, t, nd) ** 2
    # t_prev = -1 must not index the table: -1 would wrap to T-1 under jit.
    has_prev = (t_prev >= 0).reshape(abar_t.shape)
    safe_prev = jnp.maximum(t_prev, 0)
    abar_prev = jnp.where(has_prev, extract(schedule.alphas_cumprod, safe_prev, nd), 1.0)
    one_minus_abar_prev = jnp.where(
        has_prev, extract(schedule.sqrt_one_minus_alphas_cumprod, safe_prev, nd) ** 2, 0.0
    )
    # abar_prev - abar_t, taken from whichever pair is small (and so precise).
    abar_drop = jnp.where(abar_t > 0.5, one_minus_abar_t - one_minus_abar_prev, abar_prev - abar_t)
    sigma_sq = (eta**2) * (one_minus_abar_prev / one_minus_abar_t) * (abar_drop / abar_prev)
    direction = jnp.sqrt(jnp.maximum(one_minus_abar_prev - sigma_sq, 0.0)) * eps
    return jnp.sqrt(abar_prev) * pred_x0 + direction + jnp.sqrt(sigma_sq) * noise
