"""DDIM inversion: the deterministic DDIM ODE run from data x0 up to x_T (Song et al. 2021,
sec. 4.3; Dhariwal & Nichol 2021, appendix F).

DDIM with eta = 0 is Euler's method on the probability-flow ODE in ``x / sqrt(abar)`` against
``sigma = sqrt((1 - abar) / abar)``: ``x_s / a_s = x_t / a_t + (sigma_s - sigma_t) eps(x_t, t)``
with ``a = sqrt(abar)``. Inversion runs the same steps upwards over the same visited timesteps
``s_0 < s_1 < ... < s_{n-1}`` (those of :func:`~diffusion_jax.timesteps.timesteps_for`, reversed),
each step using the eps the model implies where it starts:

    x0 -> x_{s_0}:          eps from the model at (x0, s_0), x0 standing in for x_{s_0}
    x_{s_k} -> x_{s_{k+1}}: eps from the model at (x_{s_k}, s_k)

i.e. ``x_next = a_to (x - sigma_from eps) / a_from + sqrt(1 - abar_to) eps`` with
``(a, sigma) = (1, 0)`` at x0: n model evaluations for n steps, like the sampler. Reconstructing
with ``sample(method="ddim", eta=0, clip_x0=False, x_T=x_T)`` over the same grid evaluates the
model at the other end of each step, so the round trip is exact in the ODE limit and its error
falls at first order in the step (tests/test_sampler_inversion.py; digits numbers in
benchmarks/README.md). x0 is not clipped: clipping would make the steps non-invertible.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax import diffusion, options
from diffusion_jax.samplers import loop
from diffusion_jax.samplers.base import Method, Step
from diffusion_jax.samplers.loop import Trajectory
from diffusion_jax.samplers.validation import make_options
from diffusion_jax.schedules import Schedule
from diffusion_jax.timesteps import host_betas, timesteps_for

__all__ = ["METHOD", "invert", "plan", "update"]


def plan(schedule: Schedule, timesteps: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """The model timesteps and the coefficients of each inversion step.

    Args:
      schedule: the concrete schedule.
      timesteps: int ``[n]`` the sampler's visited timesteps, strictly decreasing (the
        inversion visits them in increasing order).

    Returns:
      ``(model_timesteps, tables)``: int32 ``[n]`` the timestep the model sees at each step
      (``s_0, s_0, s_1, ..., s_{n-2}``), and float64 ``[n]`` tables ``signal_from``,
      ``sigma_from`` (``sqrt(abar)`` and ``sqrt(1 - abar)`` where the step starts: 1 and 0 at
      x0), ``signal_to`` and ``sigma_to`` (where it ends).

    Example:
      >>> model_timesteps, tables = plan(schedule, np.array([99, 66, 33, 0]))
      >>> model_timesteps  # [0, 0, 33, 66]; the steps end at 0, 33, 66, 99
    """
    ascending = np.asarray(timesteps, np.int64)[::-1]
    alphas_cumprod = np.append(np.cumprod(1.0 - host_betas(schedule)), 1.0)  # index -1: x0
    start = np.append(-1, ascending[:-1])
    model_timesteps = np.append(ascending[0], ascending[:-1]).astype(np.int32)
    return model_timesteps, {
        "signal_from": np.sqrt(alphas_cumprod[start]),
        "sigma_from": np.sqrt(1.0 - alphas_cumprod[start]),
        "signal_to": np.sqrt(alphas_cumprod[ascending]),
        "sigma_to": np.sqrt(1.0 - alphas_cumprod[ascending]),
    }


def _implied_eps_and_x0(step: Step) -> tuple[jax.Array, jax.Array]:
    """The eps and x0 the model output implies at ``(step.x, step.t)`` (unclipped)."""
    mean_out, _ = diffusion.split_model_output(step.model_output, step.x, step.variance)
    x0 = diffusion.predict_x0(step.schedule, mean_out, step.x, step.t, step.parameterization)
    if step.parameterization == "eps":
        return mean_out, x0
    return diffusion.predict_eps_from_x0(step.schedule, step.x, step.t, x0), x0


def update(step: Step, carry: Any) -> tuple[jax.Array, jax.Array, Any]:
    """One inversion step, from ``row["*_from"]`` up to ``row["*_to"]``.

    Args:
      step: the step; ``step.row`` holds the four coefficients of :func:`plan`.
      carry: unused (no solver state).

    Returns:
      ``(x_next, pred_x0, carry)``: the noisier x, and the model's (unclipped) x0.

    Example:
      >>> x_next, pred_x0, _ = update(step, None)
    """
    row = step.row
    eps, pred_x0 = _implied_eps_and_x0(step)
    x0_from = (step.x - row["sigma_from"] * eps) / row["signal_from"]
    return row["signal_to"] * x0_from + row["sigma_to"] * eps, pred_x0, carry


def _unused_plan(schedule, timesteps):
    raise ValueError("DDIM inversion is run by samplers.invert, not samplers.sample.")


# Not registered: sample() runs the reverse process, invert() this one.
METHOD = Method("ddim_inversion", plan=_unused_plan, update=update)


def invert(
    model_fn: Callable[..., jax.Array],
    params: Any,
    schedule: Schedule,
    x0: jax.Array,
    *,
    num_steps: int | None = None,
    timestep_spacing: options.Spacing = "linspace",
    parameterization: options.Parameterization = "eps",
    variance: options.Variance = "fixed_small",
    model_kwargs: dict[str, Any] | None = None,
    guidance_scale: float | jax.Array | None = None,
    uncond_kwargs: dict[str, Any] | None = None,
    t_stop: int | None = None,
    return_trajectory: bool = False,
    trajectory_every: int | None = None,
) -> jax.Array | Trajectory:
    """Runs the deterministic DDIM ODE from data ``x0`` up to x_T, in one compiled scan.

    ``sample(..., method="ddim", eta=0.0, clip_x0=False, x_T=x_T)`` with the same
    ``num_steps``, ``timestep_spacing``, model and guidance returns ``x0`` up to an error that
    falls with the number of steps (see the module docstring). The result is x at the grid's
    largest timestep (T - 1 for ``linspace`` and ``trailing``), which heun/euler also start at.
    Where abar there is tiny (cosine at T - 1: 1 / sqrt(abar) = 2e4 at T = 1000), the
    reconstruction's first step multiplies an eps model's error by 1 / sqrt(abar) and the round
    trip diverges (``sample`` warns): use ``leading`` spacing or a v model there.

    Args:
      model_fn: ``model_fn(params, x_t, t, **model_kwargs) -> output`` (static: hashable).
      params: the model's parameters.
      schedule: the diffusion's tables (concrete).
      x0: ``[B, ...]`` float data, in the model's data scale.
      num_steps: model evaluations, in [1, T]; ``None`` means T.
      timestep_spacing: one of :data:`~diffusion_jax.timesteps.SPACINGS`, as for ``sample``.
      parameterization: what the model predicts: ``eps``, ``x0`` or ``v``.
      variance: the model's variance option (only the mean half of ``learned_range`` is used).
      model_kwargs, guidance_scale, uncond_kwargs: as ``sample`` takes them; with
        classifier-free guidance the inverted ODE is the guided one.
      t_stop: stop at the last visited timestep below ``t_stop`` (an int in [1, T]; ``None``
        is T) and return x there; ``sample(x_T=..., t_start=t_stop)`` continues from it.
      return_trajectory, trajectory_every: as for ``sample``; ``xs[0]`` is ``x0``.

    Returns:
      float32 ``[B, ...]`` x_T, or a :class:`~diffusion_jax.samplers.Trajectory`.

    Raises:
      ValueError: ``x0`` not a float array ``[B, ...]``; ``t_stop`` not an int in [1, T]
        or below the grid's smallest timestep; and the errors of ``sample`` for the shared
        arguments.

    Example:
      >>> x_T = invert(model_fn, params, schedule, images, num_steps=50)
      >>> again = sample(model_fn, params, schedule, key, images.shape, method="ddim",
      ...                num_steps=50, clip_x0=False, x_T=x_T)
    """
    shape = jnp.shape(x0)
    if len(shape) < 2 or not jnp.issubdtype(jnp.result_type(x0), jnp.floating):
        raise ValueError(
            f"x0 must be a float array [B, ...], got shape {shape}, dtype {jnp.result_type(x0)}."
        )
    # The shared checks are sample's for deterministic DDIM (clipping is off by construction:
    # clip_x0=True here only keeps the first-step warning, which is about sampling, quiet).
    sampler_options = make_options(
        model_fn,
        schedule,
        shape,
        method="ddim",
        num_steps=num_steps,
        timestep_spacing=timestep_spacing,
        eta=0.0,
        parameterization=parameterization,
        variance=variance,
        clip_x0=True,
        model_kwargs=model_kwargs,
        guidance_scale=guidance_scale,
        uncond_kwargs=uncond_kwargs,
        return_trajectory=return_trajectory,
        trajectory_every=trajectory_every,
        first_index=0,
    )
    sampler_options = dataclasses.replace(sampler_options, method=METHOD, clip_x0=False)
    timesteps = timesteps_for(schedule.num_timesteps, sampler_options.num_steps, timestep_spacing)
    if t_stop is not None:
        if isinstance(t_stop, bool) or not isinstance(t_stop, int | np.integer):
            raise ValueError(f"t_stop must be an int, got {t_stop!r}.")
        if not timesteps[-1] < t_stop <= schedule.num_timesteps:
            raise ValueError(
                f"t_stop must be in [{timesteps[-1] + 1}, T={schedule.num_timesteps}] (above the "
                f"grid's smallest timestep {timesteps[-1]}), got {t_stop=}."
            )
        timesteps = timesteps[timesteps < t_stop]
    model_timesteps, tables = plan(schedule, timesteps)
    x, xs, pred_x0s = loop.run(
        model_fn,
        params,
        jax.random.key(0),  # unused: the loop draws no noise
        schedule,
        model_timesteps,
        tables,
        sampler_options,
        model_kwargs=model_kwargs,
        uncond_kwargs=uncond_kwargs,
        guidance_scale=guidance_scale,
        eta=0.0,
        first_index=0,
        x_T=x0,
    )
    every = sampler_options.trajectory_every
    if every is None:
        return x
    return Trajectory(x, xs, pred_x0s, jnp.asarray(model_timesteps[::every]))
