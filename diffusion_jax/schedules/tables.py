"""The :class:`Schedule` pytree and :func:`from_betas`: every table the diffusion math uses, built
in float64 NumPy from the betas and stored as float32."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

__all__ = ["Schedule", "check_open_unit_interval", "from_betas"]

# Tables that are infinite at the last index, and only there, when abar_T = 0.
_INFINITE_AT_ZERO_TERMINAL_SNR = (
    "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod",
    "log_snr",
)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Schedule:
    """Every per-timestep table of a discrete diffusion, float32, each of shape ``[T]``.

    Build one with :func:`get_schedule` or :func:`from_betas`; do not construct it by hand.
    ``zero_terminal_snr`` is static (pytree aux data, not a leaf): a Python bool under ``jit``.
    """

    betas: jax.Array  # [T] beta_t
    alphas: jax.Array  # [T] 1 - beta_t
    alphas_cumprod: jax.Array  # [T] abar_t = prod_{s<=t} alpha_s
    alphas_cumprod_prev: jax.Array  # [T] abar_{t-1}, with abar_{-1} = 1
    sqrt_alphas_cumprod: jax.Array  # [T]
    sqrt_one_minus_alphas_cumprod: jax.Array  # [T]
    log_one_minus_alphas_cumprod: jax.Array  # [T]
    sqrt_recip_alphas_cumprod: jax.Array  # [T] 1 / sqrt(abar_t); +inf at T-1 if abar_T = 0
    sqrt_recipm1_alphas_cumprod: jax.Array  # [T] sqrt(1 / abar_t - 1); +inf at T-1 likewise
    posterior_variance: jax.Array  # [T] beta_t (1 - abar_{t-1}) / (1 - abar_t); 0 at t = 0
    posterior_log_variance_clipped: jax.Array  # [T] log of the above, index 0 := index 1
    posterior_mean_coef1: jax.Array  # [T] coefficient of x0 in the posterior mean
    posterior_mean_coef2: jax.Array  # [T] coefficient of x_t in the posterior mean
    fixed_large_variance: jax.Array  # [T] beta_t, index 0 := posterior_variance[1]
    fixed_large_log_variance: jax.Array  # [T] log of the above
    log_snr: jax.Array  # [T] log(abar_t / (1 - abar_t)); -inf at T-1 if abar_T = 0
    # True when the last beta is 1 (abar_T = 0): x_T is pure noise. Static.
    zero_terminal_snr: bool = dataclasses.field(default=False, metadata=dict(static=True))

    @property
    def num_timesteps(self) -> int:
        """T, the number of diffusion steps (static: it is the tables' shape)."""
        return self.betas.shape[0]


def check_open_unit_interval(betas: np.ndarray, *, allow_last_one: bool = False) -> None:
    """Raises ValueError naming the first bad indices unless every beta is finite, in (0, 1)."""
    if not np.all(np.isfinite(betas)):
        bad = np.flatnonzero(~np.isfinite(betas))[:5].tolist()
        raise ValueError(
            f"betas must be finite; non-finite values at indices {bad} (values "
            f"{betas[bad].tolist()})."
        )
    out_of_range = (betas <= 0.0) | (betas >= 1.0)
    if allow_last_one and betas[-1] == 1.0:
        out_of_range[-1] = False
    if np.any(out_of_range):
        bad = np.flatnonzero(out_of_range)[:5].tolist()
        last = " (only the last beta may be 1: zero terminal SNR)" if allow_last_one else ""
        raise ValueError(
            f"betas must lie in the open interval (0, 1){last}; out of range at indices {bad} "
            f"(values {betas[bad].tolist()})."
        )


def from_betas(betas) -> Schedule:
    """Builds a :class:`Schedule` from any betas.

    The last beta may be exactly 1: the schedule then has zero terminal SNR (abar_T = 0,
    ``zero_terminal_snr`` True), which is what :func:`rescale_zero_terminal_snr` returns and
    what respacing such a schedule keeps.

    Args:
      betas: array-like of shape ``[T]``, T >= 1, every value finite and in (0, 1) (the last
        may be 1).

    Returns:
      The schedule; all tables are computed in float64 and stored as float32.

    Raises:
      ValueError: wrong shape, non-finite values, values outside (0, 1), or a table that is not
        finite in float32 (abar_t underflowing), naming the first bad index and value.

    Example:
      >>> from_betas(np.full(100, 0.02)).alphas_cumprod.shape
      (100,)
    """
    betas = np.asarray(betas, dtype=np.float64)
    if betas.ndim != 1:
        raise ValueError(f"betas must be 1-D of shape [T], got shape {betas.shape}.")
    if betas.shape[0] < 1:
        raise ValueError("betas must hold at least one timestep (T >= 1), got an empty array.")
    check_open_unit_interval(betas, allow_last_one=True)
    zero_terminal_snr = bool(betas[-1] == 1.0)

    alphas = 1.0 - betas
    alphas_cumprod = np.cumprod(alphas)
    alphas_cumprod_prev = np.append(1.0, alphas_cumprod[:-1])
    with np.errstate(divide="ignore"):  # 1 / abar_T and log(abar_T) with zero terminal SNR
        posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
        # posterior_variance[0] is 0: its log is clipped to the next value (DDPM reference
        # code). With T = 1 there is no next value; beta_0 is the only variance on offer.
        first_var = posterior_variance[1] if betas.shape[0] > 1 else betas[0]
        posterior_variance_clipped = np.append(first_var, posterior_variance[1:])
        # improved-diffusion's fixed_large: beta_t, except at t = 0 where beta_0 would make
        # the decoder too sharp; it uses posterior_variance[1] for variance and log-variance.
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
            posterior_mean_coef2=(1.0 - alphas_cumprod_prev)
            * np.sqrt(alphas)
            / (1.0 - alphas_cumprod),
            fixed_large_variance=fixed_large_variance,
            fixed_large_log_variance=np.log(fixed_large_variance),
            log_snr=np.log(alphas_cumprod) - np.log1p(-alphas_cumprod),
        )
    with np.errstate(over="ignore"):  # an overflow to inf is reported below, by table and index
        tables = {k: np.asarray(v, dtype=np.float32) for k, v in tables.items()}
    for key, table in tables.items():
        finite = np.isfinite(table)
        if zero_terminal_snr and key in _INFINITE_AT_ZERO_TERMINAL_SNR:
            finite[-1] = True  # infinite by definition where abar_T = 0
        if not np.all(finite):
            index = int(np.flatnonzero(~finite)[0])
            raise ValueError(
                f"Schedule table {key} is not finite in float32 at index {index} "
                f"({table[index]}; alphas_cumprod there is {alphas_cumprod[index]:.3g}): the "
                "betas drive abar_t to 0 before the last step. Use smaller betas or fewer steps."
            )
    return Schedule(**tables, zero_terminal_snr=zero_terminal_snr)
