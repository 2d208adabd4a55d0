"""Samplers: ancestral DDPM, DDIM, DPM-Solver++(2M) and EDM's Heun/Euler, with respacing and
classifier-free guidance.

:func:`sample` validates its options into a frozen :class:`SamplerOptions`
(:func:`make_options`), plans the run on the host (the timestep subsequence, then the chosen
method's tables in float64 NumPy), and runs one compiled ``lax.scan`` with fixed-shape state.
The loop compiles once per (method, shape, number of steps, static options): keys, params,
``first_index``, ``guidance_scale``, ``eta``, the timestep spacing, the model's keyword arrays,
the schedule's values, EDM's settings (except whether ``S_churn > 0``), a given ``x_T`` or
``x_start`` and the hooks' arrays are traced or tabulated, so changing them never retraces.

A run can be steered (:mod:`.steering`): a given start ``x_T``, an input to edit from a
noise level (``x_start``, ``t_start``: SDEdit), and hooks traced inside the loop (a
``model_output_hook``, e.g. classifier guidance, and a ``callback`` after each update, e.g.
inpainting). :func:`invert` (:mod:`.inversion`) runs deterministic DDIM backwards, x0 -> x_T.

One module per method, behind one registry (:mod:`.registry`): :mod:`.ddpm`, :mod:`.ddim`,
:mod:`.dpm_solver`, :mod:`.edm` (two methods on EDM's sigma grid, with a ``prepare``), each a
:class:`~.base.Method` (a host-side ``plan`` and a per-step ``update``). The shared pieces:
:mod:`.noise`, :mod:`.guidance` (the one batched model call), :mod:`.loop` (the compiled scan)
and :mod:`.validation`.

Randomness depends on (key, example index, step) only: example ``i`` of a batch drawn with
``first_index=f`` is example ``f + i`` of the whole run, and its noise at step ``s`` is
``normal(fold_in(fold_in(key, f + i), s), shape[1:])`` (see :func:`step_noise`), where step 0
is the initial x_T and the ``k``-th update (``k = 0 .. num_steps - 1``) draws step ``k + 1``.
One batch of 64, four batches of 16 with ``first_index`` 0, 16, 32, 48, or a batch sharded
over any number of devices draw bit-identical noise and so the same samples (up to the last-bit
rounding XLA may do differently in programs of different shapes).

Example:
  >>> schedule = get_schedule("cosine", 1000)
  >>> images = sample(model_fn, params, schedule, jax.random.key(0), (16, 32, 32, 3),
  ...                 method="dpm_solver++", num_steps=20)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from diffusion_jax import options
from diffusion_jax.diffusion import ClipX0, q_sample
from diffusion_jax.samplers import loop, registry, steering
from diffusion_jax.samplers.dpm_solver import MIN_STEP_RATIO
from diffusion_jax.samplers.edm import EDMOptions
from diffusion_jax.samplers.inversion import invert
from diffusion_jax.samplers.loop import Trajectory
from diffusion_jax.samplers.noise import initial_noise, step_noise
from diffusion_jax.samplers.steering import StepInfo, keep_known, shift_by_score
from diffusion_jax.samplers.validation import SamplerOptions, make_options
from diffusion_jax.schedules import Schedule
from diffusion_jax.timesteps import SPACINGS, respace, timesteps_for

__all__ = [
    "METHODS",
    "MIN_STEP_RATIO",
    "SPACINGS",
    "EDMOptions",
    "SamplerOptions",
    "StepInfo",
    "Trajectory",
    "invert",
    "keep_known",
    "make_options",
    "respace",
    "sample",
    "shift_by_score",
    "step_noise",
    "timesteps_for",
]

METHODS: tuple[str, ...] = registry.names()
ModelFn = Callable[..., jax.Array]


def sample(
    model_fn: ModelFn,
    params: Any,
    schedule: Schedule,
    key: jax.Array,
    shape: tuple[int, ...],
    *,
    method: options.SamplerMethod = "ddpm",
    num_steps: int | None = None,
    timestep_spacing: options.Spacing = "linspace",
    eta: float | jax.Array = 0.0,
    parameterization: options.Parameterization = "eps",
    variance: options.Variance = "fixed_small",
    clip_x0: ClipX0 = True,
    model_kwargs: dict[str, Any] | None = None,
    guidance_scale: float | jax.Array | None = None,
    uncond_kwargs: dict[str, Any] | None = None,
    return_trajectory: bool = False,
    trajectory_every: int | None = None,
    first_index: int | jax.Array = 0,
    edm: EDMOptions | None = None,
    x_T: jax.Array | None = None,
    x_start: jax.Array | None = None,
    t_start: int | None = None,
    model_output_hook: Callable[..., jax.Array] | None = None,
    callback: Callable[..., jax.Array] | None = None,
    hook_kwargs: dict[str, Any] | None = None,
) -> jax.Array | Trajectory:
    """Draws samples by running the reverse process from pure noise (or a given start).

    Methods:
      * ``ddpm``: ancestral sampling (Ho et al. 2020) for every parameterisation and variance
        of the core. With ``num_steps < T`` it samples the respaced chain of :func:`respace`
        (improved-diffusion), whose learned variance interpolates the respaced betas.
      * ``ddim``: Song et al. (2021) with any ``eta`` in [0, 1]; ``eta=1`` with all T steps is
        ancestral sampling with ``fixed_small`` (the same noise gives the same samples).
      * ``dpm_solver++``: DPM-Solver++(2M) (Lu et al. 2022) on the discrete schedule, data
        prediction, ``lambda = log_snr / 2``; first and last steps are first order, the last
        lands on x0. Deterministic.
      * ``heun`` and ``euler``: EDM's samplers (Karras et al. 2022, Algorithms 1 and 2) on its
        rho-spaced sigma grid snapped to the model's timesteps (:mod:`.edm`), with the
        settings of ``edm``. For these ``num_steps`` is the number of grid steps N: Heun makes
        2N - 1 model evaluations (its last step, onto sigma = 0, is Euler), Euler N. A
        trajectory has one frame per evaluation. Deterministic unless ``edm.S_churn > 0``.
        ``timestep_spacing`` does not apply to them (``edm.rho`` shapes their grid).

    The model always receives original int32 timesteps in [0, T-1], shape ``[B]`` (``[2B]``
    with guidance). Every method ends on a noise-free x0.

    Args:
      model_fn: ``model_fn(params, x_t, t, **model_kwargs) -> output``. It is a static argument
        of the compiled loop: pass the same (hashable) object to avoid recompiling.
      params: the model's parameters (any pytree).
      schedule: the diffusion's tables; must be concrete (not a tracer).
      key: PRNG key; see :func:`step_noise` for how noise derives from it.
      shape: ``[B, ...]`` of the samples, e.g. ``(B, H, W, C)``.
      method: one of :data:`METHODS`.
      num_steps: number of model evaluations, in [1, T]; ``None`` means T.
      timestep_spacing: one of :data:`SPACINGS`, see :func:`timesteps_for`.
      eta: DDIM stochasticity in [0, 1]; only for ``method="ddim"``. A Python number or a
        traced scalar (``jax.jit``/``jax.grad`` over eta compile the loop once): a concrete
        0 gives the deterministic loop, any traced eta the stochastic one (noise drawn and
        scaled by DDIM's sigma, which is 0 at eta = 0). ``jax.grad`` in eta works for eta > 0.
      parameterization: what the model predicts: ``eps``, ``x0`` or ``v``.
      variance: ``fixed_small``, ``fixed_large`` or ``learned_range`` (a ``[B, ..., 2C]``
        output); DDIM and DPM-Solver++ only use the mean half of a learned output.
      clip_x0: ``False``, ``True`` ([-1, 1]), ``(low, high)`` or a callable such as
        :func:`~diffusion_jax.diffusion.dynamic_threshold` (create it once: it is static).
      model_kwargs: arrays passed to the model, e.g. ``{"y": labels}`` with labels ``[B]``.
      guidance_scale: classifier-free guidance weight w; ``None`` turns guidance off. The
        output is ``uncond + w (cond - uncond)`` from one model call on the batch
        ``[cond; uncond]``; w = 1 is plain conditional sampling. With ``learned_range`` the
        mean half is guided and the conditional variance half kept.
      uncond_kwargs: the unconditional pass's keyword arrays, e.g. ``{"y": null_labels}``;
        same structure and shapes as ``model_kwargs``, each with a leading axis of size B.
      return_trajectory: also return snapshots of the run, see :class:`Trajectory`.
      trajectory_every: snapshot every this many steps (steps 0, e, 2e, ...); ``None`` means
        ``ceil(num_steps / 10)``, about ten frames.
      first_index: the run-wide index of this batch's first example, so a run split into
        batches (or processes) draws exactly the samples of one big batch: draw batch ``j`` of
        size ``b`` with ``first_index = j * b``.
      edm: an :class:`EDMOptions` (sigma range, rho, S_churn, S_tmin, S_tmax, S_noise) for
        ``heun``/``euler``; ``None`` is ``EDMOptions()``, deterministic over the schedule's
        whole sigma range. Other methods refuse it.
      x_T: ``[B, ...]`` a given start instead of drawn noise: the x entering the first step,
        at the first timestep the model sees, in the model's (VP) scale; heun/euler draw
        ``sqrt(1 - abar) z`` there (EDM's ``sigma_max z`` divided by ``1 / sqrt(abar)``).
        Traced: changing it does not recompile. See :mod:`.steering`.
      x_start: ``[B, ...]`` data to edit (SDEdit): noised with ``q_sample`` to the first
        timestep of the grid below ``t_start`` (noise ``step_noise(key, 0, ...)``), then the
        rest of the grid is run.
      t_start: an int in [0, T], the noise level to start from in forward steps: ``T`` runs
        the whole grid, ``0`` none (``x_start`` comes back unchanged). With ``x_T``, the given
        x is at the first timestep below ``t_start`` (e.g. :func:`invert` with ``t_stop``).
        Static: each number of remaining steps compiles once.
      model_output_hook: ``hook(info, output, **hook_kwargs) -> output``, traced in the loop
        after the (guided) model call, e.g. classifier guidance with
        :func:`~.steering.shift_by_score`; ``info`` is a :class:`~.steering.StepInfo`.
      callback: ``callback(info, x_next, pred_x0, **hook_kwargs) -> x_next``, traced in the
        loop after each update, e.g. inpainting with :func:`~.steering.keep_known`.
      hook_kwargs: arrays passed to the hooks (traced: changing them does not recompile).

    Returns:
      float32 samples of ``shape``, or a :class:`Trajectory` with ``return_trajectory``.

    Warns:
      UserWarning: a deterministic run (DDIM with eta = 0, DPM-Solver++) of an eps model
        without x0 clipping whose first timestep has 1 / sqrt(abar) above
        :data:`~diffusion_jax.samplers.validation.FIRST_STEP_AMPLIFICATION_LIMIT` (cosine
        from t = T - 1): the first step amplifies eps errors by that factor. Use ``leading``
        spacing, v prediction or clipping.

    Raises:
      ValueError: an unknown method, spacing, parameterisation or variance; ``num_steps``
        outside [1, T]; a concrete ``eta`` outside [0, 1], or a non-zero or traced one given to
        another method; guidance without ``uncond_kwargs`` (or the reverse) or with mismatched
        kwargs; a bad shape.

    Example:
      >>> labels = jnp.arange(16) % 10
      >>> images = sample(model_fn, params, schedule, jax.random.key(0), (16, 32, 32, 3),
      ...                 method="ddim", num_steps=50, model_kwargs={"y": labels},
      ...                 guidance_scale=3.0, uncond_kwargs={"y": jnp.full(16, 10)})
    """
    sampler_options = make_options(
        model_fn,
        schedule,
        shape,
        method=method,
        num_steps=num_steps,
        timestep_spacing=timestep_spacing,
        eta=eta,
        parameterization=parameterization,
        variance=variance,
        clip_x0=clip_x0,
        model_kwargs=model_kwargs,
        guidance_scale=guidance_scale,
        uncond_kwargs=uncond_kwargs,
        return_trajectory=return_trajectory,
        trajectory_every=trajectory_every,
        first_index=first_index,
        edm=edm,
        x_T=x_T,
        x_start=x_start,
        t_start=t_start,
        model_output_hook=model_output_hook,
        callback=callback,
        hook_kwargs=hook_kwargs,
    )
    chosen = sampler_options.method
    x_T_scale = 1.0
    if chosen.prepare is None:
        timesteps = timesteps_for(
            schedule.num_timesteps, sampler_options.num_steps, timestep_spacing
        )
        start = steering.first_iteration(timesteps, t_start)
        # A run joined midway is planned over its own steps (DPM-Solver++ then starts at first
        # order); the plans of the other methods are those rows of the full run's.
        timesteps = timesteps[start:]
        if len(timesteps):
            step_schedule, tables = chosen.plan(schedule, timesteps)
    else:
        timesteps, step_schedule, tables, x_T_scale = chosen.prepare(
            schedule, sampler_options.num_steps, sampler_options.edm
        )
        entries = None if chosen.entry_points is None else chosen.entry_points(tables)
        start = steering.first_iteration(timesteps, t_start, entries)
        timesteps = timesteps[start:]
        tables = {name: table[start:] for name, table in tables.items()}
    if x_start is not None:
        x_start = jnp.asarray(x_start, jnp.float32)
        if len(timesteps):
            first = jnp.asarray(first_index, jnp.int32)
            noise = initial_noise(key, first, sampler_options.shape)  # the drawn x_T's z
            t = jnp.full((sampler_options.shape[0],), timesteps[0], jnp.int32)
            x_T = q_sample(schedule, x_start, t, noise)
        else:
            x_T = x_start
    every = sampler_options.trajectory_every
    if not len(timesteps):  # t_start at or below the grid's last timestep: nothing to run
        x = jnp.asarray(x_T, jnp.float32)
        if every is None:
            return x
        empty = jnp.zeros((0, *sampler_options.shape), jnp.float32)
        return Trajectory(x, empty, empty, jnp.zeros((0,), jnp.int32))
    x, xs, pred_x0s = loop.run(
        model_fn,
        params,
        key,
        step_schedule,
        timesteps,
        tables,
        # EDM's settings are in the plan's tables: the loop need not recompile when they change.
        dataclasses.replace(sampler_options, edm=None),
        model_kwargs=model_kwargs,
        uncond_kwargs=uncond_kwargs,
        guidance_scale=guidance_scale,
        eta=eta,
        first_index=first_index,
        x_T_scale=x_T_scale,
        x_T=x_T,
        first_step=start,
        schedule=schedule,
        hook_kwargs=hook_kwargs,
    )
    if every is None:
        return x
    return Trajectory(x, xs, pred_x0s, jnp.asarray(timesteps[::every]))
