"""The checks of :func:`~diffusion_jax.samplers.sample`'s arguments, and what they produce: the
frozen :class:`SamplerOptions` the compiled loop specialises on."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from diffusion_jax import options
from diffusion_jax.diffusion import ClipX0
from diffusion_jax.samplers import guidance, registry
from diffusion_jax.samplers.base import Method
from diffusion_jax.schedules import Schedule
from diffusion_jax.timesteps import check_num_steps, host_betas

__all__ = ["SamplerOptions", "make_options"]


@dataclasses.dataclass(frozen=True)
class SamplerOptions:
    """The validated static options of a sampling run: one compiled loop per distinct value.

    Hashable (a static argument of the loop). What may change without recompiling (keys,
    params, ``first_index``, ``guidance_scale``, ``eta``, the timestep spacing, the schedule's
    values, the model's keyword arrays) is not in it.
    """

    method: Method  # the registered method
    shape: tuple[int, ...]  # [B, ...] of the samples
    num_steps: int  # model evaluations, in [1, T]
    parameterization: options.Parameterization  # eps, x0 or v
    variance: options.Variance  # fixed_small, fixed_large or learned_range
    clip_x0: ClipX0  # False, True, (low, high) or a callable
    stochastic: bool  # the updates draw noise
    trajectory_every: int | None  # snapshot every this many steps; None records nothing


def make_options(
    model_fn: Callable[..., jax.Array],
    schedule: Schedule,
    shape: tuple[int, ...],
    *,
    method: options.SamplerMethod,
    num_steps: int | None,
    timestep_spacing: options.Spacing,
    eta: float,
    parameterization: options.Parameterization,
    variance: options.Variance,
    clip_x0: ClipX0,
    model_kwargs: dict[str, Any] | None,
    guidance_scale: float | jax.Array | None,
    uncond_kwargs: dict[str, Any] | None,
    return_trajectory: bool,
    trajectory_every: int | None,
    first_index: int | jax.Array,
) -> SamplerOptions:
    """Checks every argument of :func:`~diffusion_jax.samplers.sample` (the same names; see
    there) before anything compiles, and returns the static options.

    Returns:
      The :class:`SamplerOptions`; ``num_steps`` filled in (``None`` means T), ``clip_x0`` a
      tuple if given as a list, ``trajectory_every`` None without ``return_trajectory``.

    Raises:
      ValueError: an unknown method, spacing, parameterisation or variance; ``num_steps``
        outside [1, T]; ``eta`` outside [0, 1] or given to a method without it; guidance
        without ``uncond_kwargs`` (or the reverse) or with mismatched kwargs; a bad shape,
        ``trajectory_every`` or ``first_index``; a schedule that is traced or not a
        :class:`~diffusion_jax.schedules.Schedule`; an unhashable ``model_fn``.

    Example:
      >>> make_options(model_fn, schedule, (8, 4), method="ddim", num_steps=10, eta=0.0, ...)
    """
    sampler = registry.get(method)
    options.check("parameterization", parameterization)
    options.check("variance", variance)
    options.check("timestep_spacing", timestep_spacing)
    if not isinstance(schedule, Schedule):
        raise ValueError(f"schedule must be a Schedule, got {type(schedule).__name__}.")
    host_betas(schedule)  # the plan runs on the host: a traced schedule is an error here
    shape = tuple(shape)
    if len(shape) < 2 or not all(isinstance(d, int | np.integer) and d > 0 for d in shape):
        raise ValueError(f"shape must be [B, ...] with at least 2 positive ints, got {shape}.")
    shape = tuple(int(d) for d in shape)
    num_timesteps = schedule.num_timesteps
    num_steps = num_timesteps if num_steps is None else check_num_steps(num_timesteps, num_steps)
    eta = float(eta)
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"eta must be in [0, 1], got {eta=}.")
    if eta != 0.0 and not sampler.takes_eta:
        with_eta = " or ".join(f"method={m.name!r}" for m in registry.methods() if m.takes_eta)
        raise ValueError(f"eta only applies to {with_eta}, got {eta=} with {method=}.")
    guidance.check_kwargs(model_kwargs, uncond_kwargs, guidance_scale, shape[0])
    if return_trajectory:
        if trajectory_every is None:
            trajectory_every = -(-num_steps // 10)
        if isinstance(trajectory_every, bool) or not isinstance(trajectory_every, int):
            raise ValueError(f"trajectory_every must be an int, got {trajectory_every!r}.")
        if trajectory_every < 1:
            raise ValueError(f"trajectory_every must be >= 1, got {trajectory_every=}.")
    if isinstance(first_index, int | np.integer) and first_index < 0:
        raise ValueError(f"first_index must be >= 0, got {first_index=}.")
    try:
        hash(model_fn)
    except TypeError:
        raise ValueError(
            "model_fn must be hashable (it is a static argument of the compiled loop); wrap it "
            "in a function defined once."
        ) from None
    return SamplerOptions(
        method=sampler,
        shape=shape,
        num_steps=num_steps,
        parameterization=parameterization,
        variance=variance,
        clip_x0=tuple(clip_x0) if isinstance(clip_x0, list) else clip_x0,
        stochastic=sampler.stochastic(eta),
        trajectory_every=trajectory_every if return_trajectory else None,
    )
