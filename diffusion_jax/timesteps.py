"""Which timesteps a sampler visits, and the schedule of the chain that visits only those.

Planned on the host in float64 NumPy before a sampling loop is compiled: :func:`timesteps_for`
(the subsequence, by spacing) and :func:`respace` (improved-diffusion's betas of the respaced
chain).
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from diffusion_jax import options
from diffusion_jax.schedules import Schedule, from_betas

__all__ = ["SPACINGS", "check_num_steps", "host_betas", "respace", "timesteps_for"]

SPACINGS = options.SPACINGS


def check_num_steps(num_timesteps: int, num_steps: Any) -> int:
    """``num_steps`` as an int in [1, T], or a ValueError saying what is allowed."""
    if isinstance(num_steps, bool) or not isinstance(num_steps, int | np.integer):
        raise ValueError(f"num_steps must be an int or None, got {num_steps!r}.")
    if not 1 <= num_steps <= num_timesteps:
        raise ValueError(f"num_steps must be in [1, T={num_timesteps}], got {num_steps=}.")
    return int(num_steps)


def timesteps_for(
    num_timesteps: int, num_steps: int, spacing: options.Spacing = "linspace"
) -> np.ndarray:
    """The original timesteps a ``num_steps``-step sampler visits, in the order it visits them.

    * ``linspace``: ``round(linspace(T - 1, 0, n))``, both ends included.
    * ``leading``: ``(n - 1, ..., 1, 0) * (T // n)`` (diffusers' "leading", offset 0); it ends
      at 0 but may start below T - 1.
    * ``trailing``: ``round(T - k T / n) - 1`` for ``k = 0 .. n - 1``; it starts at T - 1 and
      ends near T / n - 1.
    * ``quadratic``: ``round((T - 1) (i / (n - 1))^2)``, dense near 0, made strictly increasing
      (DDIM's "quad" but over the whole range rather than up to 0.8 T).

    With ``n = 1``, ``linspace`` and ``quadratic`` give ``[T - 1]``; with ``n = T`` every
    spacing gives all timesteps.

    Args:
      num_timesteps: T of the schedule.
      num_steps: n in [1, T].
      spacing: one of :data:`SPACINGS`.

    Returns:
      int32 ``[num_steps]``, strictly decreasing, in [0, T - 1].

    Example:
      >>> timesteps_for(1000, 4, "trailing")
      array([999, 749, 499, 249], dtype=int32)
    """
    options.check("timestep_spacing", spacing)
    n, last = check_num_steps(num_timesteps, num_steps), num_timesteps - 1
    if spacing == "linspace":
        steps = np.round(np.linspace(0.0, last, n)) if n > 1 else np.array([last])
    elif spacing == "leading":
        steps = np.arange(n) * (num_timesteps // n)
    elif spacing == "trailing":
        steps = np.round(num_timesteps - np.arange(n)[::-1] * num_timesteps / n) - 1
    else:
        frac = np.arange(n) / max(n - 1, 1)
        steps = np.round(last * frac**2) if n > 1 else np.array([last])
        # Rounding collides near 0. Lifting each step to at least previous + 1 (a running max
        # of steps - i) never passes T - 1: the parabola lies below the chord (0,0)-(n-1,T-1).
        steps = np.maximum.accumulate(steps - np.arange(n)) + np.arange(n)
    steps = np.asarray(steps, dtype=np.int64)[::-1]
    assert np.all(np.diff(steps) < 0) and steps[0] <= last and steps[-1] >= 0, steps
    return steps.astype(np.int32)


def host_betas(schedule: Schedule) -> np.ndarray:
    """The schedule's betas as float64 host values (the schedule must not be traced)."""
    try:
        return np.asarray(schedule.betas, dtype=np.float64)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        raise ValueError(
            "sample() plans the timestep subsequence and the solver's coefficients on the host, "
            "so the schedule must be concrete: close over it instead of passing it as an "
            "argument of jax.jit (key, params, model_kwargs and guidance_scale may be traced)."
        ) from None


def respace(schedule: Schedule, timesteps: np.ndarray) -> Schedule:
    """The schedule of the Markov chain that visits only ``timesteps`` (improved-diffusion).

    Its betas are ``1 - abar[t_i] / abar[t_{i-1}]`` over the increasing subsequence (with
    ``abar[t_{-1}] = 1``), computed in float64, so its ``alphas_cumprod`` at respaced index
    ``j`` is the original ``alphas_cumprod`` at the ``j``-th smallest timestep.

    Args:
      schedule: a concrete schedule with T steps.
      timesteps: distinct original timesteps in [0, T - 1], in any order (e.g. from
        :func:`timesteps_for`).

    Returns:
      A schedule with ``len(timesteps)`` steps.

    Example:
      >>> small = respace(get_schedule("linear", 1000), timesteps_for(1000, 50))
    """
    betas = host_betas(schedule)
    steps = np.sort(np.asarray(timesteps, dtype=np.int64))
    if steps.ndim != 1 or steps.size == 0 or np.any(np.diff(steps) == 0):
        raise ValueError(f"timesteps must be distinct, 1-D and non-empty, got {timesteps!r}.")
    if steps[0] < 0 or steps[-1] >= betas.shape[0]:
        raise ValueError(f"timesteps must lie in [0, {betas.shape[0] - 1}], got {timesteps!r}.")
    alphas_cumprod = np.cumprod(1.0 - betas)[steps]
    return from_betas(1.0 - alphas_cumprod / np.append(1.0, alphas_cumprod[:-1]))
