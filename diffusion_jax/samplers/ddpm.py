"""Ancestral sampling (Ho et al. 2020), on the respaced chain when it skips steps.

With all T steps the update indexes the schedule itself; with fewer it samples the Markov chain
that visits only the chosen timesteps (:func:`~diffusion_jax.timesteps.respace`,
improved-diffusion), whose learned variance interpolates the respaced betas. Every
parameterisation and variance of the core applies.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax import diffusion
from diffusion_jax.samplers.base import Method, Step, always, per_example
from diffusion_jax.schedules import Schedule
from diffusion_jax.timesteps import respace

__all__ = ["METHOD", "plan", "update"]


def plan(schedule: Schedule, timesteps: np.ndarray) -> tuple[Schedule, dict[str, np.ndarray]]:
    """The chain to sample and, per step, its index ``t_step`` in that chain.

    Args:
      schedule: the concrete schedule, T steps.
      timesteps: int32 ``[n]`` visited timesteps, strictly decreasing.

    Returns:
      ``(step_schedule, {"t_step": [n] int})``: the schedule itself when ``n == T`` (bit for
      bit), else the respaced chain, whose index ``j`` is the ``j``-th smallest timestep.

    Example:
      >>> chain, tables = plan(get_schedule("linear", 1000), timesteps_for(1000, 50))
    """
    if timesteps.shape[0] == schedule.num_timesteps:
        return schedule, {"t_step": timesteps}
    return respace(schedule, timesteps), {"t_step": np.arange(timesteps.shape[0])[::-1]}


def update(step: Step, carry: Any) -> tuple[jax.Array, jax.Array, Any]:
    """One ancestral step: x_{t-1} = mean + exp(log_variance / 2) noise, noiseless at t = 0.

    :func:`~diffusion_jax.diffusion.p_sample`'s update, spelled out because the trajectory
    also wants the predicted x0.

    Args:
      step: the step; ``step.row["t_step"]`` indexes ``step.schedule``.
      carry: unused (no solver state).

    Returns:
      ``(x_next, pred_x0, carry)``, each array of ``step.x``'s shape.

    Example:
      >>> x_next, pred_x0, _ = update(step, None)
    """
    x = step.x
    t_step = per_example(step.row["t_step"], x)
    mean, _, log_variance, pred_x0 = diffusion.p_mean_variance(
        step.schedule,
        step.model_output,
        x,
        t_step,
        parameterization=step.parameterization,
        variance=step.variance,
        clip_x0=step.clip_x0,
    )
    nonzero = (t_step != 0).astype(x.dtype).reshape((-1,) + (1,) * (x.ndim - 1))
    return mean + nonzero * jnp.exp(0.5 * log_variance) * step.noise, pred_x0, carry


METHOD = Method("ddpm", plan=plan, update=update, stochastic=always)
