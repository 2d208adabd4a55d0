"""The named schedules (``linear``, ``quadratic``, ``sigmoid``, ``cosine``), their scaling to any T,
the zero-terminal-SNR rescaling, and :func:`get_schedule`."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import numpy as np

from diffusion_jax import options
from diffusion_jax.schedules.prior import PRIOR_BPD_LIMIT, prior_bpd, terminal_alpha_bar
from diffusion_jax.schedules.tables import Schedule, check_open_unit_interval, from_betas

__all__ = ["SCHEDULES", "beta_table", "get_schedule", "rescale_zero_terminal_snr"]

# Scaling by 1000 / T can push a beta past 1 at small T; it is capped where improved-diffusion
# caps the cosine schedule.
_MAX_SCALED_BETA = 0.999
_REFERENCE_NUM_TIMESTEPS = 1000  # the T at which DDPM's beta range is defined


def _beta_range(
    num_timesteps: int, beta_start: float, beta_end: float, scale_to_num_timesteps: bool
) -> tuple[float, float, float]:
    """Checks the literal range and returns (start, end, cap), scaled by 1000 / T if asked."""
    if not (0.0 < beta_start < 1.0 and 0.0 < beta_end < 1.0):  # also refuses NaN
        raise ValueError(
            "beta_start and beta_end must be finite and lie in the open interval (0, 1), got "
            f"{beta_start=}, {beta_end=}."
        )
    if not scale_to_num_timesteps:
        return beta_start, beta_end, math.inf
    scale = _REFERENCE_NUM_TIMESTEPS / num_timesteps
    # At T >= 1000 the scaled range stays inside (0, 1): no cap, so T = 1000 is bit-identical.
    cap = _MAX_SCALED_BETA if scale > 1.0 else math.inf
    return beta_start * scale, beta_end * scale, cap


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def _linear(
    num_timesteps: int,
    beta_start: float = 1e-4,
    beta_end: float = 0.02,
    scale_to_num_timesteps: bool = True,
) -> np.ndarray:
    start, end, cap = _beta_range(num_timesteps, beta_start, beta_end, scale_to_num_timesteps)
    return np.minimum(np.linspace(start, end, num_timesteps, dtype=np.float64), cap)


def _quadratic(
    num_timesteps: int,
    beta_start: float = 1e-4,
    beta_end: float = 0.02,
    scale_to_num_timesteps: bool = True,
) -> np.ndarray:
    start, end, cap = _beta_range(num_timesteps, beta_start, beta_end, scale_to_num_timesteps)
    betas = np.linspace(start**0.5, end**0.5, num_timesteps, dtype=np.float64) ** 2
    return np.minimum(betas, cap)


def _sigmoid_schedule(
    num_timesteps: int,
    beta_start: float = 1e-4,
    beta_end: float = 0.02,
    scale_to_num_timesteps: bool = True,
) -> np.ndarray:
    start, end, cap = _beta_range(num_timesteps, beta_start, beta_end, scale_to_num_timesteps)
    ramp = _sigmoid(np.linspace(-6.0, 6.0, num_timesteps, dtype=np.float64))
    return np.minimum(start + (end - start) * ramp, cap)


def _cosine(
    num_timesteps: int,
    s: float = 0.008,
    max_beta: float = 0.999,
    scale_to_num_timesteps: bool = True,
) -> np.ndarray:
    del scale_to_num_timesteps  # defined on t / T: the same curve at every T
    if not 0.0 < max_beta < 1.0:
        raise ValueError(f"max_beta must lie in the open interval (0, 1), got {max_beta=}.")
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


def beta_table(
    name: options.ScheduleName,
    num_timesteps: int = 1000,
    *,
    scale_to_num_timesteps: bool = True,
    **kwargs,
) -> np.ndarray:
    """The float64 betas of a named schedule.

    Args:
      name: one of ``linear``, ``quadratic``, ``sigmoid``, ``cosine``.
      num_timesteps: T >= 1.
      scale_to_num_timesteps: for linear, quadratic and sigmoid, multiply ``beta_start`` and
        ``beta_end`` by 1000 / T (improved-diffusion's convention; a no-op at T = 1000), capping
        the betas at 0.999; ``False`` keeps the literal range. Cosine ignores it.
      **kwargs: the schedule's parameters: ``beta_start``, ``beta_end`` for linear, quadratic
        and sigmoid (defaults 1e-4 and 0.02, the range at T = 1000, each in (0, 1)); ``s``
        (0.008) and ``max_beta`` (0.999, in (0, 1)) for cosine.

    Returns:
      float64 array of shape ``[num_timesteps]``.

    Raises:
      ValueError: unknown name, T < 1, or parameters the schedule does not take or out of range.

    Example:
      >>> float(beta_table("linear", 200)[-1])  # 0.02 * 1000 / 200
      0.1
    """
    options.check("schedule", name)
    if isinstance(num_timesteps, bool) or not isinstance(num_timesteps, int | np.integer):
        raise ValueError(f"num_timesteps must be an int, got {num_timesteps!r}.")
    if num_timesteps < 1:
        raise ValueError(f"num_timesteps must be >= 1, got {num_timesteps=}.")
    try:
        return SCHEDULES[name](
            int(num_timesteps), scale_to_num_timesteps=bool(scale_to_num_timesteps), **kwargs
        )
    except TypeError as err:
        raise ValueError(f"Bad parameters for schedule {name!r}: {kwargs}. ({err})") from None


def rescale_zero_terminal_snr(betas) -> np.ndarray:
    """Rescales betas so the last step has zero SNR (Lin et al. 2024, Algorithm 1).

    sqrt(abar_t) is shifted so its last value is 0 and scaled so its first is unchanged:
    ``sqrt(abar_t) <- (sqrt(abar_t) - sqrt(abar_T)) * sqrt(abar_1) / (sqrt(abar_1) -
    sqrt(abar_T))``; the betas are then read back from the ratios. The last beta is exactly 1.
    A model trained on the result needs v or x0 prediction (see :func:`check_parameterization`).

    Args:
      betas: array-like of shape ``[T]``, T >= 2, values in (0, 1).

    Returns:
      float64 betas of shape ``[T]``: in (0, 1) except the last, which is 1.

    Raises:
      ValueError: T < 2 or betas outside (0, 1).

    Example:
      >>> float(rescale_zero_terminal_snr(beta_table("linear", 1000))[-1])
      1.0
    """
    betas = np.asarray(betas, dtype=np.float64)
    if betas.ndim != 1 or betas.shape[0] < 2:
        raise ValueError(
            f"zero terminal SNR needs betas of shape [T] with T >= 2, got shape {betas.shape}."
        )
    check_open_unit_interval(betas)
    sqrt_alphas_cumprod = np.sqrt(np.cumprod(1.0 - betas))
    first, last = sqrt_alphas_cumprod[0], sqrt_alphas_cumprod[-1]
    sqrt_alphas_cumprod = (sqrt_alphas_cumprod - last) * (first / (first - last))
    alphas_cumprod = sqrt_alphas_cumprod**2
    alphas = np.append(alphas_cumprod[0], alphas_cumprod[1:] / alphas_cumprod[:-1])
    return 1.0 - alphas


def get_schedule(
    name: options.ScheduleName,
    num_timesteps: int = 1000,
    *,
    scale_to_num_timesteps: bool = True,
    zero_terminal_snr: bool = False,
    **kwargs,
) -> Schedule:
    """Builds a named schedule, warning if it ends far from N(0, I).

    The DDPM-family schedules scale their beta range by 1000 / T unless
    ``scale_to_num_timesteps=False`` (see the module docstring, with its table of
    alpha_bar_T). A ``UserWarning`` is issued when the prior term :func:`prior_bpd` at unit data
    scale exceeds :data:`PRIOR_BPD_LIMIT` (1e-3 bits/dim): the message gives alpha_bar_T, L_T
    and the fix.

    Args:
      name: ``linear`` (DDPM), ``quadratic`` (DDPM's "quad"), ``sigmoid``, or ``cosine``
        (Nichol & Dhariwal 2021).
      num_timesteps: T >= 1 (T >= 2 with ``zero_terminal_snr``).
      scale_to_num_timesteps: scale ``beta_start``/``beta_end`` by 1000 / T (default, as
        improved-diffusion); ``False`` uses the literal range.
      zero_terminal_snr: rescale with :func:`rescale_zero_terminal_snr`, so abar_T = 0; the
        model then needs v or x0 prediction.
      **kwargs: schedule parameters, see :func:`beta_table`.

    Returns:
      A :class:`Schedule` with float32 tables of shape ``[num_timesteps]``.

    Raises:
      ValueError: see :func:`beta_table` and :func:`rescale_zero_terminal_snr`.

    Example:
      >>> sched = get_schedule("linear", 200)  # betas 5e-4 .. 0.1: abar_T = 3.0e-5
      >>> paper = get_schedule("linear", 200, scale_to_num_timesteps=False)  # warns: 0.13
      >>> ztsnr = get_schedule("linear", 1000, zero_terminal_snr=True)  # abar_T = 0
    """
    betas = beta_table(name, num_timesteps, scale_to_num_timesteps=scale_to_num_timesteps, **kwargs)
    if zero_terminal_snr:
        betas = rescale_zero_terminal_snr(betas)
    schedule = from_betas(betas)
    bpd = prior_bpd(schedule)
    if bpd > PRIOR_BPD_LIMIT:
        warnings.warn(
            f"Schedule {name!r} with T = {num_timesteps} ends at alpha_bar_T = "
            f"{terminal_alpha_bar(schedule):.3g}: its prior term L_T = {bpd:.3g} bits/dim at "
            f"unit data scale exceeds {PRIOR_BPD_LIMIT:g}, so sampling from N(0, I) starts from "
            "the wrong distribution. Fix: scale the betas to T (scale_to_num_timesteps=True), "
            "use more steps, or the cosine schedule.",
            UserWarning,
            stacklevel=2,
        )
    return schedule
