"""Whether a schedule reaches noise: the prior term L_T, its guard, and the parameterisations a
schedule with zero terminal SNR allows."""

from __future__ import annotations

import math

import numpy as np

from diffusion_jax import options
from diffusion_jax.schedules.tables import Schedule

__all__ = [
    "PRIOR_BPD_LIMIT",
    "check_parameterization",
    "check_prior",
    "prior_bpd",
    "terminal_alpha_bar",
]

PRIOR_BPD_LIMIT = 1e-3
"""The prior term L_T (bits/dim, unit data scale) above which :func:`get_schedule` warns.

Why 1e-3: (1) it is a tenth of the last digit to which bits/dim are reported (0.01), so a
schedule under it cannot move a published likelihood; (2) at unit data scale L_T is about
alpha_bar_T / (2 ln 2), so the limit is alpha_bar_T <= 1.4e-3: x_T keeps under 4% of the data's
amplitude (sqrt(alpha_bar_T)), well inside the noise the sampler starts from; (3) every named
schedule passes at any T with its default (scaled) range, the DDPM paper's setting (linear,
T = 1000) passes with a margin of 30, while the literal DDPM range at T = 200 (L_T = 0.10) fails
by two orders of magnitude. Images in [-1, 1] have a second moment under 1, so unit scale is the
conservative case for them.
"""


def terminal_alpha_bar(schedule: Schedule) -> float:
    """alpha_bar_T, the last ``alphas_cumprod`` of ``schedule``, as a Python float."""
    return float(np.asarray(schedule.alphas_cumprod)[-1])


def prior_bpd(schedule: Schedule, data_scale: float = 1.0) -> float:
    """The prior term L_T = KL(q(x_T | x_0) || N(0, I)) in bits/dim, for data of a given scale.

    q(x_T | x_0) = N(sqrt(abar_T) x_0, (1 - abar_T) I), and per dimension
    KL(N(m, v) || N(0, 1)) = (v + m^2 - 1 - log v) / 2. Averaged over data whose per-dimension
    second moment E[x_0^2] is ``data_scale**2``:

      L_T = (abar_T data_scale^2 - abar_T - log(1 - abar_T)) / (2 ln 2)  bits/dim,

    about abar_T data_scale^2 / (2 ln 2) for small abar_T; 0 with zero terminal SNR. It equals
    the mean of :func:`diffusion_jax.losses.prior_bpd` over such data. A host function (it reads
    the table's value): call it outside ``jit``.

    Args:
      schedule: the diffusion's tables.
      data_scale: the root mean square of one data coordinate, > 0 (1 for unit-variance data;
        images in [-1, 1] are at most 1).

    Returns:
      L_T in bits/dim, a Python float >= 0.

    Raises:
      ValueError: ``data_scale`` not finite and > 0.

    Example:
      >>> round(prior_bpd(get_schedule("linear", 200, scale_to_num_timesteps=False)), 3)
      0.102
    """
    if not (math.isfinite(data_scale) and data_scale > 0.0):
        raise ValueError(f"data_scale must be finite and > 0, got {data_scale=}.")
    alpha_bar = terminal_alpha_bar(schedule)
    # -abar - log(1 - abar) >= 0, summed from its two terms in float64 (abar^2 / 2 when small).
    nats = 0.5 * (alpha_bar * data_scale**2 - alpha_bar - math.log1p(-alpha_bar))
    return max(nats, 0.0) / math.log(2.0)


def check_prior(
    schedule: Schedule, data_scale: float = 1.0, limit: float = PRIOR_BPD_LIMIT
) -> float:
    """Checks that the forward process ends near N(0, I): L_T <= ``limit`` bits/dim.

    Args:
      schedule: the diffusion's tables.
      data_scale: the root mean square of one data coordinate, > 0 (see :func:`prior_bpd`).
      limit: the largest acceptable L_T in bits/dim (default :data:`PRIOR_BPD_LIMIT`).

    Returns:
      L_T in bits/dim.

    Raises:
      ValueError: L_T > ``limit``, giving alpha_bar_T, L_T and the fix.

    Example:
      >>> check_prior(get_schedule("linear", 200)) < PRIOR_BPD_LIMIT
      True
    """
    bpd = prior_bpd(schedule, data_scale)
    if bpd > limit:
        raise ValueError(
            f"The schedule (T = {schedule.num_timesteps}) ends at alpha_bar_T = "
            f"{terminal_alpha_bar(schedule):.3g}: its prior term L_T = {bpd:.3g} bits/dim at "
            f"data scale {data_scale:g} exceeds the limit {limit:g}, so sampling from N(0, I) "
            "starts from the wrong distribution. Fix: scale the betas to T "
            "(scale_to_num_timesteps=True, the default), use more steps, or the cosine schedule."
        )
    return bpd


def check_parameterization(schedule: Schedule, parameterization: options.Parameterization) -> None:
    """Refuses eps prediction on a schedule with zero terminal SNR (a host-side check).

    At t = T-1 such a schedule has abar_T = 0: x_T holds no signal and x0 = (x_T - eps) /
    sqrt(abar_T) divides by 0, so training and sampling with eps give NaN there.

    Args:
      schedule: the diffusion's tables.
      parameterization: ``eps``, ``x0`` or ``v``.

    Raises:
      ValueError: unknown parameterization, or ``eps`` with ``schedule.zero_terminal_snr``.

    Example:
      >>> check_parameterization(get_schedule("cosine", 100, zero_terminal_snr=True), "v")
    """
    options.check("parameterization", parameterization)
    if schedule.zero_terminal_snr and parameterization == "eps":
        raise ValueError(
            "zero terminal SNR needs v or x0 prediction: with eps, x0 = (x_T - eps) / "
            "sqrt(alpha_bar_T) divides by alpha_bar_T = 0 at the last step. Use "
            "parameterization 'v' (Lin et al. 2024) or 'x0', or zero_terminal_snr=False."
        )
