"""Tests of ``diffusion_jax.diffusion`` against the float64 reference in ``reference.py``.

Every function is compared, for all four schedules (T = 1000), for image ``[B, H, W, C]`` and
vector ``[B, D]`` data, with ``t`` covering 0, 1, T-1 and random steps. ``p_mean_variance`` and
``p_sample`` run every parameterisation (eps, x0, v) x variance (fixed_small, fixed_large,
learned_range) x clipping (off, [-1, 1], a range); ``ddim_step`` runs eta in {0, 0.5, 1} with any
``t_prev < t`` including -1; ``predict_x0``, ``training_target`` and ``mse_per_x0_mse`` (the
eps/x0/v table) run every parameterisation. These sweeps call the functions eagerly.

Under ``chex.variants`` (``CoreUnderVariantsTest``): the same reference checks, for the cosine
schedule and image data, run each core function under ``with_jit``, ``without_jit`` and
``with_pmap``; the pmap variant splits the batch of 8 over the eight fake CPU devices of
``conftest.py`` (one example per device), the schedule shared, the string options closed over.

Tolerances (float32 results against float64): data-space quantities (x_t, means, x_0, eps, v)
within 1e-5 (|want| + 1), i.e. 1e-5 absolute for O(1) values and 1e-5 relative for large ones;
variances within 1e-5 relative (exactly 0 where the reference is 0); log-variances within
1e-5 (|want| + 1). Recovering x_0 from eps divides by sqrt(abar_t) (abar_{T-1} = 2.4e-9 for
cosine), so it is also allowed 1e-6 (|x_t| + |eps|) / sqrt(abar_t); recovering eps from x_0
likewise 1e-6 (|x_t| + |x_0|) / sqrt(1 - abar_t); what depends on them inherits the allowance
times its coefficient. Quantities near 1 - abar are taken from the float64-built tables, so
q_mean_variance's variance and ddim_step at small t are held to float32 precision (dedicated
tests below; ``DDIM_CANCELLATION`` is the allowance for a float32 subtraction, now 0). Scalar
tolerances are checked with ``chex.assert_trees_all_close``; the per-element allowances with
``reference.assert_close``.

Properties (hypothesis): empirical mean and variance of ``q_sample`` over 100k draws within
5 standard errors; x_0 <-> eps <-> v round trips. Also: compile once per shape
(``chex.assert_max_traces``), DDIM(t-1, eta=1) == ``p_sample(fixed_small)`` given the same noise,
and ``ValueError`` for bad t shapes and dtypes, mismatched shapes and unknown options.
"""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference as ref
from absl.testing import parameterized
from hypothesis import given
from hypothesis import strategies as st

from diffusion_jax import diffusion, schedules

NAMES = ("linear", "quadratic", "sigmoid", "cosine")
PARAMETERIZATIONS = ("eps", "x0", "v")
VARIANCES = ("fixed_small", "fixed_large", "learned_range")
CLIPS = {"noclip": False, "clip": True, "range": (-0.5, 0.75)}
# A batch of 8 throughout: the pmap variant gives one example to each of the eight fake
# devices, and one batch size means the eager calls compile each primitive once.
SHAPES = {"image": (8, 4, 4, 2), "vector": (8, 3)}
T = 1000
RTOL = 1e-5
AMPLIFIED = 1e-6  # allowance per unit of 1 / sqrt(abar) (or 1 / sqrt(1 - abar)) amplification


@functools.cache
def schedule_pair(name: str):
    """(the package's Schedule, the reference tables) of a named schedule with T = 1000."""
    return schedules.get_schedule(name, T), ref.schedule_tables(name, T)


def draw_case(shape, seed: int, out_channels_factor: int = 1):
    """Random float32 inputs: t (with 0, T-1 and 1 forced), x0 in [-1, 1], noise, x_t, output."""
    rng = np.random.default_rng(seed)
    batch = shape[0]
    t = rng.integers(0, T, batch)
    t[:3] = [0, T - 1, 1]
    x0 = rng.uniform(-1.0, 1.0, shape).astype(np.float32)
    noise = rng.standard_normal(shape).astype(np.float32)
    x_t = rng.standard_normal(shape).astype(np.float32) * 1.2
    out_shape = (*shape[:-1], shape[-1] * out_channels_factor)
    output = rng.standard_normal(out_shape).astype(np.float32)
    if out_channels_factor == 2:  # learned_range: the variance half lives in [-1, 1].
        output[..., shape[-1] :] = rng.uniform(-1.0, 1.0, (*shape[:-1], shape[-1]))
    return jnp.asarray(t, jnp.int32), x0, noise, x_t, output


def x0_allowance(tab, t, x_t, out, parameterization):
    """Extra error allowed on an x_0 recovered from eps: it is amplified by 1 / sqrt(abar_t)."""
    if parameterization != "eps":
        return 0.0
    abar = ref.at(tab["alphas_cumprod"], t, np.ndim(x_t))
    return AMPLIFIED * (np.abs(x_t) + np.abs(out)) / np.sqrt(abar)


def data_close(got, want, extra=0.0, what=""):
    """|got - want| <= RTOL (|want| + 1) + extra; ``extra`` a scalar or per-element allowance."""
    if np.ndim(extra) == 0:
        atol = RTOL + float(extra)
        chex.assert_trees_all_close(got, want, rtol=RTOL, atol=atol, custom_message=what)
    else:
        ref.assert_close(got, want, rtol=RTOL, scale=1.0, extra=extra, what=what)


def variance_close(got, want, what=""):
    """|got - want| <= RTOL |want|; the atol only lets an exact 0 match a reference 0."""
    chex.assert_trees_all_close(got, want, rtol=RTOL, atol=1e-30, custom_message=what)


def log_variance_close(got, want, what=""):
    """|got - want| <= RTOL (|want| + 1)."""
    chex.assert_trees_all_close(got, want, rtol=RTOL, atol=RTOL, custom_message=what)


def eager(fn, *args):
    """Calls ``fn`` as it is: the sweeps' way of running a core function."""
    return fn(*args)


# ---------------------------------------------------------------------------- forward process


def check_q_sample(name, shape, call=eager):
    schedule, tab = schedule_pair(name)
    t, x0, noise, _, _ = draw_case(shape, 0)
    got = call(diffusion.q_sample, schedule, x0, t, noise)
    chex.assert_shape(got, shape)
    chex.assert_type(got, jnp.float32)
    data_close(got, ref.q_sample(tab, x0, t, noise), what="x_t")


def check_q_mean_variance(name, shape, call=eager):
    schedule, tab = schedule_pair(name)
    t, x0, _, _, _ = draw_case(shape, 1)
    mean, variance, log_variance = call(diffusion.q_mean_variance, schedule, x0, t)
    chex.assert_shape((variance, log_variance), (shape[0],) + (1,) * (len(shape) - 1))
    want_mean, want_var, want_log_var = ref.q_mean_variance(tab, x0, t)
    data_close(mean, want_mean, what="mean")
    log_variance_close(log_variance, want_log_var, "log_variance")
    # 1 - abar is well conditioned only in absolute terms once abar is rounded to float32; see
    # test_q_mean_variance_variance_is_relatively_precise for the relative check.
    chex.assert_trees_all_close(variance, want_var, rtol=RTOL, atol=1e-7)


def check_q_posterior_mean_variance(name, shape, call=eager):
    schedule, tab = schedule_pair(name)
    t, x0, _, x_t, _ = draw_case(shape, 2)
    got = call(diffusion.q_posterior_mean_variance, schedule, x0, x_t, t)
    mean, variance, log_variance = got
    want_mean, want_var, want_log_var = ref.q_posterior(tab, x0, x_t, t)
    data_close(mean, want_mean, what="posterior mean")
    variance_close(variance, want_var, "posterior variance")
    log_variance_close(log_variance, want_log_var, "posterior log_variance")
    # Index 0 (the last reverse step) returns x_0 with variance 0 and the log clipped.
    chex.assert_trees_all_close(mean[0], x0[0], rtol=0.0, atol=1e-6)
    assert float(variance[0].max()) == 0.0
    chex.assert_trees_all_close(
        log_variance[0].ravel(), tab["posterior_log_variance_clipped"][1:2], rtol=1e-7
    )


def check_predictions_and_v_target(name, shape, call=eager):
    schedule, tab = schedule_pair(name)
    t, x0, noise, x_t, out = draw_case(shape, 3)
    nd = len(shape)
    abar = ref.at(tab["alphas_cumprod"], t, nd)
    one_minus = ref.at(tab["one_minus_alphas_cumprod"], t, nd)

    def predictions(schedule, x0, x_t, t, noise, out):
        return (
            diffusion.predict_x0_from_eps(schedule, x_t, t, out),
            diffusion.predict_eps_from_x0(schedule, x_t, t, x0),
            diffusion.predict_x0_from_v(schedule, x_t, t, out),
            diffusion.v_target(schedule, x0, t, noise),
        )

    x0_from_eps, eps_from_x0, x0_from_v, v = call(predictions, schedule, x0, x_t, t, noise, out)
    chex.assert_shape((x0_from_eps, eps_from_x0, x0_from_v, v), shape)

    extra = AMPLIFIED * (np.abs(x_t) + np.abs(out)) / np.sqrt(abar)
    data_close(x0_from_eps, ref.x0_from_eps(tab, x_t, t, out), extra, "predict_x0_from_eps")
    extra = AMPLIFIED * (np.abs(x_t) + np.abs(x0)) / np.sqrt(one_minus)
    data_close(eps_from_x0, ref.eps_from_x0(tab, x_t, t, x0), extra, "predict_eps_from_x0")
    data_close(x0_from_v, ref.x0_from_v(tab, x_t, t, out), what="predict_x0_from_v")
    data_close(v, ref.v_target(tab, x0, t, noise), what="v_target")


def check_prediction_table(name, parameterization, shape, call=eager):
    """predict_x0, training_target and mse_per_x0_mse: the three entries of the eps/x0/v table."""
    schedule, tab = schedule_pair(name)
    t, x0, noise, x_t, out = draw_case(shape, 16)
    snr = ref.snr(tab, t).astype(np.float32)

    def table(schedule, out, x_t, t, x0, noise, snr):
        return (
            diffusion.predict_x0(schedule, out, x_t, t, parameterization),
            diffusion.training_target(schedule, x0, t, noise, parameterization),
            diffusion.mse_per_x0_mse(snr, parameterization),
        )

    pred_x0, target, ratio = call(table, schedule, out, x_t, t, x0, noise, snr)
    chex.assert_shape((pred_x0, target), shape)
    chex.assert_shape(ratio, (shape[0],))
    extra = x0_allowance(tab, t, x_t, out, parameterization)
    want_x0 = ref.predict_x0(tab, out, x_t, t, parameterization)
    data_close(pred_x0, want_x0, extra, f"predict_x0 {parameterization}")
    want_target = {"eps": noise, "x0": x0, "v": ref.v_target(tab, x0, t, noise)}
    data_close(target, want_target[parameterization], what=f"target {parameterization}")
    # x_t = sqrt(abar) x_0 + sqrt(1 - abar) eps at a fixed x_t: an error d in x_0 is an error
    # sqrt(SNR) d in eps and sqrt(SNR + 1) d in v, so the MSEs are SNR and SNR + 1 times MSE(x_0).
    snr64 = snr.astype(np.float64)
    want_ratio = {"eps": snr64, "x0": np.ones_like(snr64), "v": snr64 + 1.0}[parameterization]
    chex.assert_trees_all_close(ratio, want_ratio, rtol=RTOL, custom_message=parameterization)


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("name", NAMES)
def test_q_sample(name, shape):
    check_q_sample(name, shape)


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("name", NAMES)
def test_q_mean_variance(name, shape):
    check_q_mean_variance(name, shape)


@pytest.mark.parametrize("name", NAMES)
def test_q_mean_variance_variance_is_relatively_precise(name):
    schedule, tab = schedule_pair(name)
    t = jnp.array([0, 1, 2, 10, 100, 500, 900, T - 1], jnp.int32)
    _, variance, log_variance = diffusion.q_mean_variance(schedule, jnp.zeros((8, 2)), t)
    variance_close(variance[:, 0], tab["one_minus_alphas_cumprod"][np.asarray(t)], "variance")
    chex.assert_trees_all_close(variance, jnp.exp(log_variance), rtol=RTOL)


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("name", NAMES)
def test_q_posterior_mean_variance(name, shape):
    check_q_posterior_mean_variance(name, shape)


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("name", NAMES)
def test_predictions_and_v_target(name, shape):
    check_predictions_and_v_target(name, shape)


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("parameterization", PARAMETERIZATIONS)
@pytest.mark.parametrize("name", NAMES)
def test_prediction_table(name, parameterization, shape):
    check_prediction_table(name, parameterization, shape)


# ---------------------------------------------------------------------------- reverse process


def reverse_options(parameterization, variance, clip_x0):
    return dict(parameterization=parameterization, variance=variance, clip_x0=clip_x0)


def check_p_mean_variance(name, parameterization, variance, clip_x0, shape, seed, call=eager):
    schedule, tab = schedule_pair(name)
    factor = 2 if variance == "learned_range" else 1
    t, _, _, x_t, output = draw_case(shape, seed, factor)
    options = reverse_options(parameterization, variance, clip_x0)
    got = call(functools.partial(diffusion.p_mean_variance, **options), schedule, output, x_t, t)
    want = ref.p_mean_variance(tab, output, x_t, t, parameterization, variance, clip_x0)
    chex.assert_shape(got, shape)
    chex.assert_type(got, jnp.float32)
    mean, var, log_var, pred_x0 = got
    want_mean, want_var, want_log_var, want_x0 = want
    extra_x0 = x0_allowance(tab, t, x_t, output[..., : shape[-1]], parameterization)
    data_close(pred_x0, want_x0, extra_x0, "pred_x0")
    coef1 = ref.at(tab["posterior_mean_coef1"], t, len(shape))
    data_close(mean, want_mean, coef1 * extra_x0, "mean")
    variance_close(var, want_var, "variance")
    log_variance_close(log_var, want_log_var, "log_variance")
    return got


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("clip_x0", CLIPS.values(), ids=CLIPS.keys())
@pytest.mark.parametrize("variance", VARIANCES)
@pytest.mark.parametrize("parameterization", PARAMETERIZATIONS)
@pytest.mark.parametrize("name", NAMES)
def test_p_mean_variance(name, parameterization, variance, clip_x0, shape):
    check_p_mean_variance(name, parameterization, variance, clip_x0, shape, seed=4)


def test_p_mean_variance_clipping_is_applied():
    schedule, _ = schedule_pair("linear")
    t, _, _, x_t, _ = draw_case((8, 3), 5)
    wild = jnp.full((8, 3), 3.0)
    kwargs = dict(parameterization="x0", variance="fixed_small")
    assert float(jnp.max(diffusion.p_mean_variance(schedule, wild, x_t, t, **kwargs)[3])) == 1.0
    pred = diffusion.p_mean_variance(schedule, -wild, x_t, t, clip_x0=(-0.5, 0.75), **kwargs)[3]
    assert float(jnp.min(pred)) == -0.5
    pred = diffusion.p_mean_variance(schedule, wild, x_t, t, clip_x0=False, **kwargs)[3]
    chex.assert_trees_all_equal(pred, wild)


def test_learned_range_endpoints():
    """v = -1 gives the clipped posterior log-variance, v = +1 gives log(beta_t)."""
    schedule, tab = schedule_pair("cosine")
    t, _, _, x_t, output = draw_case((8, 3), 6, out_channels_factor=2)
    for v, table in [(-1.0, tab["posterior_log_variance_clipped"]), (1.0, np.log(tab["betas"]))]:
        output = output.copy()
        output[..., 3:] = v
        _, var, log_var, _ = diffusion.p_mean_variance(
            schedule, output, x_t, t, variance="learned_range"
        )
        log_variance_close(log_var[:, 0], table[np.asarray(t)], f"v = {v}")
        chex.assert_trees_all_close(var, jnp.exp(log_var), rtol=1e-6)


def check_p_sample(name, parameterization, variance, shape, call=eager):
    schedule, tab = schedule_pair(name)
    factor = 2 if variance == "learned_range" else 1
    t, _, noise, x_t, output = draw_case(shape, 7, factor)
    step = functools.partial(
        diffusion.p_sample, **reverse_options(parameterization, variance, True)
    )
    got = call(step, schedule, output, x_t, t, noise)
    chex.assert_shape(got, shape)
    # The reference adds no noise at the last step (t[0] == 0), where sigma z would be far
    # outside the tolerance.
    want = ref.p_sample(tab, output, x_t, t, noise, parameterization, variance, True)
    extra_x0 = x0_allowance(tab, t, x_t, output[..., : shape[-1]], parameterization)
    coef1 = ref.at(tab["posterior_mean_coef1"], t, len(shape))
    data_close(got, want, coef1 * extra_x0, "x_{t-1}")
    return got


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("variance", VARIANCES)
@pytest.mark.parametrize("parameterization", PARAMETERIZATIONS)
@pytest.mark.parametrize("name", NAMES)
def test_p_sample(name, parameterization, variance, shape):
    got = check_p_sample(name, parameterization, variance, shape)
    # No noise at the last step (t[0] == 0): the sample is the mean exactly.
    schedule, _ = schedule_pair(name)
    factor = 2 if variance == "learned_range" else 1
    t, _, _, x_t, output = draw_case(shape, 7, factor)
    options = reverse_options(parameterization, variance, True)
    mean = diffusion.p_mean_variance(schedule, output, x_t, t, **options)[0]
    chex.assert_trees_all_equal(got[0], mean[0])
    assert not np.allclose(got[1:], mean[1:])


# Extra absolute error allowed per unit of (|eps| + |noise|) / sqrt(1 - abar_prev) for forming
# 1 - abar by float32 subtraction. ddim_step takes these from the float64-built tables, so none
# is allowed; test_ddim_step_precision_at_small_t pins <= 3e-7 relative near t = 0.
DDIM_CANCELLATION = 0.0


def ddim_allowance(tab, t, t_prev, x_t, out, noise, parameterization, clip_x0, cancellation):
    """Extra error allowed on a DDIM step: the x_0 amplification and the 1 - abar cancellation."""
    nd = np.ndim(x_t)
    t_prev = np.asarray(t_prev)
    to_x0 = ref.at(t_prev < 0, np.arange(len(t_prev)), nd)
    safe_prev = np.maximum(t_prev, 0)
    abar_prev = np.where(to_x0, 1.0, ref.at(tab["alphas_cumprod"], safe_prev, nd))
    one_minus_prev = ref.at(tab["one_minus_alphas_cumprod"], safe_prev, nd)
    out = np.asarray(out)[..., : np.shape(x_t)[-1]]
    pred_x0 = ref.clip(ref.predict_x0(tab, out, x_t, t, parameterization), clip_x0)
    eps = ref.eps_from_x0(tab, x_t, t, pred_x0)
    amplified = np.sqrt(abar_prev) * x0_allowance(tab, t, x_t, out, parameterization)
    cancelled = cancellation * (np.abs(eps) + np.abs(noise)) / np.sqrt(one_minus_prev)
    return amplified + np.where(to_x0, 0.0, cancelled)


def check_ddim_step(name, parameterization, eta, shape, clips, call=eager):
    schedule, tab = schedule_pair(name)
    t, _, noise, x_t, output = draw_case(shape, 8)
    rng = np.random.default_rng(9)
    # Any t_prev < t, including -1 ("to x_0"); t_prev = t - 1 for the first examples.
    t_prev = np.array([rng.integers(-1, int(s)) if s > 0 else -1 for s in np.asarray(t)])
    t_prev[1] = -1  # from T - 1 straight to x_0
    t_prev[2] = 0
    t_prev = jnp.asarray(t_prev, jnp.int32)
    for clip_x0 in clips:
        options = dict(eta=eta, parameterization=parameterization, clip_x0=clip_x0)
        step = functools.partial(diffusion.ddim_step, **options)
        got = call(step, schedule, output, x_t, t, t_prev, noise)
        chex.assert_shape(got, shape)
        want = ref.ddim_step(tab, output, x_t, t, t_prev, noise, eta, parameterization, clip_x0)
        extra = ddim_allowance(
            tab, t, t_prev, x_t, output, noise, parameterization, clip_x0, DDIM_CANCELLATION
        )
        data_close(got, want, extra, f"ddim x_prev (clip_x0={clip_x0})")


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("parameterization", PARAMETERIZATIONS)
@pytest.mark.parametrize("name", NAMES)
def test_ddim_step_any_t_prev(name, parameterization, eta, shape):
    check_ddim_step(name, parameterization, eta, shape, CLIPS.values())


def test_ddim_step_precision_at_small_t():
    for name in NAMES:
        schedule, tab = schedule_pair(name)
        for eta in (0.0, 1.0):
            for parameterization in PARAMETERIZATIONS:
                t, _, noise, x_t, output = draw_case((8, 3), 15)
                t = jnp.array([1, 2, 3, 1, 5, 10, 4, 20], jnp.int32)
                t_prev = jnp.array([0, 1, 2, -1, 0, 3, -1, 19], jnp.int32)
                got = diffusion.ddim_step(
                    schedule,
                    output,
                    x_t,
                    t,
                    t_prev,
                    noise,
                    eta=eta,
                    clip_x0=False,
                    parameterization=parameterization,
                )
                want = ref.ddim_step(
                    tab, output, x_t, t, t_prev, noise, eta, parameterization, False
                )
                extra = ddim_allowance(
                    tab, t, t_prev, x_t, output, noise, parameterization, False, 0.0
                )
                data_close(got, want, extra, f"{name} eta={eta} {parameterization}")


@pytest.mark.parametrize("variance", VARIANCES)
@pytest.mark.parametrize("parameterization", PARAMETERIZATIONS)
def test_ddim_full_steps_eta_one_equals_p_sample_fixed_small(parameterization, variance):
    """Song et al.: eta = 1 with every step is the DDPM ancestral step with fixed_small."""
    factor = 2 if variance == "learned_range" else 1
    for name in NAMES:
        schedule, tab = schedule_pair(name)
        for shape in SHAPES.values():
            t, _, noise, x_t, output = draw_case(shape, 10, factor)
            t = t.at[3].set(2)
            for clip_x0 in (True, False):
                kwargs = dict(parameterization=parameterization, clip_x0=clip_x0)
                ddim = diffusion.ddim_step(
                    schedule, output, x_t, t, t - 1, noise, eta=1.0, variance=variance, **kwargs
                )
                mean_part = output[..., : shape[-1]]
                ancestral = diffusion.p_sample(
                    schedule, mean_part, x_t, t, noise, variance="fixed_small", **kwargs
                )
                extra = ddim_allowance(
                    tab,
                    t,
                    t - 1,
                    x_t,
                    mean_part,
                    noise,
                    parameterization,
                    clip_x0,
                    DDIM_CANCELLATION,
                )
                data_close(ddim, ancestral, extra, f"{name} {shape} clip={clip_x0}")


@pytest.mark.parametrize("parameterization", PARAMETERIZATIONS)
def test_ddim_accepts_learned_variance_output(parameterization):
    schedule, _ = schedule_pair("cosine")
    t, _, noise, x_t, output = draw_case((8, 4, 4, 2), 11, out_channels_factor=2)
    kwargs = dict(eta=0.5, parameterization=parameterization)
    learned = diffusion.ddim_step(
        schedule, output, x_t, t, t - 1, noise, variance="learned_range", **kwargs
    )
    first_half = diffusion.ddim_step(schedule, output[..., :2], x_t, t, t - 1, noise, **kwargs)
    chex.assert_trees_all_equal(learned, first_half)


def test_dynamic_threshold_rejects_a_bad_percentile():
    with pytest.raises(ValueError, match="percentile"):
        diffusion.dynamic_threshold(1.5)


# ---------------------------------------------------------------------------- chex variants

IMAGE = SHAPES["image"]


class CoreUnderVariantsTest(chex.TestCase):
    """Each core function under ``jit``, eagerly and under ``pmap``, against the reference.

    The cosine schedule (the largest 1 / sqrt(abar) amplification) and image data, one example
    per device under pmap; the sweeps above cover the other schedules, vector data and the
    remaining option values eagerly.
    """

    def call(self, fn, *args):
        return ref.call_variant(self.variant, fn, *args)

    @chex.variants(with_jit=True, without_jit=True, with_pmap=True)
    def test_forward_process(self):
        check_q_sample("cosine", IMAGE, self.call)
        check_q_mean_variance("cosine", IMAGE, self.call)
        check_q_posterior_mean_variance("cosine", IMAGE, self.call)
        check_predictions_and_v_target("cosine", IMAGE, self.call)
        schedule, _ = schedule_pair("cosine")
        t = draw_case(IMAGE, 0)[0]
        got = self.call(functools.partial(diffusion.extract, ndim=4), schedule.log_snr, t)
        chex.assert_trees_all_equal(got, ref.at(schedule.log_snr, t, 4).astype(np.float32))

    @chex.variants(with_jit=True, without_jit=True, with_pmap=True)
    @parameterized.parameters(*PARAMETERIZATIONS)
    def test_prediction_table(self, parameterization):
        check_prediction_table("cosine", parameterization, IMAGE, self.call)

    @chex.variants(with_jit=True, without_jit=True, with_pmap=True)
    @parameterized.parameters(*VARIANCES)
    def test_split_model_output(self, variance):
        channels = IMAGE[-1]
        factor = 2 if variance == "learned_range" else 1
        _, _, _, x_t, output = draw_case(IMAGE, 17, factor)
        split = functools.partial(diffusion.split_model_output, variance=variance)
        mean_out, var_out = ref.call_variant(self.variant, split, output, x_t, shared=())
        chex.assert_trees_all_equal(mean_out, output[..., :channels])
        if variance == "learned_range":
            chex.assert_trees_all_equal(var_out, output[..., channels:])
        else:
            assert var_out is None

    # Every parameterisation and every variance once: each is its own traced code path.
    @chex.variants(with_jit=True, without_jit=True, with_pmap=True)
    @parameterized.parameters(*zip(PARAMETERIZATIONS, VARIANCES, strict=True))
    def test_reverse_step(self, parameterization, variance):
        check_p_mean_variance("cosine", parameterization, variance, True, IMAGE, 4, self.call)
        check_p_sample("cosine", parameterization, variance, IMAGE, self.call)

    @chex.variants(with_jit=True, without_jit=True, with_pmap=True)
    def test_ddim_step(self):
        check_ddim_step("cosine", "eps", 0.5, IMAGE, [True], self.call)

    @chex.variants(with_jit=True, without_jit=True, with_pmap=True)
    def test_ddim_t_prev_minus_one(self):
        """-1 must mean abar = 1 (land on the predicted x_0), not wrap to index T-1."""
        schedule, tab = schedule_pair("cosine")
        t, _, noise, x_t, output = draw_case((8, 3), 12)
        step = functools.partial(diffusion.ddim_step, eta=1.0, clip_x0=False)
        t_prev = jnp.full((8,), -1, jnp.int32)
        got = self.call(step, schedule, output, x_t, t, t_prev, noise)
        pred_x0 = diffusion.predict_x0_from_eps(schedule, x_t, t, output)
        chex.assert_trees_all_close(got, pred_x0, rtol=1e-6, atol=1e-6)
        want = ref.ddim_step(tab, output, x_t, t, t_prev, noise, 1.0, "eps", False)
        extra = ddim_allowance(tab, t, t_prev, x_t, output, noise, "eps", False, 0.0)
        data_close(got, want, extra, "x_0")
        # What a wrapped -1 would give (eagerly: the control needs no variant).
        wrapped = step(schedule, output, x_t, t, jnp.full((8,), T - 1, jnp.int32), noise)
        assert not np.allclose(got, wrapped)

    @chex.variants(with_jit=True, without_jit=True, with_pmap=True)
    def test_dynamic_threshold_clip_option(self):
        """Imagen: s = max(quantile_p |x_0|, 1) per example; x_0 -> clip(x_0, -s, s) / s."""
        schedule, _ = schedule_pair("linear")
        t, _, _, x_t, _ = draw_case(IMAGE, 13)
        output = np.random.default_rng(14).normal(0.0, 2.0, IMAGE).astype(np.float32)
        output[0] *= 0.1  # inside [-1, 1]: untouched
        threshold = diffusion.dynamic_threshold(0.9)
        mean_variance = functools.partial(
            diffusion.p_mean_variance, parameterization="x0", clip_x0=threshold
        )
        got = self.call(mean_variance, schedule, output, x_t, t)[3]
        flat = np.abs(output.reshape(IMAGE[0], -1)).astype(np.float64)
        s = np.maximum(np.quantile(flat, 0.9, axis=1), 1.0).reshape(-1, 1, 1, 1)
        chex.assert_trees_all_close(got, np.clip(output, -s, s) / s, rtol=1e-5, atol=1e-6)
        chex.assert_trees_all_close(got[0], output[0], rtol=1e-6)


# ---------------------------------------------------------------------------- compile once


def test_compiles_once_per_shape():
    chex.clear_trace_counter()

    @jax.jit
    @chex.assert_max_traces(n=1)
    def reverse_steps(schedule, output, x_t, t, noise):
        kwargs = dict(parameterization="v", variance="learned_range", clip_x0=(-1.0, 1.0))
        mean, _, _, _ = diffusion.p_mean_variance(schedule, output, x_t, t, **kwargs)
        sample = diffusion.p_sample(schedule, output, x_t, t, noise, **kwargs)
        ddim = diffusion.ddim_step(schedule, output, x_t, t, t - 1, noise, eta=0.3, **kwargs)
        forward = diffusion.q_sample(schedule, mean, t, noise)
        return sample, ddim, forward

    for seed, name in enumerate(NAMES):  # Same T and shapes: one trace for all.
        schedule, _ = schedule_pair(name)
        t, _, noise, x_t, output = draw_case((8, 4, 4, 2), 20 + seed, out_channels_factor=2)
        chex.assert_tree_all_finite(reverse_steps(schedule, output, x_t, t, noise))
    with pytest.raises(AssertionError):  # A new shape is a new trace, over the limit.
        t, _, noise, x_t, output = draw_case((8, 3), 30, out_channels_factor=2)
        reverse_steps(schedule, output, x_t, t, noise)


# ---------------------------------------------------------------------------- properties


@given(
    name=st.sampled_from(NAMES),
    t=st.lists(st.integers(0, T - 1), min_size=4, max_size=4),
    x0=st.lists(st.floats(-1.0, 1.0), min_size=4, max_size=4),
    seed=st.integers(0, 2**31 - 1),
)
def test_q_sample_empirical_moments(name, t, x0, seed):
    """Mean sqrt(abar) x_0 and variance 1 - abar, each within 5 standard errors of 100k draws."""
    schedule, tab = schedule_pair(name)
    draws = 100_000
    t = jnp.asarray(t, jnp.int32)
    x0 = np.asarray(x0, np.float32)
    x0_rows = jnp.broadcast_to(jnp.asarray(x0)[:, None], (4, draws))
    noise = jax.random.normal(jax.random.key(seed), (4, draws))
    samples = np.asarray(diffusion.q_sample(schedule, x0_rows, t, noise), np.float64)
    want_mean = np.sqrt(tab["alphas_cumprod"][np.asarray(t)]) * x0
    want_var = tab["one_minus_alphas_cumprod"][np.asarray(t)]
    mean, var = samples.mean(axis=1), samples.var(axis=1)
    assert np.all(np.abs(mean - want_mean) <= 5.0 * np.sqrt(want_var / draws))
    assert np.all(np.abs(var - want_var) <= 5.0 * want_var * np.sqrt(2.0 / draws))


@given(
    name=st.sampled_from(NAMES),
    t=st.lists(st.integers(0, T - 1), min_size=3, max_size=3),
    seed=st.integers(0, 2**31 - 1),
)
def test_x0_eps_v_round_trips(name, t, seed):
    schedule, tab = schedule_pair(name)
    rng = np.random.default_rng(seed)
    t = jnp.asarray(t, jnp.int32)
    x0 = rng.uniform(-1.0, 1.0, (3, 8)).astype(np.float32)
    noise = rng.standard_normal((3, 8)).astype(np.float32)
    abar = ref.at(tab["alphas_cumprod"], t, 2)
    one_minus = ref.at(tab["one_minus_alphas_cumprod"], t, 2)

    x_t = diffusion.q_sample(schedule, x0, t, noise)
    # x_0 -> eps -> x_0 and eps -> x_0 -> eps.
    x0_back = diffusion.predict_x0_from_eps(schedule, x_t, t, noise)
    extra = AMPLIFIED * (np.abs(x_t) + np.abs(noise)) / np.sqrt(abar)
    data_close(x0_back, x0, extra, "x0 from eps")
    eps_back = diffusion.predict_eps_from_x0(schedule, x_t, t, x0)
    extra = AMPLIFIED * (np.abs(x_t) + np.abs(x0)) / np.sqrt(one_minus)
    data_close(eps_back, noise, extra, "eps from x0")
    # x_0 -> v -> x_0: a rotation, no amplification.
    v = diffusion.v_target(schedule, x0, t, noise)
    data_close(diffusion.predict_x0_from_v(schedule, x_t, t, v), x0, what="x0 from v")
    # v -> x_0 -> eps returns the noise, and v has unit variance per unit-variance input: the
    # rotation keeps x_t^2 + v^2 = x_0^2 + eps^2.
    eps_from_v = diffusion.predict_eps_from_x0(
        schedule, x_t, t, diffusion.predict_x0_from_v(schedule, x_t, t, v)
    )
    data_close(eps_from_v, noise, extra, "eps from v")
    data_close(np.square(x_t) + np.square(v), np.square(x0) + np.square(noise), what="norm")


# ---------------------------------------------------------------------------- errors


def error_case():
    schedule, _ = schedule_pair("linear")
    t, x0, noise, x_t, output = draw_case((8, 3), 40)
    return schedule, t, x0, noise, x_t, output


@pytest.mark.parametrize(
    ("bad_t", "match"),
    [
        (jnp.zeros((5,), jnp.int32), r"t must have shape \[B\] = \(8,\)"),
        (jnp.zeros((8, 1), jnp.int32), r"t must have shape \[B\] = \(8,\)"),
        (jnp.int32(3), r"t must have shape \[B\] = \(8,\)"),
        (jnp.zeros((8,), jnp.float32), "t must hold integer timesteps.*float32"),
    ],
)
def test_bad_t(bad_t, match):
    schedule, _, x0, noise, x_t, output = error_case()
    calls = [
        lambda: diffusion.q_sample(schedule, x0, bad_t, noise),
        lambda: diffusion.q_mean_variance(schedule, x0, bad_t),
        lambda: diffusion.q_posterior_mean_variance(schedule, x0, x_t, bad_t),
        lambda: diffusion.predict_x0_from_eps(schedule, x_t, bad_t, output),
        lambda: diffusion.predict_eps_from_x0(schedule, x_t, bad_t, x0),
        lambda: diffusion.predict_x0_from_v(schedule, x_t, bad_t, output),
        lambda: diffusion.v_target(schedule, x0, bad_t, noise),
        lambda: diffusion.p_mean_variance(schedule, output, x_t, bad_t),
        lambda: diffusion.p_sample(schedule, output, x_t, bad_t, noise),
        lambda: diffusion.ddim_step(schedule, output, x_t, bad_t, bad_t, noise),
    ]
    for call in calls:
        with pytest.raises(ValueError, match=match):
            call()


def test_bad_t_prev():
    schedule, t, _, noise, x_t, output = error_case()
    with pytest.raises(ValueError, match=r"t_prev must have shape \[B\]"):
        diffusion.ddim_step(schedule, output, x_t, t, t[:3], noise)
    with pytest.raises(ValueError, match="integer"):
        diffusion.ddim_step(schedule, output, x_t, t, t.astype(jnp.float32) - 1, noise)
    with pytest.raises(ValueError, match=r"t_prev must lie in \[-1, 999\].*\[-2\]"):
        diffusion.ddim_step(schedule, output, x_t, t, jnp.full_like(t, -2), noise)


def _calls_with_t(schedule, x0, noise, x_t, output, t, t_ok):
    """The core functions that take a t, each called with ``t`` (t_prev valid for ddim_step)."""
    return {
        "q_sample": lambda: diffusion.q_sample(schedule, x0, t, noise),
        "q_mean_variance": lambda: diffusion.q_mean_variance(schedule, x0, t),
        "q_posterior": lambda: diffusion.q_posterior_mean_variance(schedule, x0, x_t, t),
        "p_mean_variance": lambda: diffusion.p_mean_variance(schedule, output, x_t, t),
        "p_sample": lambda: diffusion.p_sample(schedule, output, x_t, t, noise),
        "ddim_step": lambda: diffusion.ddim_step(
            schedule, output, x_t, t, jnp.minimum(t_ok, t) - 1, noise
        ),
    }


@pytest.mark.parametrize("value", [1000, -1, 5000])
def test_concrete_out_of_range_t_raises_naming_the_range(value):
    schedule, t, x0, noise, x_t, output = error_case()  # T = 1000
    bad = t.at[3].set(value)
    for name, call in _calls_with_t(schedule, x0, noise, x_t, output, bad, t).items():
        with pytest.raises(
            ValueError, match=rf"t must lie in \[0, 999\] \(T = 1000\); got \[{value}\]"
        ):
            call()
            pytest.fail(name)


def test_checked_catches_traced_out_of_range_t_under_jit():
    schedule, t, x0, noise, x_t, output = error_case()
    noisy = diffusion.forward.checked(
        lambda x0, t, noise: diffusion.q_sample(schedule, x0, t, noise)
    )
    np.testing.assert_allclose(
        noisy(x0, t, noise), diffusion.q_sample(schedule, x0, t, noise), rtol=1e-6, atol=1e-6
    )
    for value in (1000, -1):
        with pytest.raises(ValueError, match=r"t must lie in \[0, 999\].*got values from"):
            noisy(x0, t.at[0].set(value), noise)
    step = diffusion.forward.checked(
        lambda x_t, t, t_prev, noise: diffusion.ddim_step(schedule, output, x_t, t, t_prev, noise)
    )
    step(x_t, t, t - 1, noise)  # t_prev = -1 ("to x_0") is in range
    with pytest.raises(ValueError, match=r"t_prev must lie in \[-1, 999\]"):
        step(x_t, t, jnp.full_like(t, -2), noise)
    # Unwrapped, jit traces no check: t = T reads past the tables silently.
    assert not np.isfinite(
        jax.jit(lambda t: diffusion.q_sample(schedule, x0, t, noise))(t.at[0].set(1000))
    ).all()


@pytest.mark.parametrize("dtype", [jnp.uint8, jnp.int32])
def test_integer_data_is_refused_with_one_sentence(dtype):
    schedule, t, x0, noise, x_t, output = error_case()
    images = jnp.zeros(x0.shape, dtype)
    calls = {
        "q_sample": lambda: diffusion.q_sample(schedule, images, t, noise),
        "q_mean_variance": lambda: diffusion.q_mean_variance(schedule, images, t),
        "q_posterior": lambda: diffusion.q_posterior_mean_variance(schedule, images, x_t, t),
        "p_mean_variance": lambda: diffusion.p_mean_variance(schedule, output, images, t),
    }
    for call in calls.values():
        with pytest.raises(ValueError, match=r"scale images to float in \[-1, 1\]"):
            call()


def test_mismatched_shapes():
    schedule, t, x0, noise, x_t, output = error_case()
    other = jnp.zeros((8, 4))
    cases = [
        (lambda: diffusion.q_sample(schedule, x0, t, other), "x0 and noise"),
        (lambda: diffusion.q_posterior_mean_variance(schedule, other, x_t, t), "x0 and x_t"),
        (lambda: diffusion.predict_x0_from_eps(schedule, x_t, t, other), "x_t and eps"),
        (lambda: diffusion.predict_eps_from_x0(schedule, x_t, t, other), "x_t and x0"),
        (lambda: diffusion.predict_x0_from_v(schedule, x_t, t, other), "x_t and v"),
        (lambda: diffusion.v_target(schedule, x0, t, other), "x0 and noise"),
        (lambda: diffusion.p_sample(schedule, output, x_t, t, other), "x_t and noise"),
        (lambda: diffusion.ddim_step(schedule, output, x_t, t, t - 1, other), "x_t and noise"),
        (lambda: diffusion.q_sample(schedule, jnp.float32(1.0), t, noise), "batch axis"),
    ]
    for call, match in cases:
        with pytest.raises(ValueError, match=match):
            call()


def test_model_output_shape_errors():
    schedule, t, _, _, x_t, output = error_case()
    doubled = jnp.concatenate([output, output], axis=-1)
    with pytest.raises(ValueError, match=r"variance='learned_range'.*expected \(8, 6\), got"):
        diffusion.p_mean_variance(schedule, output, x_t, t, variance="learned_range")
    with pytest.raises(ValueError, match=r"x_t's shape \(8, 3\), got \(8, 6\).*learned_range"):
        diffusion.p_mean_variance(schedule, doubled, x_t, t, variance="fixed_small")
    with pytest.raises(ValueError, match=r"x_t's shape"):
        diffusion.ddim_step(schedule, doubled, x_t, t, t - 1, x_t)
    with pytest.raises(ValueError, match=r"x_t's shape"):
        diffusion.p_mean_variance(schedule, output[:, :2], x_t, t)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(parameterization="score"), r"Unknown parameterization 'score'.*'eps', 'x0', 'v'"),
        (dict(parameterization="epsilon"), "Unknown parameterization"),
        (dict(variance="learned"), r"Unknown variance 'learned'.*fixed_small"),
        (dict(clip_x0="yes"), "clip_x0 must be False, True"),
        (dict(clip_x0=(1.0,)), "clip_x0 must be False, True"),
        (dict(clip_x0=(0.0, 1.0, 2.0)), "clip_x0 must be False, True"),
        (dict(clip_x0=2.0), "clip_x0 must be False, True"),
        (dict(clip_x0=(1.0, -1.0)), r"low < high, got \(1.0, -1.0\)"),
    ],
)
def test_bad_options(kwargs, match):
    schedule, t, _, noise, x_t, output = error_case()
    with pytest.raises(ValueError, match=match):
        diffusion.p_mean_variance(schedule, output, x_t, t, **kwargs)
    with pytest.raises(ValueError, match=match):
        diffusion.p_sample(schedule, output, x_t, t, noise, **kwargs)
    with pytest.raises(ValueError, match=match):
        diffusion.ddim_step(schedule, output, x_t, t, t - 1, noise, **kwargs)
