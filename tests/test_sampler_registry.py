"""The samplers' registry and their validated options.

The registry's names are the options' vocabulary; an unknown method is one error naming the
allowed ones; ``make_options`` takes exactly ``sample``'s options and returns a frozen, hashable
``SamplerOptions`` that holds what the compiled loop specialises on and nothing that is traced;
and a new method is one module (here, one made up in this file) plus its registry entry.
"""

from __future__ import annotations

import dataclasses
import inspect
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax import options, samplers
from diffusion_jax.diffusion import dynamic_threshold
from diffusion_jax.samplers import base, ddim, ddpm, dpm_solver, registry
from diffusion_jax.samplers.validation import SamplerOptions, make_options
from diffusion_jax.schedules import get_schedule
from diffusion_jax.timesteps import host_betas, timesteps_for

T = 100
SCHEDULE = get_schedule("cosine", T)
POINT = jnp.array([-0.7, 0.0, 0.4, 0.95])
SQRT_ABAR = jnp.asarray(SCHEDULE.sqrt_alphas_cumprod)
SIGMA = jnp.asarray(SCHEDULE.sqrt_one_minus_alphas_cumprod)


def point_model(params, x_t, t):
    """The ideal eps network for data that is always POINT: eps = (x_t - a POINT) / sigma."""
    return (x_t - SQRT_ABAR[t][:, None] * POINT) / SIGMA[t][:, None]


# The keyword-only options of sample, with their defaults.
SAMPLE_OPTIONS = {
    name: parameter.default
    for name, parameter in inspect.signature(samplers.sample).parameters.items()
    if parameter.kind is inspect.Parameter.KEYWORD_ONLY
}


def _options(**overrides) -> SamplerOptions:
    return make_options(point_model, SCHEDULE, (8, 4), **(SAMPLE_OPTIONS | overrides))


# ----------------------------------------------------------------------------- registry


def test_registry_names_are_the_options_vocabulary():
    assert registry.names() == options.SAMPLER_METHODS
    assert samplers.METHODS == options.SAMPLER_METHODS
    assert tuple(method.name for method in registry.BUILT_IN) == options.SAMPLER_METHODS
    for module in (ddpm, ddim, dpm_solver):  # one module per method, each defining METHOD
        assert isinstance(module.METHOD, base.Method)
        assert registry.get(module.METHOD.name) is module.METHOD


@pytest.mark.parametrize("method", ["lms", "DDIM", None])
def test_unknown_method_is_one_error_naming_the_allowed_ones(method):
    message = f"Unknown method {method!r}; expected one of {options.SAMPLER_METHODS}."
    with pytest.raises(options.ArgumentError, match=re.escape(message)) as error:
        samplers.sample(point_model, None, SCHEDULE, jax.random.key(0), (4, 4), method=method)
    assert error.value.argument == "method"
    with pytest.raises(options.ArgumentError, match=re.escape(message)):
        registry.get(method)


def test_register_refuses_a_taken_name_and_a_non_method():
    with pytest.raises(ValueError, match="'ddim' is already registered"):
        registry.register(ddim.METHOD._replace(takes_eta=False))
    with pytest.raises(ValueError, match=r"takes a samplers\.base\.Method, got dict"):
        registry.register({"name": "mine"})
    assert registry.names() == options.SAMPLER_METHODS


def test_an_allowed_but_unregistered_name_is_named(monkeypatch):
    monkeypatch.setitem(options.ALLOWED, "method", (*options.SAMPLER_METHODS, "lms"))
    with pytest.raises(ValueError, match=r"'lms' is allowed by .* no sampler module registers"):
        registry.get("lms")


# ----------------------------------------------------------------------------- options


def test_make_options_takes_exactly_sample_options():
    parameters = inspect.signature(make_options).parameters
    keyword_only = [n for n, p in parameters.items() if p.kind is inspect.Parameter.KEYWORD_ONLY]
    assert keyword_only == list(SAMPLE_OPTIONS)


def test_options_are_frozen_and_filled_in():
    sampler_options = _options(clip_x0=[-2.0, 2.0])
    assert sampler_options == SamplerOptions(
        method=ddpm.METHOD,
        shape=(8, 4),
        num_steps=T,  # None means T
        parameterization="eps",
        variance="fixed_small",
        clip_x0=(-2.0, 2.0),  # a list becomes a (hashable) tuple
        stochastic=True,
        trajectory_every=None,  # no trajectory asked for
    )
    with pytest.raises(dataclasses.FrozenInstanceError):
        sampler_options.num_steps = 10  # type: ignore[misc]
    assert _options(return_trajectory=True, num_steps=25).trajectory_every == 3  # ceil(25 / 10)


def test_options_shape_is_a_tuple_of_ints():
    sampler_options = make_options(point_model, SCHEDULE, [np.int64(8), 4], **SAMPLE_OPTIONS)
    assert sampler_options.shape == (8, 4) and type(sampler_options.shape[0]) is int


@pytest.mark.parametrize(
    "method, eta, stochastic",
    [("ddpm", 0.0, True), ("ddim", 0.0, False), ("ddim", 0.5, True), ("dpm_solver++", 0.0, False)],
)
def test_options_say_whether_the_updates_draw_noise(method, eta, stochastic):
    assert _options(method=method, eta=eta).stochastic is stochastic


def test_options_hold_nothing_traced():
    """What may change without recompiling gives equal (and equally hashed) options."""
    guided = dict(model_kwargs={"y": jnp.zeros(8, int)}, uncond_kwargs={"y": jnp.ones(8, int)})
    first = _options(method="ddim", eta=0.3, num_steps=6, guidance_scale=1.5, **guided)
    second = _options(
        method="ddim",
        eta=0.8,
        num_steps=6,
        timestep_spacing="trailing",
        first_index=16,
        guidance_scale=4.0,
        clip_x0=True,
        **guided,
    )
    assert first == second and hash(first) == hash(second)
    threshold = dynamic_threshold(0.99)
    for change in (
        dict(num_steps=7),
        dict(method="ddpm", eta=0.0),
        dict(eta=0.0),  # deterministic: no noise program
        dict(clip_x0=threshold),
        dict(return_trajectory=True),
    ):
        other = _options(**{**dict(method="ddim", eta=0.3, num_steps=6), **change})
        assert other != first, change
        hash(other)


# ----------------------------------------------------------------------------- a new method


def renoise_plan(schedule, timesteps):
    """x0-renoise, a made-up method: jump to the predicted x0, then noise it to the next
    visited timestep: x_s = sqrt(abar_s) x0 + sqrt(1 - abar_s) z (abar = 1 after the last)."""
    abar = np.append(np.cumprod(1.0 - host_betas(schedule)), 1.0)  # index -1: x0
    abar_next = abar[np.append(timesteps[1:], -1)]
    return schedule, {"signal": np.sqrt(abar_next), "noise_scale": np.sqrt(1.0 - abar_next)}


def renoise_update(step, carry):
    x0 = base.predicted_x0(step)
    return step.row["signal"] * x0 + step.row["noise_scale"] * step.noise, x0, carry


RENOISE = base.Method(
    "x0_renoise", plan=renoise_plan, update=renoise_update, stochastic=base.always
)


def test_a_new_method_is_one_module_and_its_registry_entry(monkeypatch):
    # What a new module's name adds to options.SamplerMethod, and its entry in the registry.
    monkeypatch.setitem(options.ALLOWED, "method", (*options.SAMPLER_METHODS, RENOISE.name))
    registry.register(RENOISE)
    try:
        key, shape = jax.random.key(7), (8, 4)
        trajectory = samplers.sample(
            point_model,
            None,
            SCHEDULE,
            key,
            shape,
            method=RENOISE.name,
            num_steps=5,
            timestep_spacing="leading",
            clip_x0=False,
            return_trajectory=True,
            trajectory_every=1,
        )
        steps = timesteps_for(T, 5, "leading")
        chex.assert_trees_all_equal(trajectory.timesteps, steps)
        # The exact model predicts POINT from any x_t, so the run lands on it...
        chex.assert_trees_all_close(trajectory.samples, jnp.broadcast_to(POINT, shape), atol=1e-5)
        chex.assert_trees_all_close(
            trajectory.pred_x0s, jnp.broadcast_to(POINT, (5, *shape)), atol=1e-4
        )
        # ... and the loop fed the update its plan's row and the noise of step k + 1.
        abar = np.asarray(SCHEDULE.alphas_cumprod, np.float64)[steps[1]]
        noise = np.asarray(samplers.step_noise(key, 1, shape), np.float64)
        expected = np.sqrt(abar) * np.asarray(POINT) + np.sqrt(1.0 - abar) * noise
        chex.assert_trees_all_close(trajectory.xs[1], expected, atol=1e-4)
        with pytest.raises(ValueError, match="eta only applies to method='ddim'"):
            samplers.sample(point_model, None, SCHEDULE, key, shape, method=RENOISE.name, eta=0.5)
    finally:
        registry.unregister(RENOISE.name)
    assert registry.names() == options.SAMPLER_METHODS
    with pytest.raises(ValueError, match=r"'x0_renoise' is allowed by .* no sampler module"):
        samplers.sample(point_model, None, SCHEDULE, jax.random.key(0), (4, 4), method=RENOISE.name)
