"""The forward process q(x_t | x_0), its posterior q(x_{t-1} | x_t, x_0), and the learned
reverse Gaussian p(x_{t-1} | x_t).

Pure, ``jit``-able functions of a :class:`~diffusion_jax.schedules.Schedule`. They take noise,
never keys. Data may have any shape ``[B, ...]`` (NHWC images and ``[B, D]`` points alike); ``t``
holds one int32 timestep in ``{0, ..., T-1}`` per example, shape ``[B]``.

The equations live in three modules, re-exported here as one namespace:
:mod:`~diffusion_jax.diffusion.forward` (q and its posterior),
:mod:`~diffusion_jax.diffusion.parameterization` (eps / x0 / v and their conversions) and
:mod:`~diffusion_jax.diffusion.reverse` (p, the ancestral and DDIM steps, x0 clipping).

Example:
  >>> schedule = get_schedule("linear")
  >>> x_t = q_sample(schedule, x0, t, noise)
  >>> mean, var, log_var, pred_x0 = p_mean_variance(schedule, model_fn(params, x_t, t), x_t, t)
"""

from diffusion_jax import options
from diffusion_jax.diffusion.forward import (
    checked,
    extract,
    q_mean_variance,
    q_posterior_mean_variance,
    q_sample,
)
from diffusion_jax.diffusion.parameterization import (
    mse_per_x0_mse,
    predict_eps_from_x0,
    predict_x0,
    predict_x0_from_eps,
    predict_x0_from_v,
    training_target,
    v_target,
)
from diffusion_jax.diffusion.reverse import (
    VARIANCES,
    ClipX0,
    clip_pred_x0,
    ddim_step,
    dynamic_threshold,
    p_mean_variance,
    p_sample,
    split_model_output,
)

__all__ = [
    "PARAMETERIZATIONS",
    "VARIANCES",
    "ClipX0",
    "checked",
    "clip_pred_x0",
    "ddim_step",
    "dynamic_threshold",
    "extract",
    "mse_per_x0_mse",
    "p_mean_variance",
    "p_sample",
    "predict_eps_from_x0",
    "predict_x0",
    "predict_x0_from_eps",
    "predict_x0_from_v",
    "q_mean_variance",
    "q_posterior_mean_variance",
    "q_sample",
    "split_model_output",
    "training_target",
    "v_target",
]

PARAMETERIZATIONS = options.PARAMETERIZATIONS
