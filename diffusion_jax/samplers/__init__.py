"""Samplers: ancestral DDPM, DDIM and DPM-Solver++(2M), with respacing and classifier-free guidance.

:func:`sample` validates its options and plans the run on the host (the timestep subsequence,
the respaced schedule, the solver's coefficients, all in float64 NumPy), then runs one compiled
``lax.scan`` with fixed-shape state. The loop compiles once per (shape, number of steps, static
options): keys, params, ``first_index``, ``guidance_scale``, ``eta``, the model's keyword
arrays and the schedule's values are traced, so changing them never retraces.

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

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax import _runtime, diffusion, options
from diffusion_jax.diffusion import ClipX0
from diffusion_jax.schedules import Schedule
from diffusion_jax.timesteps import (
    SPACINGS,
    check_num_steps,
    host_betas,
    respace,
    timesteps_for,
)

__all__ = [
    "METHODS",
    "SPACINGS",
    "Trajectory",
    "respace",
    "sample",
    "step_noise",
    "timesteps_for",
]

METHODS = options.SAMPLER_METHODS
# DPM-Solver++(2M) takes a first-order step where h_k > h_{k-1} / MIN_STEP_RATIO (the
# multistep correction weight 1/(2r) would exceed 1.5). On Gaussian data with the exact
# denoiser it cuts the error against the exact ODE solution 2-30x at 10-20 linspace steps
# (linear and cosine schedules); trailing spacings never trigger it there.
MIN_STEP_RATIO = 1.0 / 3.0
ModelFn = Callable[..., jax.Array]


class Trajectory(NamedTuple):
    """The samples and snapshots of every ``trajectory_every``-th step (K of them)."""

    samples: jax.Array  # [B, ...] the final samples
    xs: jax.Array  # [K, B, ...] x_t entering each recorded step; xs[0] is x_T
    pred_x0s: jax.Array  # [K, B, ...] the (clipped) x0 predicted at each recorded step
    timesteps: jax.Array  # [K] int32 original timesteps of the recorded steps


def step_noise(
    key: jax.Array, step: int | jax.Array, shape: tuple[int, ...], first_index: int | jax.Array = 0
) -> jax.Array:
    """The standard normal noise every sampler draws at one step.

    Example ``i`` gets ``normal(fold_in(fold_in(key, first_index + i), step), shape[1:])``, so
    the noise of an example depends on its index in the whole run, never on the batch it is in.

    Args:
      key: a PRNG key (``jax.random.key`` or a raw ``PRNGKey``).
      step: 0 for x_T; ``k + 1`` for the ``k``-th update.
      shape: ``[B, ...]``, the batch's shape.
      first_index: the run-wide index of the batch's first example.

    Returns:
      float32 noise of ``shape``.

    Example:
      >>> x_T = step_noise(jax.random.key(0), 0, (16, 32, 32, 3), first_index=16)
    """
    indices = first_index + jnp.arange(shape[0], dtype=jnp.int32)

    def one(index: jax.Array) -> jax.Array:
        example_key = jax.random.fold_in(jax.random.fold_in(key, index), step)
        return jax.random.normal(example_key, shape[1:], jnp.float32)

    return jax.vmap(one)(indices)


def _plan(schedule: Schedule, method: str, timesteps: np.ndarray) -> tuple[Schedule, dict]:
    """The schedule the update rule indexes and the per-step tables the loop scans over."""
    betas = host_betas(schedule)
    num_timesteps, n = betas.shape[0], timesteps.shape[0]
    tables = {"k": np.arange(n, dtype=np.int32), "t_model": timesteps}
    if method == "ddpm":
        if n == num_timesteps:  # all steps: the schedule itself, bit for bit
            return schedule, {**tables, "t_step": timesteps}
        # The respaced chain's index j is the j-th smallest visited timestep.
        return respace(schedule, timesteps), {**tables, "t_step": np.arange(n)[::-1]}
    t_prev = np.append(timesteps[1:], -1).astype(np.int32)  # -1: the last step lands on x0
    if method == "ddim":
        return schedule, {**tables, "t_prev": t_prev}
    # DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2) in float64: alpha = sqrt(abar),
    # sigma = sqrt(1 - abar), lambda = log(alpha / sigma) = log_snr / 2, h = lambda_prev - lambda.
    alphas_cumprod = np.append(np.cumprod(1.0 - betas), 1.0)  # index -1 -> abar = 1 (x0)
    alpha, sigma = np.sqrt(alphas_cumprod), np.sqrt(1.0 - alphas_cumprod)
    a_t, s_t, a_s, s_s = alpha[timesteps], sigma[timesteps], alpha[t_prev], sigma[t_prev]
    exp_neg_h = (s_s / a_s) / (s_t / a_t)  # exp(-h), 0 at the final step (h = inf)
    with np.errstate(divide="ignore"):
        h = -np.log(exp_neg_h)
    # 2M multistep: D = (1 + 1/(2r)) x0_k - 1/(2r) x0_{k-1}, r = h_{k-1} / h_k. The first step
    # has no history and the last (h = inf, onto x0) must be first order. A step much longer
    # in lambda than the one before (r < MIN_STEP_RATIO, e.g. linspace's jump into t = 0)
    # would extrapolate the history far beyond where it was measured and overshoot, so it is
    # first order too. The coefficients encode the order: the loop has no branch.
    h_prev = np.append(np.inf, h[:-1])
    with np.errstate(invalid="ignore"):
        ratio = h_prev / h
    second_order = (np.arange(n) > 0) & (np.arange(n) < n - 1) & (ratio >= MIN_STEP_RATIO)
    inv_2r = np.where(second_order, 0.5 / np.where(second_order, ratio, 1.0), 0.0)
    tables.update(
        sigma_ratio=s_s / s_t,
        data_coef=a_s * (1.0 - exp_neg_h),  # -alpha_prev (exp(-h) - 1); float64 keeps small h
        w_cur=1.0 + inv_2r,
        w_prev=-inv_2r,
    )
    return schedule, tables


# x_T is drawn by its own small program, compiled once per shape: deterministic loops then
# hold no PRNG code, which XLA:CPU takes about a second to compile.
_initial_noise = _runtime.jit(
    lambda key, first_index, shape: step_noise(key, 0, shape, first_index), static_argnums=2
)

_STATIC = (
    "model_fn",
    "method",
    "shape",
    "parameterization",
    "variance",
    "clip_x0",
    "add_noise",
    "guided",
    "trajectory_every",
)


@_runtime.jit(static_argnames=_STATIC)
def _sample_loop(
    params: Any,
    x_T: jax.Array,
    key: jax.Array,
    first_index: jax.Array,
    step_schedule: Schedule,
    tables: dict[str, jax.Array],
    model_kwargs: dict[str, Any],
    uncond_kwargs: dict[str, Any] | None,
    guidance_scale: jax.Array,
    eta: jax.Array,
    *,
    model_fn: ModelFn,
    method: str,
    shape: tuple[int, ...],
    parameterization: str,
    variance: str,
    clip_x0: ClipX0,
    add_noise: bool,
    guided: bool,
    trajectory_every: int | None,
) -> tuple[jax.Array, jax.Array | None, jax.Array | None]:
    """The whole reverse process as one ``lax.scan``; ``trajectory_every=None`` records nothing."""
    batch, ndim = shape[0], len(shape)
    num_steps = tables["k"].shape[0]

    def model_output(x: jax.Array, t: jax.Array) -> jax.Array:
        if not guided:
            return model_fn(params, x, t, **model_kwargs).astype(x.dtype)
        # One call on [cond; uncond]: twice the batch, half the dispatches of two calls.
        both = lambda c, u: jnp.concatenate([c, u], axis=0)
        kwargs = jax.tree.map(both, model_kwargs, uncond_kwargs)
        out = model_fn(params, both(x, x), both(t, t), **kwargs).astype(x.dtype)
        cond, uncond = jnp.split(out, 2, axis=0)
        mean_cond, var_cond = diffusion.split_model_output(cond, x, variance)
        mean_uncond, _ = diffusion.split_model_output(uncond, x, variance)
        # eps, x0 and v are affine in one another at fixed (x_t, t) and the weights
        # (1 - w, w) sum to 1, so mixing any of them is the same as mixing eps.
        mixed = mean_uncond + guidance_scale * (mean_cond - mean_uncond)
        return mixed if var_cond is None else jnp.concatenate([mixed, var_cond], axis=-1)

    def per_example(value: jax.Array) -> jax.Array:
        return jnp.full((batch,), value, jnp.int32)

    def body(carry, step):
        x, prev_x0, xs, pred_x0s = carry
        t = per_example(step["t_model"])
        out = model_output(x, t)
        if add_noise:
            noise = step_noise(key, step["k"] + 1, shape, first_index)
        else:
            noise = jnp.zeros(shape, jnp.float32)
        if method == "ddpm":
            t_step = per_example(step["t_step"])
            mean, _, log_variance, pred_x0 = diffusion.p_mean_variance(
                step_schedule,
                out,
                x,
                t_step,
                parameterization=parameterization,
                variance=variance,
                clip_x0=clip_x0,
            )
            # p_sample's update, kept here because the trajectory wants pred_x0 too.
            nonzero = (t_step != 0).astype(x.dtype).reshape((-1,) + (1,) * (ndim - 1))
            x_next = mean + nonzero * jnp.exp(0.5 * log_variance) * noise
        else:
            mean_out, _ = diffusion.split_model_output(out, x, variance)
            pred_x0 = diffusion.clip_pred_x0(
                diffusion.predict_x0(step_schedule, mean_out, x, t, parameterization), clip_x0
            )
            if method == "ddim":
                x_next = diffusion.ddim_step(
                    step_schedule,
                    out,
                    x,
                    t,
                    per_example(step["t_prev"]),
                    noise,
                    eta=eta,
                    parameterization=parameterization,
                    variance=variance,
                    clip_x0=clip_x0,
                )
            else:
                data = step["w_cur"] * pred_x0 + step["w_prev"] * prev_x0
                x_next = step["sigma_ratio"] * x + step["data_coef"] * data
                prev_x0 = pred_x0
        if trajectory_every is not None:
            # Steps between snapshots write to a spare last slot: no read-modify-write.
            k = step["k"]
            slot = jnp.where(k % trajectory_every == 0, k // trajectory_every, xs.shape[0] - 1)
            xs = jax.lax.dynamic_update_index_in_dim(xs, x, slot, 0)
            pred_x0s = jax.lax.dynamic_update_index_in_dim(pred_x0s, pred_x0, slot, 0)
        return (x_next, prev_x0, xs, pred_x0s), None

    prev_x0 = jnp.zeros(shape, jnp.float32) if method == "dpm_solver++" else None
    xs = pred_x0s = None
    if trajectory_every is not None:
        num_frames = -(-num_steps // trajectory_every)
        xs = pred_x0s = jnp.zeros((num_frames + 1, *shape), jnp.float32)
    (x, _, xs, pred_x0s), _ = jax.lax.scan(body, (x_T, prev_x0, xs, pred_x0s), tables)
    if trajectory_every is not None:
        xs, pred_x0s = xs[:-1], pred_x0s[:-1]
    return x, xs, pred_x0s


def _check_kwargs(name: str, kwargs: Any, batch: int) -> None:
    for path, leaf in jax.tree_util.tree_leaves_with_path(kwargs):
        if jnp.ndim(leaf) < 1 or jnp.shape(leaf)[0] != batch:
            raise ValueError(
                f"With guidance every array of {name} needs a leading batch axis of size "
                f"{batch}; {name}{jax.tree_util.keystr(path)} has shape {jnp.shape(leaf)}."
            )


def sample(
    model_fn: ModelFn,
    params: Any,
    schedule: Schedule,
    key: jax.Array,
    shape: tuple[int, ...],
    *,
    method: str = "ddpm",
    num_steps: int | None = None,
    timestep_spacing: str = "linspace",
    eta: float = 0.0,
    parameterization: str = "eps",
    variance: str = "fixed_small",
    clip_x0: ClipX0 = True,
    model_kwargs: dict[str, Any] | None = None,
    guidance_scale: float | jax.Array | None = None,
    uncond_kwargs: dict[str, Any] | None = None,
    return_trajectory: bool = False,
    trajectory_every: int | None = None,
    first_index: int | jax.Array = 0,
) -> jax.Array | Trajectory:
    """Draws samples by running the reverse process from pure noise.

    Methods:
      * ``ddpm``: ancestral sampling (Ho et al. 2020) for every parameterisation and variance
        of the core. With ``num_steps < T`` it samples the respaced chain of :func:`respace`
        (improved-diffusion), whose learned variance interpolates the respaced betas.
      * ``ddim``: Song et al. (2021) with any ``eta`` in [0, 1]; ``eta=1`` with all T steps is
        ancestral sampling with ``fixed_small`` (the same noise gives the same samples).
      * ``dpm_solver++``: DPM-Solver++(2M) (Lu et al. 2022) on the discrete schedule, data
        prediction, ``lambda = log_snr / 2``; first and last steps are first order, the last
        lands on x0. Deterministic.

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
      eta: DDIM stochasticity in [0, 1], a Python number; only for ``method="ddim"``.
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

    Returns:
      float32 samples of ``shape``, or a :class:`Trajectory` with ``return_trajectory``.

    Raises:
      ValueError: an unknown method, spacing, parameterisation or variance; ``num_steps``
        outside [1, T]; ``eta`` outside [0, 1] or given to another method; guidance without
        ``uncond_kwargs`` (or the reverse) or with mismatched kwargs; a bad shape.

    Example:
      >>> labels = jnp.arange(16) % 10
      >>> images = sample(model_fn, params, schedule, jax.random.key(0), (16, 32, 32, 3),
      ...                 method="ddim", num_steps=50, model_kwargs={"y": labels},
      ...                 guidance_scale=3.0, uncond_kwargs={"y": jnp.full(16, 10)})
    """
    options.check("method", method)
    options.check("parameterization", parameterization)
    options.check("variance", variance)
    if not isinstance(schedule, Schedule):
        raise ValueError(f"schedule must be a Schedule, got {type(schedule).__name__}.")
    shape = tuple(shape)
    if len(shape) < 2 or not all(isinstance(d, int | np.integer) and d > 0 for d in shape):
        raise ValueError(f"shape must be [B, ...] with at least 2 positive ints, got {shape}.")
    shape = tuple(int(d) for d in shape)
    num_timesteps = schedule.num_timesteps
    num_steps = num_timesteps if num_steps is None else check_num_steps(num_timesteps, num_steps)
    timesteps = timesteps_for(num_timesteps, num_steps, timestep_spacing)
    eta = float(eta)
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"eta must be in [0, 1], got {eta=}.")
    if eta != 0.0 and method != "ddim":
        raise ValueError(f"eta only applies to method='ddim', got {eta=} with {method=}.")
    if (guidance_scale is None) != (uncond_kwargs is None):
        raise ValueError(
            "Classifier-free guidance needs both guidance_scale and uncond_kwargs (e.g. "
            f"{{'y': null_labels}}); got {guidance_scale=} and uncond_kwargs="
            f"{'None' if uncond_kwargs is None else 'given'}."
        )
    model_kwargs = {} if model_kwargs is None else dict(model_kwargs)
    guided = guidance_scale is not None
    if guided:
        uncond_kwargs = dict(uncond_kwargs)
        if jax.tree.structure(model_kwargs) != jax.tree.structure(uncond_kwargs):
            raise ValueError(
                "uncond_kwargs must have the structure of model_kwargs: "
                f"{jax.tree.structure(uncond_kwargs)} vs {jax.tree.structure(model_kwargs)}."
            )
        _check_kwargs("model_kwargs", model_kwargs, shape[0])
        _check_kwargs("uncond_kwargs", uncond_kwargs, shape[0])
    if isinstance(clip_x0, list):
        clip_x0 = tuple(clip_x0)
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

    step_schedule, tables = _plan(schedule, method, timesteps)
    tables = {
        name: np.asarray(
            v, np.int32 if name in ("k", "t_model", "t_step", "t_prev") else np.float32
        )
        for name, v in tables.items()
    }
    first_index = jnp.asarray(first_index, jnp.int32)
    x, xs, pred_x0s = _sample_loop(
        params,
        _initial_noise(key, first_index, shape),
        key,
        first_index,
        step_schedule,
        tables,
        model_kwargs,
        uncond_kwargs if guided else None,
        jnp.asarray(1.0 if guidance_scale is None else guidance_scale, jnp.float32),
        jnp.asarray(eta, jnp.float32),
        model_fn=model_fn,
        method=method,
        shape=shape,
        parameterization=parameterization,
        variance=variance,
        clip_x0=clip_x0,
        add_noise=method == "ddpm" or (method == "ddim" and eta > 0.0),
        guided=guided,
        trajectory_every=trajectory_every if return_trajectory else None,
    )
    if not return_trajectory:
        return x
    return Trajectory(x, xs, pred_x0s, jnp.asarray(timesteps[::trajectory_every]))
