"""Tests of ``diffusion_jax.schedules`` against the float64 reference in ``reference.py``.

What is checked, and how closely:
  * every table of :class:`Schedule` for ``linear``, ``quadratic``, ``sigmoid`` and ``cosine``
    (T = 1000, 200 and 10, default and custom parameters, with the DDPM family's range scaled by
    1000 / T as improved-diffusion does, and with ``scale_to_num_timesteps=False``) and for
    ``from_betas``: the tables are float64 values rounded to float32, so each element must
    match the float64 reference to a relative 1e-6 (float32 rounding is 6e-8; the reference
    takes other routes, e.g. the posterior by conditioning, so a formula slip shows up far above
    that); at T = 1000 the scaled schedules are bit-identical to the literal ones;
  * zero terminal SNR (Lin et al. 2024, Algorithm 1) against a log-space float64 reference to
    1e-10 relative, the static ``zero_terminal_snr`` flag (under ``jit``, through respacing),
    the infinite tables at T-1 only, and ``check_parameterization`` refusing eps;
  * the prior term L_T against a float64 cross-entropy-minus-entropy reference (1e-9 relative)
    and against the mean of ``losses.prior_bpd`` over data of that scale (1e-5 relative for
    +-scale data, whose squares are exact; 3% for Gaussian data); the warning of
    ``get_schedule`` (once, with alpha_bar_T, L_T and the fix), ``check_prior``, and that
    :data:`PRIOR_BPD_LIMIT` passes every named schedule's default at any T but not the literal
    DDPM range at T = 200; the module docstring's alpha_bar_T table is regenerated and compared;
  * the conventions: float32 storage, index 0 of the clipped posterior log-variance and of the
    fixed_large tables taken from the posterior variance at index 1, the endpoints of each
    named schedule, the cosine schedule's abar_t = f(t) / f(0) of Nichol & Dhariwal (2021);
  * properties (hypothesis): betas in (0, 1) and alphas_cumprod strictly decreasing in the
    float64 build, the float32 table non-increasing; posterior variance <= beta_t (exactly, in
    float32, since rounding is monotone);
  * ``ValueError`` for unknown names, T < 1 or non-int T, bad parameters, betas outside (0, 1)
    (the last may be 1), non-finite betas, betas of the wrong shape, and tables that overflow
    float32;
  * the pytree: under ``chex.variants`` (``with_jit``, ``without_jit``, ``with_pmap`` with the
    schedule shared by eight fake CPU devices and the timesteps split over them) it is gathered
    from, mapped with ``jax.tree.map`` and carried through a ``lax`` loop, with ``num_timesteps``
    a static int; a ``jit`` argument that compiles once per T.

Comparisons use chex (``assert_trees_all_close`` on whole ``Schedule`` pytrees, leaf by leaf).
"""

from __future__ import annotations

import dataclasses
import math
import warnings

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference as ref
from hypothesis import assume, given
from hypothesis import strategies as st

from diffusion_jax import losses, schedules, timesteps

NAMES = ("linear", "quadratic", "sigmoid", "cosine")
# The array tables (pytree leaves); ``zero_terminal_snr`` is a static field, not a table.
TABLES = [
    f.name for f in dataclasses.fields(schedules.Schedule) if not f.metadata.get("static", False)
]
TABLE_RTOL = 1e-6


def assert_tables_match(
    schedule: schedules.Schedule, want: dict[str, np.ndarray], zero_terminal_snr: bool = False
) -> None:
    """Every table is float32 and within TABLE_RTOL of the float64 reference, leaf by leaf."""
    chex.assert_type(jax.tree.leaves(schedule), np.float32)
    expected = schedules.Schedule(
        **{name: want[name] for name in TABLES}, zero_terminal_snr=zero_terminal_snr
    )
    # atol 1e-30 only lets an exact 0 (posterior_variance[0]) match a reference 0.
    chex.assert_trees_all_close(schedule, expected, rtol=TABLE_RTOL, atol=1e-30)


def scaled_reference_betas(name: str, num_timesteps: int, **kwargs) -> np.ndarray:
    """improved-diffusion's convention, from its definition: the DDPM-family range times
    1000 / T (betas capped at 0.999 when that enlarges them); cosine as it is."""
    if name == "cosine":
        return ref.BETAS[name](num_timesteps, **kwargs)
    scale = 1000.0 / num_timesteps
    betas = ref.BETAS[name](
        num_timesteps,
        beta_start=kwargs.get("beta_start", 1e-4) * scale,
        beta_end=kwargs.get("beta_end", 0.02) * scale,
    )
    return np.minimum(betas, 0.999) if scale > 1.0 else betas


@pytest.mark.parametrize("num_timesteps", [1000, 200, 10])
@pytest.mark.parametrize("name", NAMES)
def test_named_schedule_tables_match_reference(name, num_timesteps):
    """The default scales the DDPM family's range by 1000 / T (T = 10 also meets the cap)."""
    schedule = schedules.get_schedule(name, num_timesteps)
    assert schedule.num_timesteps == num_timesteps
    assert not schedule.zero_terminal_snr
    assert_tables_match(schedule, ref.tables(scaled_reference_betas(name, num_timesteps)))


@pytest.mark.filterwarnings("ignore:Schedule .* ends at alpha_bar_T:UserWarning")
@pytest.mark.parametrize("num_timesteps", [1000, 200, 10])
@pytest.mark.parametrize("name", NAMES)
def test_literal_range_tables_match_reference(name, num_timesteps):
    """scale_to_num_timesteps=False keeps the paper's betas at any T."""
    schedule = schedules.get_schedule(name, num_timesteps, scale_to_num_timesteps=False)
    assert_tables_match(schedule, ref.schedule_tables(name, num_timesteps))


@pytest.mark.parametrize("name", NAMES)
def test_scaling_is_bit_identical_at_1000(name):
    scaled = schedules.get_schedule(name, 1000)
    literal = schedules.get_schedule(name, 1000, scale_to_num_timesteps=False)
    chex.assert_trees_all_equal(scaled, literal, strict=True)
    np.testing.assert_array_equal(
        schedules.beta_table(name, 1000),
        schedules.beta_table(name, 1000, scale_to_num_timesteps=False),
    )


@pytest.mark.parametrize("name", ["linear", "quadratic", "sigmoid"])
@pytest.mark.parametrize("num_timesteps", [50, 200, 4000])
def test_scaled_betas_are_the_literal_ones_times_1000_over_t(name, num_timesteps):
    scaled = schedules.beta_table(name, num_timesteps)
    literal = schedules.beta_table(name, num_timesteps, scale_to_num_timesteps=False)
    # The range is scaled before the ramp is drawn: equal up to float64 rounding.
    chex.assert_trees_all_close(scaled, literal * (1000.0 / num_timesteps), rtol=1e-13, atol=0.0)
    # Scaled to T, the betas sum to about what DDPM's sum to at T = 1000: alpha_bar_T stays put.
    chex.assert_trees_all_close(np.sum(scaled), np.sum(schedules.beta_table(name, 1000)), rtol=0.02)


def test_scaled_betas_are_capped_at_small_t():
    # 0.02 * 1000 / T reaches 1 at T = 20: capped at 0.999 there and below, not above.
    for num_timesteps in (1, 2, 10, 20):
        betas = schedules.beta_table("linear", num_timesteps)
        assert np.max(betas) <= 0.999
    np.testing.assert_array_equal(schedules.beta_table("linear", 20)[-1], 0.999)
    np.testing.assert_allclose(schedules.beta_table("linear", 21)[-1], 20.0 / 21.0, rtol=1e-15)
    # T = 1: the single beta is beta_start scaled (0.1), as improved-diffusion's linspace gives.
    np.testing.assert_allclose(schedules.beta_table("linear", 1), [0.1], rtol=1e-15)


# The module docstring's alpha_bar_T table, regenerated here and compared with the docstring.
TABLE_NUM_TIMESTEPS = (50, 100, 200, 1000, 4000)
TABLE_ROWS = (
    ("linear", "linear", {}),
    ("quadratic", "quadratic", {}),
    ("sigmoid", "sigmoid", {}),
    ("cosine", "cosine", {}),
    ("linear, literal range (unscaled)", "linear", dict(scale_to_num_timesteps=False)),
)


def alpha_bar_table() -> str:
    """The reStructuredText table of alpha_bar_T in ``schedules``' docstring."""
    rule = "  " + "  ".join(["=" * 32] + ["=" * 8] * len(TABLE_NUM_TIMESTEPS))
    head = "  " + "  ".join(
        [f"{'schedule':<32}"] + [f"{f'T = {t}':<8}" for t in TABLE_NUM_TIMESTEPS]
    )
    lines = [rule, head, rule]
    for label, name, kwargs in TABLE_ROWS:
        cells = []
        for num_timesteps in TABLE_NUM_TIMESTEPS:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                schedule = schedules.get_schedule(name, num_timesteps, **kwargs)
            cells.append(f"{float(schedule.alphas_cumprod[-1]):.2e}")
        lines.append("  " + "  ".join([f"{label:<32}"] + cells))
    lines.append(rule)
    return "\n".join(lines)


def test_docstring_alpha_bar_table_is_current():
    """Print the table with ``python -c 'import test_schedules as m; print(m.alpha_bar_table())'``
    (from tests/) to refresh the docstring."""
    assert alpha_bar_table() in schedules.__doc__


@pytest.mark.parametrize(
    ("name", "kwargs"),
    [
        ("linear", dict(beta_start=1e-5, beta_end=1e-2)),
        ("quadratic", dict(beta_start=5e-4, beta_end=0.05)),
        ("sigmoid", dict(beta_start=1e-5, beta_end=1e-2)),
        ("cosine", dict(s=0.02, max_beta=0.9)),
    ],
)
@pytest.mark.filterwarnings("ignore:Schedule .* ends at alpha_bar_T:UserWarning")
def test_schedule_parameters_are_used(name, kwargs):
    schedule = schedules.get_schedule(name, 200, **kwargs)
    assert_tables_match(schedule, ref.tables(scaled_reference_betas(name, 200, **kwargs)))
    literal = schedules.get_schedule(name, 200, scale_to_num_timesteps=False, **kwargs)
    assert_tables_match(literal, ref.schedule_tables(name, 200, **kwargs))


def test_from_betas_tables_match_reference():
    betas = np.random.default_rng(0).uniform(1e-4, 0.3, size=50)
    assert_tables_match(schedules.from_betas(betas), ref.tables(betas))
    # Any array-like is accepted.
    assert_tables_match(schedules.from_betas(list(betas)), ref.tables(betas))
    assert_tables_match(schedules.from_betas(jnp.asarray(betas[:7])), ref.tables(betas[:7]))


@pytest.mark.parametrize("name", NAMES)
def test_beta_table_is_float64_reference(name):
    got = schedules.beta_table(name, 1000)
    chex.assert_type(got, np.float64)
    # 1 - abar_t / abar_{t-1} cancels: float64 agreement to 1e-10 relative, not to the last bit.
    chex.assert_trees_all_close(got, ref.BETAS[name](1000), rtol=1e-10, atol=0.0)


def test_named_schedule_endpoints():
    betas = {name: schedules.get_schedule(name, 1000).betas for name in NAMES}
    # sigmoid(+-6) = 0.0025 / 0.9975 of the way between the endpoints.
    ramp = 1.0 / (1.0 + np.exp(6.0))
    want = {
        "linear": np.array([1e-4, 0.02]),
        "quadratic": np.array([1e-4, 0.02]),
        "sigmoid": np.array([1e-4 + (0.02 - 1e-4) * ramp, 0.02 - (0.02 - 1e-4) * ramp]),
        # cosine: the last beta is clipped at 0.999 (all others are below it, checked below).
        "cosine": np.array([betas["cosine"][0], 0.999]),
    }
    endpoints = {name: table[np.array([0, -1])] for name, table in betas.items()}
    chex.assert_trees_all_close(endpoints, want, rtol=1e-6)
    assert np.all(np.asarray(betas["cosine"][:-1]) < 0.999)


@pytest.mark.parametrize("num_timesteps", [1000, 50])
def test_cosine_alphas_cumprod_is_f_t_over_f_0(num_timesteps):
    """Nichol & Dhariwal eq. 17, index i = step i + 1; the clipped last step is excluded."""
    schedule = schedules.get_schedule("cosine", num_timesteps)
    steps = np.arange(1, num_timesteps)
    want = ref.cosine_alpha_bar(steps, num_timesteps)
    chex.assert_trees_all_close(schedule.alphas_cumprod[:-1], want, rtol=2e-6)


@pytest.mark.parametrize("name", NAMES)
def test_index_zero_conventions(name):
    schedule = schedules.get_schedule(name, 100)
    posterior_variance = np.asarray(schedule.posterior_variance)
    assert posterior_variance[0] == 0.0
    # The log is clipped: index 0 takes the value of index 1 (DDPM reference code).
    assert schedule.posterior_log_variance_clipped[0] == schedule.posterior_log_variance_clipped[1]
    chex.assert_trees_all_close(
        schedule.posterior_log_variance_clipped[1:],
        np.log(posterior_variance[1:]),
        rtol=1e-6,
        atol=1e-7,  # log of a float32 variance near 1: absolute, not relative, precision.
    )
    # fixed_large: beta_t, but posterior_variance[1] at index 0 for variance and log-variance.
    chex.assert_trees_all_close(
        (schedule.fixed_large_variance[0], schedule.fixed_large_log_variance[0]),
        (posterior_variance[1], np.log(posterior_variance[1])),
        rtol=1e-6,
    )
    chex.assert_trees_all_equal(schedule.fixed_large_variance[1:], schedule.betas[1:])
    # abar_{-1} = 1; the posterior at index 0 returns x_0 itself.
    assert schedule.alphas_cumprod_prev[0] == 1.0
    chex.assert_trees_all_close(schedule.posterior_mean_coef1[0], 1.0, rtol=1e-6)
    chex.assert_trees_all_close(schedule.posterior_mean_coef2[0], 0.0, atol=1e-7)


def test_single_step_schedule_builds():
    schedule = schedules.from_betas([0.5])
    assert schedule.num_timesteps == 1
    chex.assert_tree_all_finite(schedule)
    chex.assert_trees_all_equal(schedule.alphas_cumprod, np.array([0.5], np.float32))
    assert schedule.posterior_variance[0] == 0.0


# ---------------------------------------------------------------------------- properties


@st.composite
def named_schedule(draw):
    """A named schedule with random T and parameters: (name, num_timesteps, kwargs)."""
    name = draw(st.sampled_from(NAMES))
    num_timesteps = draw(st.integers(1, 3000))
    if name == "cosine":
        kwargs = dict(
            s=draw(st.floats(1e-4, 0.1)),
            max_beta=draw(st.floats(0.5, 0.999)),
        )
    else:
        beta_start = draw(st.floats(1e-6, 1e-2))
        kwargs = dict(beta_start=beta_start, beta_end=draw(st.floats(beta_start, 0.5)))
    return name, num_timesteps, kwargs


def within_float32(betas) -> bool:
    """abar_T >= 1e-60: every table fits float32 (1 / sqrt(abar) overflows it below 8.6e-78);
    from_betas refuses longer products (tested in test_from_betas_refuses_tables_not_finite)."""
    return float(-np.sum(np.log1p(-np.asarray(betas, np.float64)))) < 60 * math.log(10.0)


@given(named_schedule())
def test_alphas_cumprod_strictly_decreasing_in_float64(case):
    name, num_timesteps, kwargs = case
    betas = schedules.beta_table(name, num_timesteps, **kwargs)
    assume(within_float32(betas))
    assert betas.dtype == np.float64 and betas.shape == (num_timesteps,)
    assert np.all((betas > 0.0) & (betas < 1.0))
    alphas_cumprod = np.cumprod(1.0 - betas)
    assert np.all(np.diff(alphas_cumprod) < 0.0)
    assert alphas_cumprod[0] < 1.0
    stored = np.asarray(schedules.from_betas(betas).alphas_cumprod)
    assert np.all(np.diff(stored) <= 0.0)


@given(named_schedule())
def test_posterior_variance_at_most_beta(case):
    name, num_timesteps, kwargs = case
    assume(within_float32(schedules.beta_table(name, num_timesteps, **kwargs)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the prior guard, for small random betas
        schedule = schedules.get_schedule(name, num_timesteps, **kwargs)
    posterior_variance = np.asarray(schedule.posterior_variance)
    betas = np.asarray(schedule.betas)
    assert np.all(posterior_variance <= betas)
    assert np.all(posterior_variance[1:] > 0.0)


@given(
    st.lists(st.floats(1e-6, 0.999), min_size=2, max_size=60).map(np.asarray),
)
def test_from_betas_properties(betas):
    assume(within_float32(betas))
    schedule = schedules.from_betas(betas)
    assert np.all(np.asarray(schedule.posterior_variance) <= np.asarray(schedule.betas))
    assert np.all(np.diff(np.cumprod(1.0 - betas)) < 0.0)
    assert_tables_match(schedule, ref.tables(betas))


# ---------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("args", "kwargs", "match"),
    [
        (("cosine_v2",), {}, "Unknown schedule 'cosine_v2'.*cosine"),
        (("Linear",), {}, "Unknown schedule"),
        (("linear", 0), {}, "num_timesteps must be >= 1"),
        (("linear", -3), {}, "num_timesteps must be >= 1"),
        (("linear", 10.0), {}, "num_timesteps must be an int"),
        (("linear", True), {}, "num_timesteps must be an int"),
        (("cosine",), dict(beta_start=1e-4), "Bad parameters for schedule 'cosine'"),
        (("linear",), dict(s=0.008), "Bad parameters for schedule 'linear'"),
        (("linear",), dict(beta_end=1.5), r"open interval \(0, 1\)"),
        (("linear",), dict(beta_start=0.0), r"open interval \(0, 1\)"),
        (("sigmoid",), dict(beta_start=-1e-3), r"open interval \(0, 1\)"),
        (("quadratic",), dict(beta_end=1.0), r"open interval \(0, 1\)"),
        (("cosine",), dict(max_beta=1.0), r"open interval \(0, 1\)"),
        (("linear",), dict(beta_end=float("nan")), "finite"),
    ],
)
def test_get_schedule_errors(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        schedules.get_schedule(*args, **kwargs)


@pytest.mark.parametrize(
    ("betas", "match"),
    [
        ([], "at least one timestep"),
        (0.1, "1-D"),
        ([[0.1, 0.2]], "1-D"),
        ([0.1, float("nan")], r"non-finite values at indices \[1\]"),
        ([float("inf"), 0.1], r"non-finite values at indices \[0\]"),
        ([0.1, 1.0, 0.2], r"only the last beta may be 1.*out of range at indices \[1\]"),
        ([1.0, 0.1], r"out of range at indices \[0\]"),
        ([0.0, 0.1], r"out of range at indices \[0\]"),
        ([0.1, -0.2, 0.3], r"out of range at indices \[1\]"),
        ([0.1, 1.5], r"\(0, 1\)"),
    ],
)
def test_from_betas_errors(betas, match):
    with pytest.raises(ValueError, match=match):
        schedules.from_betas(betas)


# ---------------------------------------------------------------------------- pytree


def test_schedule_is_a_jit_argument_compiled_once_per_length():
    @jax.jit
    @chex.assert_max_traces(n=2)
    def gather(schedule, t):
        # num_timesteps is a Python int under jit: usable for shapes and Python arithmetic.
        last = jnp.zeros((schedule.num_timesteps,), jnp.float32).at[-1].set(1.0)
        return schedule.alphas_cumprod[t] + jnp.sum(last) * 0.0, schedule.num_timesteps - 1

    chex.clear_trace_counter()
    t = jnp.array([0, 5], jnp.int32)
    for name in NAMES:  # Same T: one trace for all four schedules.
        schedule = schedules.get_schedule(name, 100)
        value, last_index = gather(schedule, t)
        chex.assert_trees_all_equal(value, schedule.alphas_cumprod[t])
        assert int(last_index) == 99
    value, last_index = gather(schedules.get_schedule("linear", 10), t)  # A second trace.
    assert int(last_index) == 9
    with pytest.raises(AssertionError):  # A third T would exceed n=2: T is static.
        gather(schedules.get_schedule("linear", 11), t)


def test_schedule_is_a_pytree():
    schedule = schedules.get_schedule("cosine", 100)
    leaves = jax.tree.leaves(schedule)
    assert len(leaves) == len(TABLES)
    doubled = jax.tree.map(lambda x: 2 * x, schedule)
    assert isinstance(doubled, schedules.Schedule)
    chex.assert_trees_all_equal(doubled.betas, 2 * schedule.betas)
    as_jax = jax.tree.map(jnp.asarray, schedule)
    assert as_jax.num_timesteps == 100
    chex.assert_trees_all_equal(as_jax, schedule, strict=True)
    rebuilt = jax.tree.unflatten(jax.tree.structure(schedule), leaves)
    chex.assert_trees_all_equal(rebuilt, schedule, strict=True)


def test_schedule_in_lax_loops():
    schedule = schedules.get_schedule("linear", 50)

    @jax.jit
    def product_of_alphas(schedule):
        def body(i, carry):
            sched, acc = carry
            return sched, acc * sched.alphas[i]

        _, acc = jax.lax.fori_loop(0, schedule.num_timesteps, body, (schedule, jnp.float32(1.0)))
        return acc

    # 50 float32 roundings of the product, 6e-8 each: 1e-5 relative.
    chex.assert_trees_all_close(product_of_alphas(schedule), schedule.alphas_cumprod[-1], rtol=1e-5)

    def scan_step(carry, t):
        return carry, carry.betas[t]

    _, betas = jax.lax.scan(scan_step, schedule, jnp.arange(50))
    chex.assert_trees_all_equal(betas, schedule.betas)


class ScheduleUnderVariantsTest(chex.TestCase):
    """The schedule as an argument of the jitted, the eager and the pmapped function alike."""

    @chex.variants(with_jit=True, without_jit=True, with_pmap=True)
    def test_gather_map_and_loop(self):
        num_timesteps = 50
        schedule = schedules.get_schedule("cosine", num_timesteps)
        tab = ref.schedule_tables("cosine", num_timesteps)
        t = np.array([0, 1, 7, 13, 25, 38, 48, 49], np.int32)  # one per device under pmap

        def gather_map_and_loop(schedule, t):
            # Static in every variant: a Python int, usable for shapes and loop bounds.
            assert isinstance(schedule.num_timesteps, int)
            roots = jax.tree.map(jnp.sqrt, schedule)

            def body(i, carry):
                sched, product = carry  # the schedule rides in the loop carry
                return sched, product * jnp.where(i <= t, sched.alphas[i], 1.0)

            init = (schedule, jnp.ones(t.shape, jnp.float32))
            _, product = jax.lax.fori_loop(0, schedule.num_timesteps, body, init)
            return schedule.alphas_cumprod[t], roots.alphas_cumprod[t], product

        got = ref.call_variant(self.variant, gather_map_and_loop, schedule, jnp.asarray(t))
        chex.assert_shape(got, (len(t),))
        chex.assert_type(got, np.float32)
        abar, sqrt_abar = tab["alphas_cumprod"][t], tab["sqrt_alphas_cumprod"][t]
        # A gathered table is a float32 rounding (TABLE_RTOL); the root of one adds another.
        # The loop's product of up to 50 float32 factors rounds 50 times: 1e-5 relative.
        chex.assert_trees_all_close(got[0], abar, rtol=TABLE_RTOL)
        chex.assert_trees_all_close(got[1], sqrt_abar, rtol=2 * TABLE_RTOL)
        chex.assert_trees_all_close(got[2], abar, rtol=1e-5)


# ---------------------------------------------------------------------------- zero terminal SNR


def reference_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Lin et al. 2024, Algorithm 1, in log space: sqrt(abar) shifted to end at 0 and scaled to
    start where it did; betas from the ratios of consecutive abar (abar_{-1} = 1)."""
    root = np.exp(0.5 * np.cumsum(np.log1p(-np.asarray(betas, np.float64))))
    rescaled = (root - root[-1]) / (root[0] - root[-1]) * root[0]
    alphas_cumprod = rescaled**2
    return 1.0 - alphas_cumprod / np.concatenate([[1.0], alphas_cumprod[:-1]])


@pytest.mark.parametrize("num_timesteps", [1000, 50])
@pytest.mark.parametrize("name", NAMES)
def test_zero_terminal_snr_matches_reference(name, num_timesteps):
    betas = schedules.beta_table(name, num_timesteps)
    got = schedules.rescale_zero_terminal_snr(betas)
    chex.assert_type(got, np.float64)
    want = reference_zero_terminal_snr(betas)
    # Float64 routes that differ (exp of a log-sum, a cumulative product): 1e-10 relative.
    chex.assert_trees_all_close(got, want, rtol=1e-10, atol=0.0)
    assert got[-1] == 1.0 and np.all((got[:-1] > 0.0) & (got[:-1] < 1.0))
    # sqrt(abar) at the first step is unchanged (Algorithm 1 keeps it), the last is 0.
    np.testing.assert_allclose(1.0 - got[0], 1.0 - betas[0], rtol=1e-12)

    schedule = schedules.get_schedule(name, num_timesteps, zero_terminal_snr=True)
    assert schedule.zero_terminal_snr
    assert schedule.alphas_cumprod[-1] == 0.0 and schedule.betas[-1] == 1.0
    with np.errstate(divide="ignore", invalid="ignore"):  # log(0), 1 / 0 in the reference
        want_tables = ref.tables(got)
    assert_tables_match(schedule, want_tables, zero_terminal_snr=True)
    # Infinite exactly where the equations say (1 / sqrt(0), log(0)); finite everywhere else.
    for table in TABLES:
        values = np.asarray(getattr(schedule, table))
        infinite = table in ("sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod", "log_snr")
        assert np.all(np.isfinite(values[:-1])) and np.isfinite(values[-1]) != infinite, table
    assert schedule.log_snr[-1] == -np.inf
    # L_T = 0: x_T is N(0, I) exactly.
    assert schedules.prior_bpd(schedule) == 0.0


def test_zero_terminal_snr_is_static_and_survives_respacing():
    schedule = schedules.get_schedule("linear", 100, zero_terminal_snr=True)
    plain = schedules.get_schedule("linear", 100)
    assert len(jax.tree.leaves(schedule)) == len(TABLES)
    assert jax.tree.structure(schedule) != jax.tree.structure(plain)

    @jax.jit
    def terminal_weight(schedule):
        # A Python bool under jit: it can choose what is traced.
        return jnp.float32(0.0) if schedule.zero_terminal_snr else schedule.alphas_cumprod[-1]

    assert float(terminal_weight(schedule)) == 0.0
    assert float(terminal_weight(plain)) == float(plain.alphas_cumprod[-1])
    assert jax.tree.map(lambda x: x, schedule).zero_terminal_snr
    # Respacing keeps the last step, and so abar_T = 0 (its beta is 1 again).
    respaced = timesteps.respace(schedule, timesteps.timesteps_for(100, 10))
    assert respaced.zero_terminal_snr and respaced.alphas_cumprod[-1] == 0.0
    # from_betas recognises a last beta of 1.
    assert schedules.from_betas([0.1, 0.5, 1.0]).zero_terminal_snr


def test_check_parameterization():
    schedule = schedules.get_schedule("cosine", 50, zero_terminal_snr=True)
    for parameterization in ("v", "x0"):
        assert schedules.check_parameterization(schedule, parameterization) is None
    with pytest.raises(ValueError, match="zero terminal SNR needs v or x0 prediction"):
        schedules.check_parameterization(schedule, "eps")
    schedules.check_parameterization(schedules.get_schedule("cosine", 50), "eps")
    with pytest.raises(ValueError, match="parameterization"):
        schedules.check_parameterization(schedule, "epsilon")


@pytest.mark.parametrize("betas", [[0.5], [0.0, 0.5], [0.5, 1.5]])
def test_zero_terminal_snr_errors(betas):
    with pytest.raises(ValueError, match=r"T >= 2|open interval \(0, 1\)"):
        schedules.rescale_zero_terminal_snr(betas)


def test_from_betas_refuses_tables_not_finite():
    # abar_t = 0.5^(t+1): 1 / sqrt(abar_t) = 2^((t+1)/2) passes float32's largest at t = 255.
    float32_max = float(np.finfo(np.float32).max)
    first_bad = int(np.argmax(1.0 / np.sqrt(np.cumprod(np.full(400, 0.5))) > float32_max))
    assert first_bad == 255
    with pytest.raises(
        ValueError,
        match=rf"sqrt_recip_alphas_cumprod is not finite in float32 at index {first_bad} \(inf",
    ):
        schedules.from_betas(np.full(400, 0.5))


# ---------------------------------------------------------------------------- the prior term


def reference_prior_bpd(alpha_bar: float, data_scale: float) -> float:
    """KL(q || p) = cross-entropy(q, p) - entropy(q), per dimension, averaged over x0 with
    E[x0^2] = data_scale^2: q = N(sqrt(abar) x0, 1 - abar), p = N(0, 1); nats -> bits."""
    variance = 1.0 - alpha_bar
    entropy = 0.5 * math.log(2.0 * math.pi * math.e * variance)
    cross_entropy = 0.5 * math.log(2.0 * math.pi) + 0.5 * (variance + alpha_bar * data_scale**2)
    return (cross_entropy - entropy) / math.log(2.0)


PRIOR_CASES = [
    ("linear", 200, dict(scale_to_num_timesteps=False)),  # abar_T = 0.13
    ("linear", 50, dict(scale_to_num_timesteps=False)),  # abar_T = 0.60
    ("linear", 200, {}),
    ("quadratic", 1000, {}),
    ("cosine", 100, {}),
]


@pytest.mark.filterwarnings("ignore:Schedule .* ends at alpha_bar_T:UserWarning")
@pytest.mark.parametrize("data_scale", [1.0, 0.5, 2.0])
@pytest.mark.parametrize(("name", "num_timesteps", "kwargs"), PRIOR_CASES)
def test_prior_bpd_matches_reference(name, num_timesteps, kwargs, data_scale):
    schedule = schedules.get_schedule(name, num_timesteps, **kwargs)
    alpha_bar = float(schedule.alphas_cumprod[-1])  # the float32 table, as prior_bpd reads it
    got = schedules.prior_bpd(schedule, data_scale)
    assert isinstance(got, float) and got >= 0.0
    # Both in float64 from the same abar_T, by different routes: 1e-9 relative; absolute 1e-15
    # for cosine, where L_T ~ 1e-7 is a difference of logs near 4.
    np.testing.assert_allclose(
        got, reference_prior_bpd(alpha_bar, data_scale), rtol=1e-9, atol=1e-15
    )


@pytest.mark.filterwarnings("ignore:Schedule .* ends at alpha_bar_T:UserWarning")
@pytest.mark.parametrize("data_scale", [1.0, 0.5])
@pytest.mark.parametrize(("name", "num_timesteps", "kwargs"), PRIOR_CASES)
def test_prior_bpd_is_the_mean_of_losses_prior_bpd(name, num_timesteps, kwargs, data_scale):
    schedule = schedules.get_schedule(name, num_timesteps, **kwargs)
    want = schedules.prior_bpd(schedule, data_scale)
    rng = np.random.default_rng(0)
    # +-data_scale: every element's square is data_scale^2, so the batch mean is exact.
    signs = data_scale * rng.choice([-1.0, 1.0], size=(16, 8, 8, 3)).astype(np.float32)
    got = float(jnp.mean(losses.prior_bpd(schedule, jnp.asarray(signs))))
    # losses.prior_bpd sums float32 terms ~1 to a KL of ~abar/2: 3e-7 nats absolute rounding.
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=5e-7)
    # Gaussian data of that scale: the batch's mean square is within 1% of data_scale^2
    # (64k draws: relative std 0.6%), and L_T ~ abar data_scale^2 / 2 moves with it.
    gaussian = data_scale * rng.standard_normal((1000, 64)).astype(np.float32)
    got = float(jnp.mean(losses.prior_bpd(schedule, jnp.asarray(gaussian))))
    np.testing.assert_allclose(got, want, rtol=0.03, atol=5e-7)


def test_prior_guard_threshold():
    """The limit separates the schedules it should: the literal DDPM range at T = 200 fails it by
    about 100 times, every named schedule with its default (scaled) range passes at any T."""
    assert schedules.PRIOR_BPD_LIMIT == 1e-3
    for name in NAMES:
        for num_timesteps in (2, 10, 21, 50, 100, 200, 1000, 4000):
            bpd = schedules.check_prior(schedules.get_schedule(name, num_timesteps))
            assert 0.0 <= bpd < schedules.PRIOR_BPD_LIMIT, (name, num_timesteps, bpd)
    # DDPM's own setting has margin: 2.9e-5 bits/dim.
    assert schedules.prior_bpd(schedules.get_schedule("linear", 1000)) < 3e-5


def test_get_schedule_warns_once_with_the_fix():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        schedules.get_schedule("linear", 200, scale_to_num_timesteps=False)
    assert len(caught) == 1 and caught[0].category is UserWarning
    message = str(caught[0].message)
    for part in ("alpha_bar_T = 0.132", "L_T = 0.102 bits/dim", "scale_to_num_timesteps", "cosine"):
        assert part in message, message
    assert caught[0].filename == __file__  # stacklevel: the warning points at the caller
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for name in NAMES:
            schedules.get_schedule(name, 200)
        schedules.get_schedule("linear", 200, zero_terminal_snr=True)


def test_check_prior():
    with pytest.warns(UserWarning, match=r"alpha_bar_T = 0\.603"):
        literal = schedules.get_schedule("linear", 50, scale_to_num_timesteps=False)
    with pytest.raises(ValueError, match=r"alpha_bar_T = 0\.603.*L_T = .* bits/dim.*cosine"):
        schedules.check_prior(literal)
    # The limit and the data scale are the caller's: small data ends nearer N(0, I).
    bpd = schedules.prior_bpd(literal, 0.01)
    assert schedules.check_prior(literal, data_scale=0.01, limit=1.0) == bpd
    scaled = schedules.get_schedule("linear", 50)
    assert schedules.check_prior(scaled) == schedules.prior_bpd(scaled)
    with pytest.raises(ValueError, match="data_scale must be finite and > 0"):
        schedules.prior_bpd(scaled, 0.0)
