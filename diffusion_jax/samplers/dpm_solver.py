"""DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2) on the discrete schedule: data prediction,
``lambda = log(alpha / sigma) = log_snr / 2``. Deterministic; the last step lands on x0.

The plan computes every coefficient in float64, including the order of each step, so the
update is one affine combination with no branch and the solver state is one ``[B, ...]``
array: the previous step's predicted x0.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax.samplers.base import Method, Step, predicted_x0
from diffusion_jax.schedules import Schedule
from diffusion_jax.timesteps import host_betas

__all__ = ["METHOD", "MIN_STEP_RATIO", "init_carry", "plan", "update"]

# Steps with r = h_{k-1} / h_k below this are first order: the multistep weight 1/(2r) would
# exceed 1.5 and extrapolate the history far from where it was measured (benchmarks/README.md).
MIN_STEP_RATIO = 1.0 / 3.0


def plan(schedule: Schedule, timesteps: np.ndarray) -> tuple[Schedule, dict[str, np.ndarray]]:
    """The float64 coefficients of each step's update.

    With alpha = sqrt(abar), sigma = sqrt(1 - abar) and h = lambda_prev - lambda, the update
    is ``x_next = sigma_ratio x + data_coef (w_cur x0_k + w_prev x0_{k-1})``: the 2M multistep
    combination ``(1 + 1/(2r)) x0_k - 1/(2r) x0_{k-1}`` with r = h_{k-1} / h_k, or first order
    (``w_prev = 0``) at the first step (no history), the last (h = inf, onto x0) and wherever
    ``r < MIN_STEP_RATIO`` (e.g. linspace's jump into t = 0).

    Args:
      schedule: the concrete schedule.
      timesteps: int32 ``[n]`` visited timesteps, strictly decreasing.

    Returns:
      ``(schedule, tables)`` with float64 ``[n]`` tables ``sigma_ratio``, ``data_coef``,
      ``w_cur`` and ``w_prev``.

    Example:
      >>> _, tables = plan(get_schedule("cosine", 100), timesteps_for(100, 10))
      >>> np.flatnonzero(tables["w_prev"] == 0)  # the first-order steps
      array([0, 8, 9])
    """
    betas = host_betas(schedule)
    n = timesteps.shape[0]
    t_prev = np.append(timesteps[1:], -1)  # -1: the last step lands on x0
    alphas_cumprod = np.append(np.cumprod(1.0 - betas), 1.0)  # index -1 -> abar = 1 (x0)
    alpha, sigma = np.sqrt(alphas_cumprod), np.sqrt(1.0 - alphas_cumprod)
    a_t, s_t, a_s, s_s = alpha[timesteps], sigma[timesteps], alpha[t_prev], sigma[t_prev]
    # exp(-h) is 0 at the final step (h = inf), and also at a first step where abar = 0 (zero
    # terminal SNR: sigma / alpha = inf there).
    with np.errstate(divide="ignore"):
        exp_neg_h = (s_s / a_s) / (s_t / a_t)
        h = -np.log(exp_neg_h)
    h_prev = np.append(np.inf, h[:-1])
    with np.errstate(invalid="ignore"):
        ratio = h_prev / h
    second_order = (np.arange(n) > 0) & (np.arange(n) < n - 1) & (ratio >= MIN_STEP_RATIO)
    inv_2r = np.where(second_order, 0.5 / np.where(second_order, ratio, 1.0), 0.0)
    return schedule, {
        "sigma_ratio": s_s / s_t,
        "data_coef": a_s * (1.0 - exp_neg_h),  # -alpha_prev (exp(-h) - 1); float64 keeps small h
        "w_cur": 1.0 + inv_2r,
        "w_prev": -inv_2r,
    }


def init_carry(x_T: jax.Array) -> jax.Array:
    """The previous step's predicted x0, zeros before the first step (its weight is 0)."""
    return jnp.zeros_like(x_T)


def update(step: Step, prev_x0: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """One DPM-Solver++(2M) step with the plan's coefficients.

    Args:
      step: the step; ``step.row`` holds the four coefficients of :func:`plan`.
      prev_x0: ``[B, ...]`` the previous step's predicted x0.

    Returns:
      ``(x_next, pred_x0, pred_x0)``: the new x, and this step's x0 (also the next carry).

    Example:
      >>> x_next, pred_x0, prev_x0 = update(step, prev_x0)
    """
    pred_x0 = predicted_x0(step)
    data = step.row["w_cur"] * pred_x0 + step.row["w_prev"] * prev_x0
    x_next = step.row["sigma_ratio"] * step.x + step.row["data_coef"] * data
    return x_next, pred_x0, pred_x0


METHOD = Method("dpm_solver++", plan=plan, update=update, init_carry=init_carry)
