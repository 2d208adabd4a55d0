"""DDIM inversion (``samplers.invert``) against exact answers.

For data N(mu, s^2) the probability-flow ODE is linear in EDM's variables (``x_bar = x / a``
with ``a = sqrt(abar)``, ``sigma = sqrt(1 - abar) / a``): ``x_bar(sigma) - mu`` is proportional to
``sqrt(s^2 + sigma^2)``, so the exact inversion of x0 to timestep t is

    x_t = a_t (mu + (x0 - mu) sqrt(s^2 + sigma_t^2) / s).

Against it the inversion converges at first order, and the round trip through
``sample(method="ddim", eta=0, x_T=...)`` returns x0 with an error that falls at first order
(both exact in the ODE limit). The discrete scheme itself is checked step for step against a
float64 recursion written from the DDIM equations, in every parameterisation.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import test_samplers
from test_samplers import MU, SCHEDULES, STD

from diffusion_jax import samplers
from diffusion_jax.samplers import inversion, timesteps_for

SCHEDULE = SCHEDULES["linear1000"]


exact_model, labelled_model = test_samplers.exact_model, test_samplers.labelled_model


ABAR = np.cumprod(1.0 - np.asarray(SCHEDULE.betas, np.float64))
X0 = MU + STD * np.asarray(jax.random.normal(jax.random.key(1), (256, 4)), np.float64)


def _invert(num_steps, parameterization="eps", x0=X0, **kwargs):
    model = exact_model(parameterization, schedule="linear1000")
    return samplers.invert(
        model,
        None,
        SCHEDULE,
        jnp.asarray(x0, jnp.float32),
        num_steps=num_steps,
        parameterization=parameterization,
        **kwargs,
    )


def _reconstruct(x_T, num_steps, parameterization="eps", **kwargs):
    return samplers.sample(
        exact_model(parameterization, schedule="linear1000"),
        None,
        SCHEDULE,
        jax.random.key(0),
        x_T.shape,
        method="ddim",
        num_steps=num_steps,
        parameterization=parameterization,
        clip_x0=False,
        x_T=x_T,
        **kwargs,
    )


def _exact_inversion(x0, t):
    """x_t of the exact probability-flow ODE from x0, float64."""
    a = np.sqrt(ABAR[t])
    sigma = np.sqrt(1.0 - ABAR[t]) / a
    return a * (MU + (x0 - MU) * np.sqrt(STD**2 + sigma**2) / STD)


def _reference_inversion(x0, timesteps):
    """The DDIM inversion recursion in float64 with the exact eps of N(MU, STD^2): each step
    x_to = a_to x0_from + s_to eps, x0_from = (x - s_from eps) / a_from, eps from the model at
    the step's start (at s_0 for the first step, from x0)."""
    ascending = timesteps[::-1]
    x, a_from, s_from = x0, 1.0, 0.0
    for i, t_to in enumerate(ascending):
        t_model = ascending[max(i - 1, 0)]
        a, s = np.sqrt(ABAR[t_model]), np.sqrt(1.0 - ABAR[t_model])
        eps = s * (x - a * MU) / (a**2 * STD**2 + s**2)
        x0_from = (x - s_from * eps) / a_from
        a_from, s_from = np.sqrt(ABAR[t_to]), np.sqrt(1.0 - ABAR[t_to])
        x = a_from * x0_from + s_from * eps
    return x


def test_inversion_and_round_trip_converge_at_first_order():
    """Errors (max over 1024 values) against the exact ODE: measured about 1.06 / 0.53 / 0.27
    for the inversion at 10 / 20 / 40 steps and 0.91 / 0.50 / 0.26 for the round trip, so
    each halving of the step cuts them 1.8-2.0x; the bound at 40 steps is 0.3."""
    inversion_errors, round_trip_errors = {}, {}
    for n in (10, 20, 40):
        x_T = _invert(n)
        exact = _exact_inversion(X0, timesteps_for(1000, n)[0])
        inversion_errors[n] = float(np.max(np.abs(np.asarray(x_T, np.float64) - exact)))
        round_trip = np.asarray(_reconstruct(x_T, n), np.float64)
        round_trip_errors[n] = float(np.max(np.abs(round_trip - X0)))
    print(f"max error: inversion {inversion_errors}, round trip {round_trip_errors}")
    for errors in (inversion_errors, round_trip_errors):
        ratios = [errors[10] / errors[20], errors[20] / errors[40]]
        assert all(1.6 < ratio < 2.4 for ratio in ratios), (errors, ratios)
        assert errors[40] < 0.3, errors


@pytest.mark.parametrize("parameterization", ["eps", "x0", "v"])
def test_matches_the_float64_recursion_in_every_parameterization(parameterization):
    """The same discrete steps whatever the model predicts; float32 against float64 (x_T's
    scale is about 1, the tolerance 2e-4); spacing ``leading`` starts at a timestep below
    T - 1 and the trailing grid's first step leaves x0 for t = 99."""
    for num_steps, spacing in ((8, "linspace"), (10, "trailing")):
        timesteps = timesteps_for(1000, num_steps, spacing)
        x_T = _invert(num_steps, parameterization, timestep_spacing=spacing)
        expected = _reference_inversion(X0, timesteps)
        np.testing.assert_allclose(np.asarray(x_T, np.float64), expected, atol=2e-4, rtol=0)


def test_plan_visits_the_sampler_timesteps_upwards():
    model_timesteps, tables = inversion.plan(SCHEDULE, np.array([999, 666, 333, 0]))
    np.testing.assert_array_equal(model_timesteps, [0, 0, 333, 666])
    np.testing.assert_allclose(tables["signal_from"], np.sqrt([1.0, *ABAR[[0, 333, 666]]]))
    np.testing.assert_allclose(tables["sigma_from"][0], 0.0)
    np.testing.assert_allclose(tables["signal_to"], np.sqrt(ABAR[[0, 333, 666, 999]]))


def test_stop_midway_and_continue_with_t_start():
    """``invert(t_stop=t)`` is the full inversion's state below t, and sampling from it with
    ``t_start=t`` runs the rest of the same grid: the round trip returns x0 as closely as the
    full one (its first half is the same steps)."""
    full = _invert(20, return_trajectory=True, trajectory_every=1)
    partial = _invert(20, t_stop=500)
    remaining = int(np.sum(timesteps_for(1000, 20) < 500))  # 10 steps: 0, 53, ..., 473
    chex.assert_trees_all_close(partial, full.xs[remaining], atol=1e-5, rtol=0)
    chex.assert_trees_all_equal(full.xs[0], jnp.asarray(X0, jnp.float32))
    back = np.asarray(_reconstruct(partial, 20, t_start=500), np.float64)
    whole = np.asarray(_reconstruct(full.samples, 20), np.float64)
    assert np.max(np.abs(back - X0)) < np.max(np.abs(whole - X0)), "half the steps, less error"


def test_guided_inversion_is_the_inversion_of_the_guided_model():
    x0 = jnp.asarray(X0[:32], jnp.float32)
    labels = jnp.arange(32) % 3
    kwargs = dict(num_steps=10, model_kwargs={"y": labels})
    expected = samplers.invert(
        labelled_model(pre_guided_scale=3.0), jnp.float32(1.0), SCHEDULES["cosine100"], x0, **kwargs
    )
    guided = samplers.invert(
        labelled_model(),
        jnp.float32(1.0),
        SCHEDULES["cosine100"],
        x0,
        guidance_scale=3.0,
        uncond_kwargs={"y": jnp.full(32, 3)},
        **kwargs,
    )
    chex.assert_trees_all_close(guided, expected, atol=2e-4, rtol=0)


def test_compiles_once_whatever_the_data():
    traces = []
    exact = exact_model(schedule="linear1000")  # built outside the trace (it is cached)

    def model_fn(params, x_t, t):
        traces.append(x_t.shape)
        return exact(params, x_t, t)

    for seed in (5, 6):
        x0 = jax.random.normal(jax.random.key(seed), (8, 4))
        samplers.invert(model_fn, None, SCHEDULE, x0, num_steps=7)
    assert len(traces) == 1, traces


@pytest.mark.parametrize(
    "x0, kwargs, message",
    [
        (jnp.zeros((8, 4), jnp.int32), {}, "x0 must be a float array"),
        (jnp.zeros((8,)), {}, "x0 must be a float array"),
        (jnp.zeros((8, 4)), {"num_steps": 0}, "num_steps must be in"),
        (jnp.zeros((8, 4)), {"parameterization": "score"}, "parameterization"),
        (jnp.zeros((8, 4)), {"t_stop": 0}, "t_stop must be in"),
        (jnp.zeros((8, 4)), {"t_stop": 1001}, "t_stop must be in"),
        (jnp.zeros((8, 4)), {"t_stop": 2.5}, "t_stop must be an int"),
        (jnp.zeros((8, 4)), {"guidance_scale": 2.0}, "guidance needs both"),
    ],
)
def test_errors(x0, kwargs, message):
    with pytest.raises(ValueError, match=message):
        samplers.invert(exact_model(schedule="linear1000"), None, SCHEDULE, x0, **kwargs)
