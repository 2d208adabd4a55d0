"""What a sampling method is: a host-side plan and a per-step update rule (:class:`Method`).

A method plugs into the one compiled loop of :mod:`diffusion_jax.samplers.loop`: its
:attr:`Method.plan` turns the visited timesteps into float64 NumPy tables (one row per step),
and its :attr:`Method.update` maps one step's :class:`Step` and the solver's carry to the next
x. The loop owns everything else: the model call (with guidance), the noise, the trajectory.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax import diffusion, options
from diffusion_jax.diffusion import ClipX0
from diffusion_jax.schedules import Schedule

__all__ = ["Method", "Plan", "Step", "always", "never", "no_carry", "per_example", "predicted_x0"]

# plan(schedule, timesteps) -> (the schedule the update indexes, {name: [num_steps] table}).
Plan = Callable[[Schedule, np.ndarray], tuple[Schedule, dict[str, np.ndarray]]]


class Step(NamedTuple):
    """Everything an update rule sees at one step of the loop."""

    schedule: Schedule  # the plan's schedule (the original one, or a respaced chain)
    row: dict[str, jax.Array]  # this step's entry of each of the plan's tables (scalars)
    x: jax.Array  # [B, ...] x_t entering the step
    t: jax.Array  # [B] int32 the original timestep the model saw
    model_output: jax.Array  # [B, ...] (or [B, ..., 2C] for learned_range), already guided
    noise: jax.Array  # [B, ...] standard normal; zeros unless the method is stochastic
    eta: jax.Array  # float32 scalar, DDIM's stochasticity (0 for other methods)
    parameterization: options.Parameterization  # what the model predicts: eps, x0 or v
    variance: options.Variance  # fixed_small, fixed_large or learned_range
    clip_x0: ClipX0  # see diffusion.clip_pred_x0


def no_carry(x_T: jax.Array) -> None:
    """The carry of a method without solver state."""
    del x_T


def never(eta: float) -> bool:
    """``stochastic`` of a deterministic method."""
    del eta
    return False


def always(eta: float) -> bool:
    """``stochastic`` of a method that draws noise at every update."""
    del eta
    return True


class Method(NamedTuple):
    """A sampling method, as the registry holds it (see :mod:`diffusion_jax.samplers.registry`).

    Attributes:
      name: the ``method=`` string, one of :data:`diffusion_jax.options.SAMPLER_METHODS`.
      plan: ``plan(schedule, timesteps) -> (step_schedule, tables)`` on the host, in float64
        NumPy; ``timesteps`` is int32 ``[n]`` in visiting order and each table has ``n`` rows
        (integer tables reach the loop as int32, the others as float32).
      update: ``update(step, carry) -> (x_next, pred_x0, carry)``, traced inside the loop;
        ``pred_x0`` is the (clipped) x0 recorded in a trajectory. No Python branching on
        traced values: the plan's tables encode per-step choices.
      init_carry: ``init_carry(x_T) -> carry``, the solver state (fixed shapes, derived from
        ``x_T`` so the loop runs inside ``shard_map``); :func:`no_carry` for none.
      stochastic: ``stochastic(eta) -> bool``, whether the updates draw noise.
      takes_eta: whether ``eta`` applies to this method (others reject ``eta != 0``).
      prepare: ``None`` for a method on :func:`~diffusion_jax.timesteps.timesteps_for`'s
        timesteps; else ``prepare(schedule, num_steps, edm) -> (timesteps, step_schedule,
        tables, x_T_scale)`` plans a method that picks its own timesteps (EDM's sigma grid,
        :mod:`.edm`, whose settings ``edm`` are): int32 model timesteps, one per loop
        iteration, the tables (a row each), and the factor applied to the standard normal
        x_T. Its ``plan`` is then unused, ``timestep_spacing`` and ``eta`` do not apply, and
        it draws noise iff ``edm.S_churn > 0``.
      entry_points: for a method with ``prepare``, ``entry_points(tables) -> int array`` the
        iterations a run joined midway (SDEdit's ``t_start``) may start at, e.g. not at Heun's
        corrector, which needs its predictor's state; ``None`` means any. A method planned by
        ``plan`` is re-planned over the remaining timesteps instead.

    Example:
      >>> jump = Method("x0_jump", plan=lambda s, t: (s, {}),
      ...               update=lambda step, carry: (predicted_x0(step),) * 2 + (carry,))
    """

    name: str
    plan: Plan
    update: Callable[[Step, Any], tuple[jax.Array, jax.Array, Any]]
    init_carry: Callable[[jax.Array], Any] = no_carry
    stochastic: Callable[[float], bool] = never
    takes_eta: bool = False
    prepare: Callable[..., tuple[np.ndarray, Schedule, dict[str, np.ndarray], float]] | None = None
    entry_points: Callable[[dict[str, np.ndarray]], np.ndarray] | None = None


def per_example(value: jax.Array, x: jax.Array) -> jax.Array:
    """A scalar table entry as the int32 ``[B]`` timesteps the core's functions take."""
    return jnp.full((x.shape[0],), value, jnp.int32)


def predicted_x0(step: Step) -> jax.Array:
    """The (clipped) x0 the step's model output implies, for any parameterisation.

    Args:
      step: the step; only the mean half of a learned-variance output is used.

    Returns:
      ``[B, ...]`` the prediction, clipped by ``step.clip_x0``.

    Example:
      >>> x0 = predicted_x0(step)  # inside an update rule
    """
    mean_out, _ = diffusion.split_model_output(step.model_output, step.x, step.variance)
    x0 = diffusion.predict_x0(step.schedule, mean_out, step.x, step.t, step.parameterization)
    return diffusion.clip_pred_x0(x0, step.clip_x0)
