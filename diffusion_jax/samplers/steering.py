"""Steering a sampling run: where it starts, and the hooks traced inside its loop.

A run of :func:`~diffusion_jax.samplers.sample` normally starts from standard normal noise at the
first timestep of its grid. Three arguments change that:

* ``x_T``: a given start, the loop's ``x`` entering its first step (``Trajectory.xs[0]``), in
  the model's (VP) scale: ``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps`` at the first
  timestep the model sees. DDPM, DDIM and DPM-Solver++ draw ``z`` for it; EDM's ``heun`` and
  ``euler`` draw ``sqrt(1 - abar_t0) z`` (so that ``x_T / sqrt(abar_t0) = sigma_t0 z``, EDM's
  start at ``sigma_max``), where ``z = step_noise(key, 0, shape, first_index)``.
* ``x_start`` and ``t_start`` (SDEdit, image-to-image; Meng et al. 2022): the run keeps the
  grid of a full run (same ``num_steps`` and spacing) and joins it at the first timestep below
  ``t_start``. ``t_start`` counts forward steps as Ho et al. do (x_0 is data, x_T pure noise):
  ``t_start = T`` runs every step, ``t_start = 0`` none. ``x_start`` is noised to the joined
  timestep with :func:`~diffusion_jax.diffusion.q_sample` and the noise ``z`` above; with no
  step left it is returned as it is. ``x_T`` with ``t_start`` starts from a given x at the
  joined timestep (e.g. from :func:`~diffusion_jax.samplers.invert` with ``t_stop``). Steps keep
  their index in the full grid, so their noise is the full run's.
* Hooks, traced inside the compiled loop with the arrays of ``hook_kwargs`` (traced: changing
  them does not recompile; the hooks themselves are static, pass the same function objects):

  - ``model_output_hook(info, output, **hook_kwargs) -> output`` changes the (guided) model
    output before the update, e.g. classifier guidance with :func:`shift_by_score`;
  - ``callback(info, x_next, pred_x0, **hook_kwargs) -> x_next`` changes the state after the
    update, e.g. inpainting with :func:`keep_known`.

  ``info`` is a :class:`StepInfo`. Methods with a solver state (DPM-Solver++'s previous x0,
  Heun's predictor) keep their state: the callback changes only the next input.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax import diffusion, options
from diffusion_jax.schedules import Schedule

__all__ = ["HOOK_NOISE_STREAM", "StepInfo", "first_iteration", "keep_known", "shift_by_score"]

# The hooks' noise comes from the run's key folded with this (the ASCII of "hook"), then with
# the example's index and the step, so it is batch-invariant and apart from the sampler's noise.
HOOK_NOISE_STREAM = 0x686F6F6B


class StepInfo(NamedTuple):
    """What a hook sees at one iteration of the sampling loop."""

    index: jax.Array  # int32 scalar: the iteration's index in the full run's grid
    t: jax.Array  # [B] int32: the original timestep the model saw; x is x_t
    t_next: jax.Array  # [B] int32: the timestep x_next is at; -1 after the last step (x0)
    x: jax.Array  # [B, ...] x_t entering the iteration
    noise: jax.Array  # [B, ...] standard normal drawn for the hooks (see HOOK_NOISE_STREAM)
    schedule: Schedule  # the original schedule (t and t_next index it)
    parameterization: options.Parameterization  # what the model output predicts
    variance: options.Variance  # learned_range outputs carry a variance half


def first_iteration(
    timesteps: np.ndarray, t_start: int | None, entry_points: np.ndarray | None = None
) -> int:
    """The first iteration of a run's grid whose model timestep lies below ``t_start``.

    Args:
      timesteps: int ``[n]`` the model timesteps of the full run, in visiting order.
      t_start: in [0, T]; ``None`` is the whole run (0).
      entry_points: the iterations a run may start at (EDM's Heun: not at a corrector);
        ``None`` means any.

    Returns:
      The index in [0, n]; ``n`` when no step is left.

    Example:
      >>> first_iteration(np.array([99, 66, 33, 0]), 50)
      2
    """
    n = len(timesteps)
    if t_start is None:
        return 0
    candidates = np.arange(n) if entry_points is None else np.asarray(entry_points)
    below = candidates[np.asarray(timesteps)[candidates] < t_start]
    return int(below[0]) if below.size else n


def _broadcast(table_values: jax.Array, x: jax.Array) -> jax.Array:
    return table_values.reshape((-1,) + (1,) * (x.ndim - 1))


def shift_by_score(info: StepInfo, output: jax.Array, score: jax.Array) -> jax.Array:
    """The model output whose implied score is the model's plus ``score``, in any
    parameterisation: the model-output hook of classifier guidance (Dhariwal & Nichol 2021).

    With x_t = a x0 + s eps the score is ``-eps / s``, so adding ``g`` to it is
    ``eps - s g``, ``x0 + (s^2 / a) g`` or ``v - (s / a) g``. With ``learned_range`` only the
    mean half changes.

    Args:
      info: the step (its ``t``, parameterisation and variance).
      output: ``[B, ...]`` the model output (``[B, ..., 2C]`` with ``learned_range``).
      score: ``[B, ...]`` the score to add, e.g. ``scale * grad_x log p(y | x_t)``.

    Returns:
      The shifted output, shape of ``output``.

    Example:
      >>> def guide(info, output, *, y, scale):
      ...     grad = jax.grad(lambda x: log_p(x, info.t, y).sum())(info.x)
      ...     return shift_by_score(info, output, scale * grad)
    """
    mean, log_variance = diffusion.split_model_output(output, info.x, info.variance)
    signal = _broadcast(info.schedule.sqrt_alphas_cumprod[info.t], info.x)
    sigma = _broadcast(info.schedule.sqrt_one_minus_alphas_cumprod[info.t], info.x)
    factor = {"eps": -sigma, "x0": sigma**2 / signal, "v": -sigma / signal}
    shifted = mean + factor[options.check("parameterization", info.parameterization)] * score
    shifted = shifted.astype(output.dtype)
    return shifted if log_variance is None else jnp.concatenate([shifted, log_variance], -1)


def keep_known(
    info: StepInfo, x_next: jax.Array, pred_x0: jax.Array, *, known: jax.Array, mask: jax.Array
) -> jax.Array:
    """The callback of inpainting by replacement: the known pixels of ``x_next`` become the
    known image noised to ``x_next``'s timestep with the hook's noise (the image itself after
    the last step), the others are the sampler's.

    Args:
      info: the step.
      x_next: ``[B, ...]`` the updated state, at ``info.t_next``.
      pred_x0: unused.
      known: ``[B, ...]`` the image whose pixels are kept (any values where ``mask`` is 0).
      mask: broadcastable to ``x_next``; 1 (or True) where the pixel is known.

    Returns:
      ``[B, ...]`` the next state.

    Example:
      >>> samples = sample(model_fn, params, schedule, key, image.shape, method="ddpm",
      ...                  callback=keep_known, hook_kwargs={"known": image, "mask": mask})
    """
    del pred_x0
    t_next = jnp.maximum(info.t_next, 0)
    noised = diffusion.q_sample(info.schedule, known.astype(x_next.dtype), t_next, info.noise)
    target = jnp.where(_broadcast(info.t_next >= 0, x_next), noised, known.astype(x_next.dtype))
    return jnp.where(jnp.asarray(mask, bool), target, x_next)
