"""DDIM (Song et al. 2021, eq. 12) with any ``eta`` in [0, 1].

``eta = 0`` is deterministic; ``eta = 1`` with all T steps is ancestral sampling with
``fixed_small`` (the same noise gives the same samples). The last step lands on x0.

``eta`` is a traced value of the loop, so ``jax.grad`` of a sample with respect to eta works for
eta in (0, 1]; at eta = 0 the noise scale sigma = eta * c has a kink (|eta| once squared and
rooted) and the derivative is nan.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax import diffusion
from diffusion_jax.samplers.base import Method, Step, per_example, predicted_x0
from diffusion_jax.schedules import Schedule

__all__ = ["METHOD", "plan", "stochastic", "update"]


def plan(schedule: Schedule, timesteps: np.ndarray) -> tuple[Schedule, dict[str, np.ndarray]]:
    """Each step's target timestep ``t_prev``: the next visited one, ``-1`` (x0) at the end.

    Args:
      schedule: the concrete schedule.
      timesteps: int32 ``[n]`` visited timesteps, strictly decreasing.

    Returns:
      ``(schedule, {"t_prev": [n] int32})``.

    Example:
      >>> _, tables = plan(schedule, np.array([99, 66, 33, 0]))  # t_prev: [66, 33, 0, -1]
    """
    return schedule, {"t_prev": np.append(timesteps[1:], -1).astype(np.int32)}


def update(step: Step, carry: Any) -> tuple[jax.Array, jax.Array, Any]:
    """One DDIM step from ``step.t`` to ``step.row["t_prev"]`` (see
    :func:`~diffusion_jax.diffusion.ddim_step`).

    Args:
      step: the step; its noise is scaled by DDIM's sigma (0 for ``eta = 0``).
      carry: unused (no solver state).

    Returns:
      ``(x_next, pred_x0, carry)``, each array of ``step.x``'s shape.

    Example:
      >>> x_next, pred_x0, _ = update(step, None)
    """
    # The last step lands on x0, where sigma is 0 whatever eta is: eta is zeroed there, so
    # the derivative in eta does not meet sqrt'(0) * 0 = nan (the select drops its cotangent).
    eta = jnp.where(step.row["t_prev"] >= 0, step.eta, 0.0)
    x_next = diffusion.ddim_step(
        step.schedule,
        step.model_output,
        step.x,
        step.t,
        per_example(step.row["t_prev"], step.x),
        step.noise,
        eta=eta,
        parameterization=step.parameterization,
        variance=step.variance,
        clip_x0=step.clip_x0,
    )
    return x_next, predicted_x0(step), carry


def stochastic(eta: float) -> bool:
    """DDIM draws noise only for ``eta > 0``."""
    return eta > 0.0


METHOD = Method("ddim", plan=plan, update=update, stochastic=stochastic, takes_eta=True)
