"""The training objectives: the simple loss (eps / x0 / v MSE, optionally min-SNR weighted), the
hybrid loss and the bound alone, with timesteps and noise drawn from a key or given."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from diffusion_jax import diffusion, options
from diffusion_jax.losses.bound import vb_terms_bpd
from diffusion_jax.losses.likelihoods import mean_flat
from diffusion_jax.schedules import Schedule, check_parameterization

__all__ = ["HYBRID_LAMBDA", "LOSS_TYPES", "min_snr_weight", "training_loss"]

LOSS_TYPES = options.LOSS_TYPES
ModelFn = Callable[..., jax.Array]
# improved-diffusion's hybrid weight: L_simple + lambda * L_vlb with lambda = 1e-3, where L_vlb
# is T times the per-step term, i.e. vb * T / 1000.
HYBRID_LAMBDA = 1e-3


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
