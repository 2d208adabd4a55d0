"""Tests of ``diffusion_jax.schedules`` against the float64 reference in ``reference.py``.

What is checked, and how closely:
  * every table of :class:`Schedule` for ``linear``, ``quadratic``, ``sigmoid`` and ``cosine``
    (T = 1000 and T = 10, default and custom parameters) and for ``from_betas``: the tables are
    float64 values rounded to float32, so each element must match the float64 reference to a
    relative 1e-6 (float32 rounding is 6e-8; the reference takes other routes, e.g. the
    posterior by conditioning, so a formula slip shows up far above that);
  * the conventions: float32 storage, index 0 of the clipped posterior log-variance and of the
    fixed_large tables taken from the posterior variance at index 1, the endpoints of each
    named schedule, the cosine schedule's abar_t = f(t) / f(0) of Nichol & Dhariwal (2021);
  * properties (hypothesis): betas in (0, 1) and alphas_cumprod strictly decreasing in the
    float64 build, the float32 table non-increasing; posterior variance <= beta_t (exactly, in
    float32, since rounding is monotone);
  * ``ValueError`` for unknown names, T < 1 or non-int T, bad parameters, betas outside (0, 1),
    non-finite betas and betas of the wrong shape;
  * the pytree: under ``chex.variants`` (``with_jit``, ``without_jit``, ``with_pmap`` with the
    schedule shared by eight fake CPU devices and the timesteps split over them) it is gathered
    from, mapped with ``jax.tree.map`` and carried through a ``lax`` loop, with ``num_timesteps``
    a static int; a ``jit`` argument that compiles once per T.

Comparisons use chex (``assert_trees_all_close`` on whole ``Schedule`` pytrees, leaf by leaf).
"""

from __future__ import annotations

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference as ref
from hypothesis import given
from hypothesis import strategies as st

from diffusion_jax import schedules

NAMES = ("linear", "quadratic", "sigmoid", "cosine")
TABLES = [f.name for f in dataclasses.fields(schedules.Schedule)]
TABLE_RTOL = 1e-6


def assert_tables_match(schedule: schedules.Schedule, want: dict[str, np.ndarray]) -> None:
    """Every table is float32 and within TABLE_RTOL of the float64 reference, leaf by leaf."""
    chex.assert_type(jax.tree.leaves(schedule), np.float32)
    expected = schedules.Schedule(**{name: want[name] for name in TABLES})
    # atol 1e-30 only lets an exact 0 (posterior_variance[0]) match a reference 0.
    chex.assert_trees_all_close(schedule, expected, rtol=TABLE_RTOL, atol=1e-30)


@pytest.mark.parametrize("num_timesteps", [1000, 10])
@pytest.mark.parametrize("name", NAMES)
def test_named_schedule_tables_match_reference(name, num_timesteps):
    schedule = schedules.get_schedule(name, num_timesteps)
    assert schedule.num_timesteps == num_timesteps
    assert_tables_match(schedule, ref.schedule_tables(name, num_timesteps))


@pytest.mark.parametrize(
    ("name", "kwargs"),
    [
        ("linear", dict(beta_start=1e-5, beta_end=1e-2)),
        ("quadratic", dict(beta_start=5e-4, beta_end=0.05)),
        ("sigmoid", dict(beta_start=1e-5, beta_end=1e-2)),
        ("cosine", dict(s=0.02, max_beta=0.9)),
    ],
)
def test_schedule_parameters_are_used(name, kwargs):
    schedule = schedules.get_schedule(name, 200, **kwargs)
    assert_tables_match(schedule, ref.schedule_tables(name, 200, **kwargs))


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


# Long schedules with large betas drive abar below float32's range; the cast to float32 then
# warns (1 / sqrt(abar) overflows). The float64 property under test is unaffected.
@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")
@given(named_schedule())
def test_alphas_cumprod_strictly_decreasing_in_float64(case):
    name, num_timesteps, kwargs = case
    betas = schedules.beta_table(name, num_timesteps, **kwargs)
    assert betas.dtype == np.float64 and betas.shape == (num_timesteps,)
    assert np.all((betas > 0.0) & (betas < 1.0))
    alphas_cumprod = np.cumprod(1.0 - betas)
    assert np.all(np.diff(alphas_cumprod) < 0.0)
    assert alphas_cumprod[0] < 1.0
    stored = np.asarray(schedules.from_betas(betas).alphas_cumprod)
    assert np.all(np.diff(stored) <= 0.0)


@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")
@given(named_schedule())
def test_posterior_variance_at_most_beta(case):
    name, num_timesteps, kwargs = case
    schedule = schedules.get_schedule(name, num_timesteps, **kwargs)
    posterior_variance = np.asarray(schedule.posterior_variance)
    betas = np.asarray(schedule.betas)
    assert np.all(posterior_variance <= betas)
    assert np.all(posterior_variance[1:] > 0.0)


@given(
    st.lists(st.floats(1e-6, 0.999), min_size=2, max_size=60).map(np.asarray),
)
def test_from_betas_properties(betas):
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
        ([0.1, 1.0], r"out of range at indices \[1\]"),
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
