"""Noise schedules: beta_t tables and every quantity the diffusion math derives from them.

Tables are built in float64 NumPy (``jnp.float64`` is silently float32 unless x64 is on) and
stored as float32 in a :class:`Schedule` pytree, which can be passed to ``jax.jit``, mapped with
``jax.tree.map`` and closed over in ``lax`` loops.

Convention: timesteps are int32 ``t`` in ``{0, ..., T-1}``; index ``t`` of every table is step
``t + 1`` of Ho et al. (2020), as in the DDPM reference code, improved-diffusion and diffusers.

Example:
  >>> schedule = get_schedule("cosine", num_timesteps=1000)
  >>> schedule.num_timesteps
  1000
  >>> schedule.alphas_cumprod.shape
  (1000,)
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import jax
import numpy as np

from diffusion_jax import options

__all__ = ["SCHEDULES", "Schedule", "beta_table", "from_betas", "get_schedule"]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Schedule:
    """Every per-timestep table of a discrete diffusion, float32, each of shape ``[T]``.

    Build one with :func:`get_schedule` or :func:`from_betas`; do not construct it by hand.
    """

    betas: jax.Array  # [T] beta_t
    alphas: jax.Array  # [T] 1 - beta_t
    alphas_cumprod: jax.Array  # [T] abar_t = prod_{s<=t} alpha_s
    alphas_cumprod_prev: jax.Array  # [T] abar_{t-1}, with abar_{-1} = 1
    sqrt_alphas_cumprod: jax.Array  # [T]
    sqrt_one_minus_alphas_cumprod: jax.Array  # [T]
    log_one_minus_alphas_cumprod: jax.Array  # [T]
    sqrt_recip_alphas_cumprod: jax.Array  # [T] 1 / sqrt(abar_t)
    sqrt_recipm1_alphas_cumprod: jax.Array  # [T] sqrt(1 / abar_t - 1)
    posterior_variance: jax.Array  # [T] beta_t (1 - abar_{t-1}) / (1 - abar_t); 0 at t = 0
    posterior_log_variance_clipped: jax.Array  # [T] log of the above, index 0 := index 1
    posterior_mean_coef1: jax.Array  # [T] coefficient of x0 in the posterior mean
    posterior_mean_coef2: jax.Array  # [T] coefficient of x_t in the posterior mean
    fixed_large_variance: jax.Array  # [T] beta_t, index 0 := posterior_variance[1]
    fixed_large_log_variance: jax.Array  # [T] log of the above
    log_snr: jax.Array  # [T] log(abar_t / (1 - abar_t))

    @property
    def num_timesteps(self) -> int:
        """T, the number of diffusion steps (static: it is the tables' shape)."""
        return self.betas.shape[0]


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def _linear(num_timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> np.ndarray:
    return np.linspace(beta_start, beta_end, num_timesteps, dtype=np.float64)


def _quadratic(num_timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> np.ndarray:
    return np.linspace(beta_start**0.5, beta_end**0.5, num_timesteps, dtype=np.float64) ** 2


def _sigmoid_schedule(
    num_timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02
) -> np.ndarray:
    ramp = _sigmoid(np.linspace(-6.0, 6.0, num_timesteps, dtype=np.float64))
    return beta_start + (beta_end - beta_start) * ramp


def _cosine(num_timesteps: int, s: float = 0.008, max_beta: float = 0.999) -> np.ndarray:
    steps = np.arange(num_timesteps + 1, dtype=np.float64) / num_timesteps
    alpha_bar = np.cos((steps + s) / (1.0 + s) * math.pi / 2.0) ** 2
    return np.minimum(1.0 - alpha_bar[1:] / alpha_bar[:-1], max_beta)


SCHEDULES: dict[str, Callable[..., np.ndarray]] = {
    "linear": _linear,
    "quadratic": _quadratic,
    "sigmoid": _sigmoid_schedule,
    "cosine": _cosine,
}
assert tuple(SCHEDULES) == options.SCHEDULE_NAMES


def beta_table(name: options.ScheduleName, num_timesteps: int = 1000, **kwargs) -> np.ndarray:
    """The float64 betas of a named schedule.

    Args:
      name: one of ``linear``, ``quadratic``, ``sigmoid``, ``cosine``.
      num_timesteps: T >= 1.
      **kwargs: the schedule's parameters: ``beta_start``, ``beta_end`` for linear, quadratic
        and sigmoid (defaults 1e-4 and 0.02); ``s`` (0.008) and ``max_beta`` (0.999) for cosine.

    Returns:
      float64 array of shape ``[num_timesteps]``.

    Raises:
      ValueError: unknown name, T < 1, or parameters the schedule does not take.
    """
    options.check("schedule", name)
    if isinstance(num_timesteps, bool) or not isinstance(num_timesteps, int | np.integer):
        raise ValueError(f"num_timesteps must be an int, got {num_timesteps!r}.")
    if num_timesteps < 1:
        raise ValueError(f"num_timesteps must be >= 1, got {num_timesteps=}.")
    try:
        return SCHEDULES[name](int(num_timesteps), **kwargs)
    except TypeError as err:
        raise ValueError(f"Bad parameters for schedule {name!r}: {kwargs}. ({err})") from None


def get_schedule(name: options.ScheduleName, num_timesteps: int = 1000, **kwargs) -> Schedule:
    """Builds a named schedule.

    Args:
      name: ``linear`` (DDPM), ``quadratic`` (DDPM's "quad"), ``sigmoid``, or ``cosine``
        (Nichol & Dhariwal 2021).
      num_timesteps: T >= 1.
      **kwargs: schedule parameters, see :func:`beta_table`.

    Returns:
      A :class:`Schedule` with float32 tables of shape ``[num_timesteps]``.

    Example:
      >>> sched = get_schedule("linear", 1000, beta_start=1e-4, beta_end=0.02)
    """
    return from_betas(beta_table(name, num_timesteps, **kwargs))


def from_betas(betas) -> Schedule:
    """Builds a :class:`Schedule` from any betas.

    Args:
      betas: array-like of shape ``[T]``, T >= 1, every value finite and in (0, 1).

    Returns:
      The schedule; all tables are computed in float64 and stored as float32.

    Raises:
      ValueError: wrong shape, non-finite values, or values outside (0, 1).
    """
    betas = np.asarray(betas, dtype=np.float64)
    if betas.ndim != 1:
        raise ValueError(f"betas must be 1-D of shape [T], got shape {betas.shape}.")
    if betas.shape[0] < 1:
        raise ValueError("betas must hold at least one timestep (T >= 1), got an empty array.")
    if not np.all(np.isfinite(betas)):
        bad = np.flatnonzero(~np.isfinite(betas))[:5].tolist()
        raise ValueError(f"betas must be finite; non-finite values at indices {bad}.")
    if np.any(betas <= 0.0) or np.any(betas >= 1.0):
        bad = np.flatnonzero((betas <= 0.0) | (betas >= 1.0))[:5].tolist()
        raise ValueError(
            f"betas must lie in the open interval (0, 1); out of range at indices {bad} "
            f"(values {betas[bad].tolist()})."
        )

    alphas = 1.0 - betas
    alphas_cumprod = np.cumprod(alphas)
    alphas_cumprod_prev = np.append(1.0, alphas_cumprod[:-1])
    posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
    # posterior_variance[0] is 0: its log is clipped to the next value (DDPM reference code).
    # With T = 1 there is no next value; beta_0 is the only variance on offer.
    first_var = posterior_variance[1] if betas.shape[0] > 1 else betas[0]
    posterior_variance_clipped = np.append(first_var, posterior_variance[1:])
    # improved-diffusion's fixed_large: beta_t, except at t = 0 where beta_0 would make the
    # decoder too sharp; it uses posterior_variance[1] for both variance and log-variance.
    fixed_large_variance = np.append(first_var, betas[1:])

    tables = dict(
        betas=betas,
        alphas=alphas,
        alphas_cumprod=alphas_cumprod,
        alphas_cumprod_prev=alphas_cumprod_prev,
        sqrt_alphas_cumprod=np.sqrt(alphas_cumprod),
        sqrt_one_minus_alphas_cumprod=np.sqrt(1.0 - alphas_cumprod),
        log_one_minus_alphas_cumprod=np.log(1.0 - alphas_cumprod),
        sqrt_recip_alphas_cumprod=np.sqrt(1.0 / alphas_cumprod),
        sqrt_recipm1_alphas_cumprod=np.sqrt(1.0 / alphas_cumprod - 1.0),
        posterior_variance=posterior_variance,
        posterior_log_variance_clipped=np.log(posterior_variance_clipped),
        posterior_mean_coef1=betas * np.sqrt(alphas_cumprod_prev) / (1.0 - alphas_cumprod),
        posterior_mean_coef2=(1.0 - alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - alphas_cumprod),
        fixed_large_variance=fixed_large_variance,
        fixed_large_log_variance=np.log(fixed_large_variance),
        log_snr=np.log(alphas_cumprod) - np.log1p(-alphas_cumprod),
    )
    return Schedule(**{k: np.asarray(v, dtype=np.float32) for k, v in tables.items()})
