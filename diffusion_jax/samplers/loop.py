"""The reverse process as one compiled ``lax.scan``, whatever the method.

Per step the loop calls the model (:mod:`~diffusion_jax.samplers.guidance`), draws the step's
noise if the method is stochastic (:func:`~diffusion_jax.samplers.noise.step_noise`), applies
the method's update and records the trajectory; the hooks of :mod:`.steering`, when given, see
and change the model output before the update and the state after it. The method's plan
arrives as scanned tables, so the loop compiles once per (method, shape, number of steps,
static options) and never branches on a traced value.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax import _runtime
from diffusion_jax.samplers import guidance
from diffusion_jax.samplers.base import Step, per_example
from diffusion_jax.samplers.noise import initial_noise, step_noise
from diffusion_jax.samplers.steering import HOOK_NOISE_STREAM, StepInfo
from diffusion_jax.samplers.validation import SamplerOptions
from diffusion_jax.schedules import Schedule

__all__ = ["Trajectory", "device_tables", "run"]


class Trajectory(NamedTuple):
    """The samples and snapshots of every ``trajectory_every``-th step (K of them)."""

    samples: jax.Array  # [B, ...] the final samples
    xs: jax.Array  # [K, B, ...] x_t entering each recorded step; xs[0] is x_T
    pred_x0s: jax.Array  # [K, B, ...] the (clipped) x0 predicted at each recorded step
    timesteps: jax.Array  # [K] int32 original timesteps of the recorded steps


def run(
    model_fn: Callable[..., jax.Array],
    params: Any,
    key: jax.Array,
    step_schedule: Schedule,
    timesteps: np.ndarray,
    tables: dict[str, np.ndarray],
    sampler_options: SamplerOptions,
    *,
    model_kwargs: dict[str, Any] | None,
    uncond_kwargs: dict[str, Any] | None,
    guidance_scale: float | jax.Array | None,
    eta: float | jax.Array,
    first_index: int | jax.Array,
    x_T_scale: float = 1.0,
    x_T: jax.Array | None = None,
    first_step: int = 0,
    schedule: Schedule | None = None,
    hook_kwargs: dict[str, Any] | None = None,
) -> tuple[jax.Array, jax.Array | None, jax.Array | None]:
    """Draws x_T (unless given) and runs the compiled loop over a method's plan.

    Args:
      model_fn: ``model_fn(params, x_t, t, **model_kwargs) -> output`` (static: hashable).
      params: the model's parameters.
      key: the PRNG key of the run (see :func:`~diffusion_jax.samplers.noise.step_noise`).
      step_schedule: the schedule the method's update indexes (from its plan).
      timesteps: int32 ``[num_steps]``, the original timesteps the model sees, in order.
      tables: the plan's host tables, ``num_steps`` rows each (see :func:`device_tables`).
      sampler_options: the static options.
      model_kwargs, uncond_kwargs, guidance_scale, eta, first_index: as ``sample`` takes them,
        checked by :func:`~diffusion_jax.samplers.validation.make_options`
        (``uncond_kwargs=None``: no guidance).
      x_T_scale: the factor on the standard normal x_T (a method's ``prepare``; EDM's runs
        start at ``sigma_max`` noise).
      x_T: ``[B, ...]`` the given start (the x entering the first step), or None to draw it.
      first_step: the index of the plan's first row in the full run's grid: step ``k`` of the
        plan draws the noise of step ``first_step + k + 1`` (a run joined midway, SDEdit).
      schedule: the original schedule, for the hooks' :class:`~.steering.StepInfo` (None:
        ``step_schedule``).
      hook_kwargs: the arrays passed to the hooks of ``sampler_options``.

    Returns:
      ``(samples, xs, pred_x0s)``; the snapshots are None without a trajectory.

    Example:
      >>> x, _, _ = run(model_fn, params, key, schedule, steps, tables, make_options(...),
      ...               model_kwargs=None, uncond_kwargs=None, guidance_scale=None, eta=0.0,
      ...               first_index=0)
    """
    first_index = jnp.asarray(first_index, jnp.int32)
    if x_T is None:
        x_T = initial_noise(key, first_index, sampler_options.shape)
        if x_T_scale != 1.0:
            x_T = x_T * jnp.float32(x_T_scale)
    else:
        x_T = jnp.asarray(x_T, jnp.float32)
    timesteps = np.asarray(timesteps, np.int32)
    steps = (
        np.arange(len(timesteps), dtype=np.int32),
        np.arange(first_step, first_step + len(timesteps), dtype=np.int32),
        timesteps,
        np.append(timesteps[1:], -1).astype(np.int32),  # where x_next is; -1: x0
    )
    return _scan(
        params,
        x_T,
        key,
        first_index,
        step_schedule,
        step_schedule if schedule is None else schedule,
        steps,
        device_tables(tables),
        {} if model_kwargs is None else dict(model_kwargs),
        None if uncond_kwargs is None else dict(uncond_kwargs),
        jnp.asarray(1.0 if guidance_scale is None else guidance_scale, jnp.float32),
        jnp.asarray(eta, jnp.float32),
        {} if hook_kwargs is None else dict(hook_kwargs),
        model_fn=model_fn,
        sampler_options=sampler_options,
    )


def device_tables(tables: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A plan's host tables as the loop scans them: integer ones int32, the others float32."""
    return {
        name: np.asarray(table, np.int32 if np.issubdtype(table.dtype, np.integer) else np.float32)
        for name, table in tables.items()
    }


@_runtime.jit(static_argnames=("model_fn", "sampler_options"))
def _scan(
    params: Any,
    x_T: jax.Array,
    key: jax.Array,
    first_index: jax.Array,
    step_schedule: Schedule,
    schedule: Schedule,
    steps: tuple[jax.Array, jax.Array, jax.Array, jax.Array],
    tables: dict[str, jax.Array],
    model_kwargs: dict[str, Any],
    uncond_kwargs: dict[str, Any] | None,
    guidance_scale: jax.Array,
    eta: jax.Array,
    hook_kwargs: dict[str, Any],
    *,
    model_fn: Callable[..., jax.Array],
    sampler_options: SamplerOptions,
) -> tuple[jax.Array, jax.Array | None, jax.Array | None]:
    """The whole reverse process; ``steps`` is (the step index k, its index in the full run's
    grid, the model's timestep, the timestep of the step's result)."""
    opts = sampler_options
    every = opts.trajectory_every
    hooked = opts.model_output_hook is not None or opts.callback is not None
    hook_key = jax.random.fold_in(key, HOOK_NOISE_STREAM) if hooked else None

    def body(carry, scanned):
        x, solver_carry, xs, pred_x0s = carry
        (k, k_run, t_model, t_next), row = scanned
        t = per_example(t_model, x)
        out = guidance.model_output(
            model_fn, params, x, t, model_kwargs, uncond_kwargs, guidance_scale, opts.variance
        )
        if hooked:
            info = StepInfo(
                index=k_run,
                t=t,
                t_next=per_example(t_next, x),
                x=x,
                noise=step_noise(hook_key, k_run + 1, opts.shape, first_index),
                schedule=schedule,
                parameterization=opts.parameterization,
                variance=opts.variance,
            )
        if opts.model_output_hook is not None:
            out = _checked_hook_result(
                "model_output_hook", opts.model_output_hook(info, out, **hook_kwargs), out
            )
        if opts.stochastic:
            noise = step_noise(key, k_run + 1, opts.shape, first_index)
        else:
            noise = jnp.zeros_like(x)
        step = Step(
            schedule=step_schedule,
            row=row,
            x=x,
            t=t,
            model_output=out,
            noise=noise,
            eta=eta,
            parameterization=opts.parameterization,
            variance=opts.variance,
            clip_x0=opts.clip_x0,
        )
        x_next, pred_x0, solver_carry = opts.method.update(step, solver_carry)
        if opts.callback is not None:
            x_next = _checked_hook_result(
                "callback", opts.callback(info, x_next, pred_x0, **hook_kwargs), x_next
            )
        if every is not None:
            # Steps between snapshots write to a spare last slot: no read-modify-write.
            slot = jnp.where(k % every == 0, k // every, xs.shape[0] - 1)
            xs = jax.lax.dynamic_update_index_in_dim(xs, x, slot, 0)
            pred_x0s = jax.lax.dynamic_update_index_in_dim(pred_x0s, pred_x0, slot, 0)
        return (x_next, solver_carry, xs, pred_x0s), None

    xs = pred_x0s = None
    if every is not None:
        # Carries derive from x_T (not jnp.zeros(shape)) so the loop also runs in shard_map.
        num_frames = -(-steps[0].shape[0] // every)  # one frame per every-th iteration
        xs = pred_x0s = jnp.broadcast_to(jnp.zeros_like(x_T), (num_frames + 1, *opts.shape))
    init = (x_T, opts.method.init_carry(x_T), xs, pred_x0s)
    (x, _, xs, pred_x0s), _ = jax.lax.scan(body, init, (steps, tables))
    if every is not None:
        xs, pred_x0s = xs[:-1], pred_x0s[:-1]
    return x, xs, pred_x0s


def _checked_hook_result(name: str, result: Any, expected: jax.Array) -> jax.Array:
    """A hook's result in the loop's dtype, or a ValueError naming the hook and the shapes."""
    if jnp.shape(result) != expected.shape:
        raise ValueError(
            f"{name} must return an array of shape {expected.shape} (what it was given), got "
            f"{jnp.shape(result)}."
        )
    return jnp.asarray(result).astype(expected.dtype)
