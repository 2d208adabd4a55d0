"""The checks of :func:`~diffusion_jax.samplers.sample`'s arguments, and what they produce: the
frozen :class:`SamplerOptions` the compiled loop specialises on.

``eta`` may be traced (under ``jax.jit``, ``jax.grad``, ``jax.vmap``): it is then a value of
the loop, not part of its static options. Whether the loop draws noise is static, so it is
decided from what is known at trace time: a concrete eta draws noise iff the method's
``stochastic(eta)`` says so (DDIM: eta > 0); a traced eta is taken as stochastic DDIM, whatever
its value (at eta = 0 the noise is drawn and multiplied by 0). Pass a Python 0.0 for a
deterministic loop. A traced eta is not range-checked, and a method without eta refuses one.

The first step's warning: with eps prediction and no x0 clipping, the first update divides the
model's eps by sqrt(abar) of the first visited timestep (x0 = (x_t - sqrt(1 - abar) eps) /
sqrt(abar)), so any eps error is amplified by 1 / sqrt(abar). Above
:data:`FIRST_STEP_AMPLIFICATION_LIMIT` a deterministic run (DDIM with eta = 0, DPM-Solver++)
gets a :class:`UserWarning` naming the remedies. Stochastic runs are spared: ancestral sampling
re-draws noise at every step and measured unharmed (benchmarks/sampler_first_step.py).
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax import options
from diffusion_jax.diffusion import ClipX0
from diffusion_jax.samplers import edm as edm_sampler
from diffusion_jax.samplers import guidance, registry
from diffusion_jax.samplers.base import Method
from diffusion_jax.samplers.edm import EDMOptions
from diffusion_jax.schedules import Schedule, check_parameterization
from diffusion_jax.timesteps import check_num_steps, host_betas, timesteps_for

__all__ = [
    "FIRST_STEP_AMPLIFICATION_LIMIT",
    "SamplerOptions",
    "check_steering",
    "first_step_amplification",
    "make_options",
]

# 1 / sqrt(abar) at the first visited timestep above which a deterministic run of an eps
# model without x0 clipping is warned about. Every DDPM-family schedule (linear, quadratic,
# sigmoid) starts below 160 at any T, and cosine below 65 with ``leading`` spacing; cosine from
# t = T - 1 starts at about 20 T (2e4 at T = 1000), where an eps error of 0.01 is an x0 error
# of 200. benchmarks/sampler_first_step.py measures the damage and the remedies on 2-D moons.
FIRST_STEP_AMPLIFICATION_LIMIT = 500.0


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
    edm: EDMOptions | None = None  # EDM's settings for heun/euler; None for other methods
    model_output_hook: Callable[..., jax.Array] | None = None  # see samplers.steering
    callback: Callable[..., jax.Array] | None = None  # see samplers.steering


def edm_methods() -> tuple[str, ...]:
    """The registered methods that take ``edm`` settings (those with a ``prepare``)."""
    return tuple(m.name for m in registry.methods() if m.prepare is not None)


def make_options(
    model_fn: Callable[..., jax.Array],
    schedule: Schedule,
    shape: tuple[int, ...],
    *,
    method: options.SamplerMethod,
    num_steps: int | None,
    timestep_spacing: options.Spacing,
    eta: float | jax.Array,
    parameterization: options.Parameterization,
    variance: options.Variance,
    clip_x0: ClipX0,
    model_kwargs: dict[str, Any] | None,
    guidance_scale: float | jax.Array | None,
    uncond_kwargs: dict[str, Any] | None,
    return_trajectory: bool,
    trajectory_every: int | None,
    first_index: int | jax.Array,
    edm: EDMOptions | None = None,
    x_T: jax.Array | None = None,
    x_start: jax.Array | None = None,
    t_start: int | None = None,
    model_output_hook: Callable[..., jax.Array] | None = None,
    callback: Callable[..., jax.Array] | None = None,
    hook_kwargs: dict[str, Any] | None = None,
) -> SamplerOptions:
    """Checks every argument of :func:`~diffusion_jax.samplers.sample` (the same names; see
    there) before anything compiles, and returns the static options.

    Returns:
      The :class:`SamplerOptions`; ``num_steps`` filled in (``None`` means T), ``clip_x0`` a
      tuple if given as a list, ``trajectory_every`` None without ``return_trajectory``,
      ``stochastic`` True for a traced ``eta`` (see the module docstring); for EDM's methods
      ``edm`` filled in (``None`` means the deterministic :class:`EDMOptions`) and
      ``stochastic`` iff ``edm.S_churn > 0``.

    Warns:
      UserWarning: a deterministic run of an eps model without x0 clipping from a first
        timestep whose 1 / sqrt(abar) exceeds :data:`FIRST_STEP_AMPLIFICATION_LIMIT`.

    Raises:
      ValueError: an unknown method, spacing, parameterisation or variance; ``num_steps``
        outside [1, T]; a concrete ``eta`` outside [0, 1], a non-scalar ``eta``, or a
        non-zero or traced ``eta`` given to a method without it; guidance
        without ``uncond_kwargs`` (or the reverse) or with mismatched kwargs; a bad shape,
        ``trajectory_every`` or ``first_index``; ``edm`` given to a method other than
        heun/euler, or a bad one (:func:`~diffusion_jax.samplers.edm.check`); a schedule that is
        traced or not a :class:`~diffusion_jax.schedules.Schedule`; an unhashable ``model_fn``;
        the steering arguments (:func:`check_steering`).

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
    check_parameterization(schedule, parameterization)  # eps cannot start where abar_T = 0
    shape = tuple(shape)
    if len(shape) < 2 or not all(isinstance(d, int | np.integer) and d > 0 for d in shape):
        raise ValueError(f"shape must be [B, ...] with at least 2 positive ints, got {shape}.")
    shape = tuple(int(d) for d in shape)
    num_timesteps = schedule.num_timesteps
    num_steps = num_timesteps if num_steps is None else check_num_steps(num_timesteps, num_steps)
    if jnp.ndim(eta) != 0:
        raise ValueError(f"eta must be a scalar, got shape {jnp.shape(eta)}.")
    with_eta = " or ".join(f"method={m.name!r}" for m in registry.methods() if m.takes_eta)
    if isinstance(eta, jax.core.Tracer):
        if not sampler.takes_eta:
            raise ValueError(
                f"eta only applies to {with_eta}, got a traced eta with {method=} (a traced "
                "value cannot be checked to be 0: leave eta at its default)."
            )
        stochastic = True
    else:
        eta = float(eta)
        if not 0.0 <= eta <= 1.0:
            raise ValueError(f"eta must be in [0, 1], got {eta=}.")
        if eta != 0.0 and not sampler.takes_eta:
            raise ValueError(f"eta only applies to {with_eta}, got {eta=} with {method=}.")
        stochastic = sampler.stochastic(eta)
    if sampler.prepare is None:
        if edm is not None:
            names = ", ".join(edm_methods())
            raise ValueError(f"edm only applies to EDM's methods ({names}), got {method=}.")
    else:
        edm = EDMOptions() if edm is None else edm
        edm_sampler.check(schedule, edm)
        stochastic = edm.S_churn > 0
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
    check_steering(
        shape,
        num_timesteps,
        x_T=x_T,
        x_start=x_start,
        t_start=t_start,
        model_output_hook=model_output_hook,
        callback=callback,
        hook_kwargs=hook_kwargs,
    )
    if parameterization == "eps" and clip_x0 is False and not stochastic:
        if sampler.prepare is None:
            visited = timesteps_for(num_timesteps, num_steps, timestep_spacing)
        else:
            visited = edm_sampler.grid(schedule, num_steps, edm)
        if t_start is not None:  # a run joined midway starts at the first step below t_start
            visited = visited[visited < t_start]
        first = int(visited[0]) if len(visited) else 0
        amplification = first_step_amplification(schedule, first)
        if len(visited) and amplification > FIRST_STEP_AMPLIFICATION_LIMIT:
            warnings.warn(
                f"Sampling an eps model without x0 clipping from t = {first}, where "
                f"1 / sqrt(alpha_bar) = {amplification:.3g} (above "
                f"{FIRST_STEP_AMPLIFICATION_LIMIT:g}): the first step multiplies any eps error "
                "by that factor and the samples may diverge. Remedies: "
                "timestep_spacing='leading' (with num_steps < T it starts below T - 1), a "
                "v-prediction model (parameterization='v'), or clip_x0=True / (low, high) / a "
                "dynamic threshold; 'trailing' spacing starts at T - 1 as well.",
                UserWarning,
                stacklevel=3,
            )
    return SamplerOptions(
        method=sampler,
        shape=shape,
        num_steps=num_steps,
        parameterization=parameterization,
        variance=variance,
        clip_x0=tuple(clip_x0) if isinstance(clip_x0, list) else clip_x0,
        stochastic=stochastic,
        trajectory_every=trajectory_every if return_trajectory else None,
        edm=edm,
        model_output_hook=model_output_hook,
        callback=callback,
    )


def check_steering(
    shape: tuple[int, ...],
    num_timesteps: int,
    *,
    x_T: jax.Array | None,
    x_start: jax.Array | None,
    t_start: int | None,
    model_output_hook: Callable[..., jax.Array] | None,
    callback: Callable[..., jax.Array] | None,
    hook_kwargs: dict[str, Any] | None,
) -> None:
    """Checks the arguments of :mod:`~diffusion_jax.samplers.steering` (see there).

    Raises:
      ValueError: ``x_T`` or ``x_start`` not a float array of ``shape``, or both given;
        ``t_start`` not an int in [0, T], or without ``x_start`` or ``x_T``; a hook that is not
        callable or not hashable; ``hook_kwargs`` without a hook or not a dict.

    Example:
      >>> check_steering((8, 4), 1000, x_T=None, x_start=x, t_start=500,
      ...                model_output_hook=None, callback=None, hook_kwargs=None)
    """
    for name, value in (("x_T", x_T), ("x_start", x_start)):
        if value is None:
            continue
        if jnp.shape(value) != shape:
            raise ValueError(
                f"{name} must have the samples' shape {shape}, got {jnp.shape(value)}."
            )
        if not jnp.issubdtype(jnp.result_type(value), jnp.floating):
            raise ValueError(f"{name} must be a float array, got dtype {jnp.result_type(value)}.")
    if x_T is not None and x_start is not None:
        raise ValueError(
            "Pass x_T (a given noisy start) or x_start (data to noise to t_start, SDEdit), "
            "not both."
        )
    if t_start is not None:
        if isinstance(t_start, bool) or not isinstance(t_start, int | np.integer):
            raise ValueError(
                f"t_start must be a Python int (it fixes the number of steps), got {t_start!r}."
            )
        if not 0 <= t_start <= num_timesteps:
            raise ValueError(f"t_start must be in [0, T={num_timesteps}], got {t_start=}.")
        if x_start is None and x_T is None:
            raise ValueError(
                "t_start needs x_start (the data to noise, SDEdit) or x_T (a noisy start at "
                "the first step below t_start)."
            )
    elif x_start is not None:
        raise ValueError("x_start needs t_start: the number of forward steps to noise it by.")
    for name, hook in (("model_output_hook", model_output_hook), ("callback", callback)):
        if hook is None:
            continue
        if not callable(hook):
            raise ValueError(f"{name} must be a function, got {type(hook).__name__}.")
        try:
            hash(hook)
        except TypeError:
            raise ValueError(
                f"{name} must be hashable (it is a static argument of the compiled loop); "
                "define it once and pass its arrays in hook_kwargs."
            ) from None
    if hook_kwargs is not None:
        if not isinstance(hook_kwargs, dict):
            raise ValueError(f"hook_kwargs must be a dict, got {type(hook_kwargs).__name__}.")
        if model_output_hook is None and callback is None:
            raise ValueError("hook_kwargs needs a model_output_hook or a callback to receive it.")


def first_step_amplification(schedule: Schedule, first_timestep: int) -> float:
    """1 / sqrt(abar) at ``first_timestep``: the factor by which the first step of an eps model
    without clipping multiplies the model's eps error in its x0 (inf where abar is 0).

    Example:
      >>> first_step_amplification(get_schedule("cosine", 1000), 999)  # about 2e4
    """
    alphas_cumprod = np.cumprod(1.0 - host_betas(schedule))
    with np.errstate(divide="ignore"):
        return float(1.0 / np.sqrt(alphas_cumprod[first_timestep]))
