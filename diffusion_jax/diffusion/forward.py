"""The forward process q(x_t | x_0) and its posterior q(x_{t-1} | x_t, x_0).

Pure, ``jit``-able functions of a :class:`~diffusion_jax.schedules.Schedule`. They take noise,
never keys. Data may have any shape ``[B, ...]``; ``t`` holds one int32 timestep in
``{0, ..., T-1}`` per example, shape ``[B]``.

**Errors.** Every function checks its arguments where the values are known: a ``t`` outside
``[0, T-1]`` (``t = T`` would read past the tables and give NaN; ``t = -1`` would wrap to
``T-1``), a ``t`` of the wrong shape or dtype, or integer data (scale images to float in
``[-1, 1]`` first) is a ``ValueError``. Under ``jax.jit``, ``vmap`` or ``lax.scan`` the values of
``t`` are traced and cannot raise; wrap the function in :func:`checked` while debugging, which
adds the range check to the compiled code with :mod:`jax.experimental.checkify` (and costs
nothing when not used)::

    step = diffusion.forward.checked(lambda x0, t, noise: q_sample(schedule, x0, t, noise))
    step(x0, t, noise)  # checkify.JaxRuntimeError (a ValueError) if a t is out of range
"""

from __future__ import annotations

import contextvars
import functools
from collections.abc import Callable
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import checkify

from diffusion_jax.schedules import Schedule

__all__ = [
    "check_float",
    "check_same_shape",
    "check_timesteps",
    "checked",
    "extract",
    "q_mean_variance",
    "q_posterior_mean_variance",
    "q_sample",
]


# True only while :func:`checked` traces its function: check_timesteps then adds a checkify check.
_CHECKIFY_TIMESTEPS = contextvars.ContextVar("diffusion_jax_checkify_timesteps", default=False)


def check_timesteps(
    x: jax.Array,
    t: jax.Array,
    what: str = "x",
    num_timesteps: int | None = None,
    *,
    lowest: int = 0,
    name: str = "t",
) -> None:
    """Checks that ``t`` is an integer vector with one timestep per example of ``x``.

    Args:
      x: ``[B, ...]`` the data ``t`` goes with.
      t: ``[B]`` the timesteps.
      what: ``x``'s name, for the messages.
      num_timesteps: T; when given, ``t`` must lie in ``[lowest, T-1]``. A concrete ``t``
        raises here; a traced one is checked only inside :func:`checked`.
      lowest: the smallest valid value (``-1`` for DDIM's "to x_0" target).
      name: ``t``'s name, for the messages.

    Raises:
      ValueError: a scalar ``x``; ``t`` of another shape than ``[B]``, not integer, or (when
        concrete) outside the range.
    """
    if jnp.ndim(x) < 1:
        raise ValueError(f"{what} must have a batch axis, shape [B, ...]; got a scalar.")
    batch = jnp.shape(x)[0]
    chex.assert_shape(
        t,
        (batch,),
        custom_message=f"{name} must have shape [B] = ({batch},), one timestep per example of "
        f"{what}",
        exception_type=ValueError,
    )
    if not jnp.issubdtype(jnp.result_type(t), jnp.integer):
        raise ValueError(
            f"{name} must hold integer timesteps in [0, T-1], got dtype {jnp.result_type(t)}."
        )
    if num_timesteps is None:
        return
    highest = num_timesteps - 1
    if isinstance(t, jax.core.Tracer):
        if _CHECKIFY_TIMESTEPS.get():
            checkify.check(
                jnp.all((t >= lowest) & (t <= highest)),
                f"{name} must lie in [{lowest}, {highest}] (T = {num_timesteps}); got values "
                "from {low} to {high}.",
                low=jnp.min(t),
                high=jnp.max(t),
            )
        return
    values = np.asarray(t)
    bad = values[(values < lowest) | (values > highest)]
    if bad.size:
        raise ValueError(
            f"{name} must lie in [{lowest}, {highest}] (T = {num_timesteps}); got "
            f"{sorted(set(bad.tolist()))[:8]}."
        )


def check_float(x: jax.Array, what: str) -> None:
    """A ValueError unless ``x`` holds floating-point data (images scaled to [-1, 1])."""
    dtype = jnp.result_type(x)
    if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(
            f"{what} must be floating-point data, got dtype {dtype}: scale images to float in "
            "[-1, 1] first (e.g. x / 127.5 - 1 for uint8 pixels)."
        )


def checked(fn: Callable[..., Any], *, jit: bool = True) -> Callable[..., Any]:
    """``fn`` with the timestep range checks of the core compiled in, for debugging.

    Under ``jax.jit`` a ``t`` is traced and an out-of-range value cannot raise (``t = T`` gives
    NaN, ``t = -1`` wraps to ``T-1``). ``checked(fn)`` traces ``fn`` with a
    :func:`jax.experimental.checkify.check` at every core call that takes ``t`` and raises after
    the call. Functions that are not wrapped trace no check: the debug mode costs nothing when
    off.

    Args:
      fn: a function calling the core (e.g. :func:`q_sample`, ``p_mean_variance``,
        ``ddim_step``); close over Python options (strings, bools) rather than passing them.
        Functions it calls that are already jitted and traced elsewhere keep their compiled code
        (and so no check): wrap your own, unjitted code.
      jit: compile the checked function with ``jax.jit`` (otherwise it runs eagerly through
        checkify).

    Returns:
      A function like ``fn`` that raises :class:`jax.experimental.checkify.JaxRuntimeError`
      (a ``ValueError``) naming the valid range when a ``t`` is out of it.

    Example:
      >>> noisy = checked(lambda x0, t, noise: q_sample(schedule, x0, t, noise))
      >>> noisy(x0, jnp.full((8,), schedule.num_timesteps), noise)  # raises
    """

    def with_checks(*args: Any, **kwargs: Any) -> Any:
        token = _CHECKIFY_TIMESTEPS.set(True)
        try:
            return fn(*args, **kwargs)
        finally:
            _CHECKIFY_TIMESTEPS.reset(token)

    checkified = checkify.checkify(with_checks)
    if jit:
        checkified = jax.jit(checkified)

    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        error, out = checkified(*args, **kwargs)
        error.throw()
        return out

    return run


def check_same_shape(a: jax.Array, b: jax.Array, names: str) -> None:
    """A ValueError naming ``names`` unless ``a`` and ``b`` have one shape."""
    if jnp.shape(a) != jnp.shape(b):
        raise ValueError(
            f"{names} must have the same shape, got {jnp.shape(a)} and {jnp.shape(b)}."
        )


def extract(table: jax.Array, t: jax.Array, ndim: int) -> jax.Array:
    """Gathers ``table[t]`` and reshapes it to broadcast against data of rank ``ndim``.

    Args:
      table: ``[T]`` per-timestep values.
      t: ``[B]`` integer timesteps.
      ndim: rank of the data, e.g. 4 for ``[B, H, W, C]``.

    Returns:
      float32 ``[B, 1, ..., 1]`` with ``ndim`` axes.
    """
    values = jnp.take(jnp.asarray(table), t, axis=0)
    return values.reshape(values.shape + (1,) * (ndim - 1))


def q_sample(schedule: Schedule, x0: jax.Array, t: jax.Array, noise: jax.Array) -> jax.Array:
    """Samples x_t ~ q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I) by reparameterisation.

    Args:
      schedule: the diffusion's tables.
      x0: ``[B, ...]`` clean data.
      t: ``[B]`` int timesteps.
      noise: standard normal noise of ``x0``'s shape.

    Returns:
      x_t, shape of ``x0``.
    """
    check_timesteps(x0, t, "x0", schedule.num_timesteps)
    check_float(x0, "x0")
    check_same_shape(x0, noise, "x0 and noise")
    nd = jnp.ndim(x0)
    return (
        extract(schedule.sqrt_alphas_cumprod, t, nd) * x0
        + extract(schedule.sqrt_one_minus_alphas_cumprod, t, nd) * noise
    )


def q_mean_variance(
    schedule: Schedule, x0: jax.Array, t: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Mean, variance and log-variance of q(x_t | x_0).

    Args:
      schedule: the diffusion's tables.
      x0: ``[B, ...]`` clean data.
      t: ``[B]`` int timesteps.

    Returns:
      ``(mean, variance, log_variance)``: mean has ``x0``'s shape, the others ``[B, 1, ..., 1]``.
    """
    check_timesteps(x0, t, "x0", schedule.num_timesteps)
    check_float(x0, "x0")
    nd = jnp.ndim(x0)
    mean = extract(schedule.sqrt_alphas_cumprod, t, nd) * x0
    # Not 1 - abar in float32: that loses 2e-4 relative at t = 0.
    variance = extract(schedule.sqrt_one_minus_alphas_cumprod, t, nd) ** 2
    log_variance = extract(schedule.log_one_minus_alphas_cumprod, t, nd)
    return mean, variance, log_variance


def q_posterior_mean_variance(
    schedule: Schedule, x0: jax.Array, x_t: jax.Array, t: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The forward-process posterior q(x_{t-1} | x_t, x_0) (Ho et al. 2020, eqs. 6-7).

    Args:
      schedule: the diffusion's tables.
      x0: ``[B, ...]`` clean data (or a prediction of it).
      x_t: ``[B, ...]`` noisy data at step ``t``.
      t: ``[B]`` int timesteps.

    Returns:
      ``(mean, variance, log_variance_clipped)``; mean has ``x_t``'s shape, the others
      ``[B, 1, ..., 1]``. The log-variance at t = 0 takes the value at t = 1 (the variance there
      is 0).
    """
    check_timesteps(x_t, t, "x_t", schedule.num_timesteps)
    check_float(x0, "x0")
    check_float(x_t, "x_t")
    check_same_shape(x0, x_t, "x0 and x_t")
    nd = jnp.ndim(x_t)
    mean = (
        extract(schedule.posterior_mean_coef1, t, nd) * x0
        + extract(schedule.posterior_mean_coef2, t, nd) * x_t
    )
    variance = extract(schedule.posterior_variance, t, nd)
    log_variance = extract(schedule.posterior_log_variance_clipped, t, nd)
    return mean, variance, log_variance
