"""EDM's samplers (Karras et al. 2022, Algorithms 1 and 2): Heun and Euler on the sigma grid.

A discrete VP model becomes EDM's denoiser through ``sigma_t = sqrt((1 - abar_t) / abar_t)``
and ``x_edm = x_t / sqrt(abar_t)``: ``D(x_edm; sigma_t)`` is the (clipped) x0 the model predicts
at ``(x_edm sqrt(abar_t), t)``. The probability-flow ODE is ``dx_edm / dsigma = (x_edm - D) /
sigma``.

The grid is EDM's rho-spaced one (eq. 5) between ``sigma_max`` and ``sigma_min``, each point
snapped to the model's discrete sigma nearest in log-sigma, then 0; as k-diffusion does for
discrete models, every model evaluation is then exact (no interpolation between timesteps).
Points that snap onto the same timestep merge, so ``num_steps`` near T may give fewer steps.
The stochastic variant's churn (``S_churn > 0``) raises sigma_i to ``sigma_i (1 + gamma_i)``,
snapped the same way (at least sigma_i): gamma is quantised to the schedule's sigmas, so the
added noise ``sqrt(sigma_hat^2 - sigma_i^2) S_noise`` is exact for the sigma the model sees.

The run is one scan iteration per model evaluation, so the loop's protocol (one guided model
call per iteration, on the loop's x) is unchanged: Heun's N steps are N predictor iterations
and N - 1 corrector iterations (the last step, onto sigma = 0, is Euler as in EDM), i.e.
2N - 1 evaluations; Euler's are N. The loop's x is always the model's input x_t at the
iteration's timestep, so a trajectory records x_t like the other methods (one frame per
evaluation), and the final x (sigma = 0) is x0. Every iteration is the same affine update with
the plan's coefficients (no branch):

    x_in = x / sqrt(abar_t)                      # x_edm at the evaluation's sigma
    d = (x_in - D(x_in)) / sigma_in
    x_edm = w_in x_in + w_hat x_hat + h (a_new d + a_old d_prev)
    x_next = (x_edm + churn_std noise) * sqrt(abar_next)

with ``(x_hat, d_prev)`` the predictor's state carried to the corrector.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax.samplers.base import Method, Step, predicted_x0
from diffusion_jax.schedules import Schedule
from diffusion_jax.timesteps import host_betas

__all__ = [
    "EULER",
    "HEUN",
    "EDMOptions",
    "check",
    "entry_points",
    "grid",
    "prepare_euler",
    "prepare_heun",
]


DEFAULT_SIGMA_MAX = 80.0  # EDM's sigma_max (Karras et al. 2022, Table 1)


@dataclasses.dataclass(frozen=True)
class EDMOptions:  # the S_* names are the paper's
    """EDM's sampler settings (Karras et al. 2022, Table 1 and Algorithm 2); hashable.

    The defaults are EDM's deterministic sampler (Algorithm 1) from sigma = 80 (EDM's
    ``sigma_max``, or the schedule's largest finite sigma if that is smaller) down to the
    schedule's smallest sigma. Starting from the schedule's largest sigma instead (``sigma_max=
    math.inf`` clips to it) spends most of a short run's steps where the image is pure noise:
    a cosine schedule reaches sigma = 2e4, and on the digits model of ``benchmarks/README.md``
    Heun with 10 steps then gave 8% recognisable digits against 66% from sigma = 80.

    Attributes:
      sigma_min: the grid's smallest sigma; ``None`` is the schedule's smallest (t = 0).
      sigma_max: the grid's largest sigma; ``None`` is ``min(80, the schedule's largest finite
        sigma)``; ``math.inf`` is the schedule's largest finite sigma.
      rho: the grid's spacing exponent (eq. 5; 7 in EDM).
      S_churn: total churn; 0 is deterministic, > 0 draws noise at each step with churn.
      S_tmin, S_tmax: churn applies where ``S_tmin <= sigma_i <= S_tmax``.
      S_noise: the churn noise's scale (slightly above 1 in EDM's tuned settings).

    Example:
      >>> samples = sample(model_fn, params, schedule, key, (16, 2), method="heun",
      ...                  num_steps=18, edm=EDMOptions(S_churn=40.0, S_tmin=0.05, S_tmax=50))
    """

    sigma_min: float | None = None
    sigma_max: float | None = None
    rho: float = 7.0
    S_churn: float = 0.0
    S_tmin: float = 0.0
    S_tmax: float = math.inf
    S_noise: float = 1.0


def _sigmas(schedule: Schedule) -> np.ndarray:
    """float64 ``[T]`` sigma_t = sqrt((1 - abar_t) / abar_t), increasing (inf where abar = 0)."""
    alphas_cumprod = np.cumprod(1.0 - host_betas(schedule))
    with np.errstate(divide="ignore"):
        return np.sqrt((1.0 - alphas_cumprod) / alphas_cumprod)


def _range(schedule: Schedule) -> tuple[float, float]:
    sigmas = _sigmas(schedule)
    finite = sigmas[np.isfinite(sigmas)]
    return float(finite[0]), float(finite[-1])


def check(schedule: Schedule, edm: EDMOptions) -> None:
    """Checks ``edm`` against the schedule's sigmas.

    Raises:
      ValueError: not an :class:`EDMOptions`; a sigma bound outside the schedule's sigmas or
        ``sigma_min > sigma_max``; ``rho <= 0``; negative ``S_churn`` or ``S_noise``;
        ``S_tmin > S_tmax``.
    """
    if not isinstance(edm, EDMOptions):
        raise ValueError(f"edm must be a samplers.EDMOptions, got {type(edm).__name__}.")
    low, high = _range(schedule)
    for name in ("sigma_min", "sigma_max"):
        value = getattr(edm, name)
        if name == "sigma_max" and value == math.inf:
            continue
        if value is not None and not low * (1 - 1e-6) <= value <= high * (1 + 1e-6):
            raise ValueError(
                f"edm.{name} must lie within the schedule's sigmas [{low:.4g}, {high:.4g}] "
                f"(a discrete model has no other noise levels), got {name}={value}."
            )
    sigma_min, sigma_max = _bounds(schedule, edm)
    if sigma_min > sigma_max:
        raise ValueError(f"edm.sigma_min must be <= sigma_max, got {sigma_min=}, {sigma_max=}.")
    if not edm.rho > 0:
        raise ValueError(f"edm.rho must be > 0, got rho={edm.rho}.")
    if not (edm.S_churn >= 0 and edm.S_noise >= 0):
        raise ValueError(
            f"edm.S_churn and S_noise must be >= 0, got {edm.S_churn=}, {edm.S_noise=}."
        )
    if not edm.S_tmin <= edm.S_tmax:
        raise ValueError(f"edm.S_tmin must be <= S_tmax, got {edm.S_tmin=}, {edm.S_tmax=}.")


def _bounds(schedule: Schedule, edm: EDMOptions) -> tuple[float, float]:
    low, high = _range(schedule)
    sigma_max = min(DEFAULT_SIGMA_MAX, high) if edm.sigma_max is None else min(edm.sigma_max, high)
    return (low if edm.sigma_min is None else edm.sigma_min, sigma_max)


def _nearest(sigmas: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """The timesteps whose sigma is nearest each target in log-sigma."""
    with np.errstate(divide="ignore"):
        distance = np.abs(np.log(sigmas)[None, :] - np.log(targets)[:, None])
    return np.argmin(np.where(np.isfinite(distance), distance, np.inf), axis=1)


def grid(schedule: Schedule, num_steps: int, edm: EDMOptions) -> np.ndarray:
    """The grid's timesteps: EDM's eq. 5 with ``rho``, snapped, consecutive duplicates merged.

    Returns:
      int64 ``[n]`` strictly decreasing timesteps, ``n <= num_steps`` (sigma = 0 follows).

    Example:
      >>> grid(get_schedule("linear", 1000), 18, EDMOptions())[:3]
    """
    sigma_min, sigma_max = _bounds(schedule, edm)
    fraction = np.arange(num_steps) / max(num_steps - 1, 1)
    inv_rho = 1.0 / edm.rho
    targets = (sigma_max**inv_rho + fraction * (sigma_min**inv_rho - sigma_max**inv_rho)) ** edm.rho
    steps = _nearest(_sigmas(schedule), targets)
    return steps[np.append(True, np.diff(steps) != 0)]


def _churned(schedule: Schedule, steps: np.ndarray, num_steps: int, edm: EDMOptions):
    """Each step's churned timestep t_hat >= t_i (Algorithm 2's sigma_hat, snapped)."""
    sigmas = _sigmas(schedule)
    sigma = sigmas[steps]
    in_range = (edm.S_tmin <= sigma) & (sigma <= edm.S_tmax)
    gamma = np.where(in_range, min(edm.S_churn / num_steps, math.sqrt(2.0) - 1.0), 0.0)
    churned = _nearest(sigmas, sigma * (1.0 + gamma))
    return np.maximum(churned, steps)


def _prepare(schedule: Schedule, num_steps: int, edm: EDMOptions, heun: bool):
    """(model timesteps per iteration, schedule, tables, x_T scale); see the module docstring."""
    sigmas = _sigmas(schedule)
    abar = np.cumprod(1.0 - host_betas(schedule))
    steps = grid(schedule, num_steps, edm)
    hats = _churned(schedule, steps, len(steps), edm) if edm.S_churn > 0 else steps
    n = len(steps)
    sigma_next = np.append(sigmas[steps[1:]], 0.0)
    scale_next_grid = np.append(np.sqrt(abar[steps[1:]]), 1.0)  # x_t = x_edm sqrt(abar)
    churn_std = np.append(
        np.sqrt(np.maximum(sigmas[hats[1:]] ** 2 - sigmas[steps[1:]] ** 2, 0.0)) * edm.S_noise, 0.0
    )
    scale_next_hat = np.append(np.sqrt(abar[hats[1:]]), 1.0)
    rows = []
    for i in range(n):
        h = sigma_next[i] - sigmas[hats[i]]
        corrects = heun and i < n - 1
        # Predictor: from x_hat at sigma_hat to sigma_{i+1}; if a corrector follows, it is
        # evaluated at the grid point, else the next step's churn follows.
        rows.append(
            dict(
                t=hats[i],
                c_in=1.0 / np.sqrt(abar[hats[i]]),
                sigma_in=sigmas[hats[i]],
                w_in=1.0,
                w_hat=0.0,
                h=h,
                a_new=1.0,
                a_old=0.0,
                churn_std=0.0 if corrects else churn_std[i],
                c_out=scale_next_grid[i] if corrects else scale_next_hat[i],
            )
        )
        if corrects:
            rows.append(
                dict(
                    t=steps[i + 1],
                    c_in=1.0 / np.sqrt(abar[steps[i + 1]]),
                    sigma_in=sigma_next[i],
                    w_in=0.0,
                    w_hat=1.0,
                    h=h,
                    a_new=0.5,
                    a_old=0.5,
                    churn_std=churn_std[i],
                    c_out=scale_next_hat[i],
                )
            )
    tables = {name: np.array([row[name] for row in rows]) for name in rows[0] if name != "t"}
    timesteps = np.array([row["t"] for row in rows], np.int32)
    # x_edm starts at sigma_hat_0 noise: x_t = sigma_hat_0 sqrt(abar) noise = sqrt(1 - abar) noise.
    return timesteps, schedule, tables, float(np.sqrt(1.0 - abar[hats[0]]))


def prepare_heun(schedule: Schedule, num_steps: int, edm: EDMOptions):
    """Heun's plan: N grid steps, 2N - 1 model evaluations (the last step is Euler).

    Returns:
      ``(timesteps, schedule, tables, x_T_scale)``: int32 ``[2N - 1]`` model timesteps, the
      schedule, float64 ``[2N - 1]`` tables of the update's coefficients, and the factor that
      turns standard normal x_T into the model's first input.
    """
    return _prepare(schedule, num_steps, edm, heun=True)


def prepare_euler(schedule: Schedule, num_steps: int, edm: EDMOptions):
    """Euler's plan: N grid steps, N model evaluations; see :func:`prepare_heun`."""
    return _prepare(schedule, num_steps, edm, heun=False)


def init_carry(x_T: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The predictor's (x_hat, d) handed to the corrector; zeros before the first step."""
    return jnp.zeros_like(x_T), jnp.zeros_like(x_T)


def update(step: Step, carry: tuple[jax.Array, jax.Array]):
    """One evaluation's update (predictor or corrector, by the plan's coefficients).

    Args:
      step: the step; ``step.x`` is the model's input x_t, ``step.row`` the coefficients.
      carry: ``(x_hat, d)`` in EDM's scale, from the previous predictor.

    Returns:
      ``(x_next, pred_x0, (x_in, d))``: the next model input (x0 after the last step), the
      (clipped) denoiser output D, and the carry.
    """
    row = step.row
    x_hat, d_prev = carry
    denoised = predicted_x0(step)
    x_in = step.x * row["c_in"]
    d = (x_in - denoised) / row["sigma_in"]
    x_edm = (
        row["w_in"] * x_in
        + row["w_hat"] * x_hat
        + row["h"] * (row["a_new"] * d + row["a_old"] * d_prev)
    )
    x_next = (x_edm + row["churn_std"] * step.noise) * row["c_out"]
    return x_next, denoised, (x_in, d)


def entry_points(tables: dict[str, np.ndarray]) -> np.ndarray:
    """The iterations a run may start at: the predictors (a corrector needs its predictor's
    state), every iteration for Euler."""
    return np.flatnonzero(tables["w_hat"] == 0.0)


def _unused_plan(schedule, timesteps):
    raise ValueError("EDM's methods plan their own sigma grid: use Method.prepare.")


HEUN = Method(
    "heun",
    plan=_unused_plan,
    update=update,
    init_carry=init_carry,
    prepare=prepare_heun,
    entry_points=entry_points,
)
EULER = Method(
    "euler",
    plan=_unused_plan,
    update=update,
    init_carry=init_carry,
    prepare=prepare_euler,
    entry_points=entry_points,
)
