"""``train.generate``: the jitted sampler is built once per settings, not once per call.

The trainer draws a grid every ``train.sample_every`` steps with the same model, schedule and
sampler; each call used to build a new jitted function, so each grid traced and lowered the
whole sampling loop again (``benchmarks/README.md``, start-up). Tracing is observed by counting
calls of ``samplers.sample``, which runs only while ``draw`` is traced.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import trainer_helpers as h

from diffusion_jax import samplers
from diffusion_jax.train import config as config_lib
from diffusion_jax.train import generate


@pytest.fixture(scope="module")
def toy_run():
    config = h.swissroll()
    model = config_lib.build_model(config, (2,), None)
    schedule = config_lib.build_schedule(config)
    params = model.init(jax.random.key(0), jnp.zeros((1, 2)), jnp.zeros((1,), jnp.int32))["params"]
    return config, model, schedule, params


@pytest.fixture
def traces(monkeypatch):
    """The number of times ``samplers.sample`` ran (once per trace of ``draw``)."""
    calls = []
    original = samplers.sample

    def counted(*args, **kwargs):
        calls.append(kwargs["num_steps"])
        return original(*args, **kwargs)

    monkeypatch.setattr(generate.samplers, "sample", counted)
    generate._DRAW_CACHE.clear()
    yield calls
    generate._DRAW_CACHE.clear()


def draw(run, params=None, **settings):
    config, model, schedule, run_params = run
    kwargs = {"num": 8, "batch_size": 8, "seed": 3, "method": "ddim", "num_steps": 4}
    kwargs.update(settings)
    return generate.generate(
        config, model, schedule, run_params if params is None else params, (2,),
        is_image=False, **kwargs,
    )  # fmt: skip


def test_same_settings_trace_once_and_give_the_same_samples(toy_run, traces):
    first = draw(toy_run)
    second = draw(toy_run)
    assert traces == [4]
    np.testing.assert_array_equal(first, second)
    # New parameters are an argument of the compiled sampler, not a reason to trace again, and
    # they change the samples.
    _, _, _, params = toy_run
    shifted = jax.tree.map(lambda p: p + 0.5, params)
    moved = draw(toy_run, params=shifted)
    assert traces == [4]
    assert not np.allclose(moved, first)
    # The same seed and settings through a fresh cache: the samples do not depend on caching.
    generate._DRAW_CACHE.clear()
    np.testing.assert_array_equal(draw(toy_run), first)
    assert traces == [4, 4]


def test_other_settings_build_their_own_sampler(toy_run, traces):
    base = draw(toy_run)
    other_steps = draw(toy_run, num_steps=5)
    other_seed = draw(toy_run, seed=4)
    assert traces == [4, 5, 4]
    # (Random parameters make the outputs large and nearly step-independent: compare exactly.)
    assert not np.array_equal(base, other_steps)
    assert not np.allclose(base, other_seed)
    # The cache is bounded: after more distinct settings than it keeps, the first is rebuilt.
    for steps in range(6, 6 + generate._DRAW_CACHE_SIZE):
        draw(toy_run, num_steps=steps)
    assert len(generate._DRAW_CACHE) == generate._DRAW_CACHE_SIZE
    draw(toy_run)
    assert traces[-1] == 4 and len(traces) == 3 + generate._DRAW_CACHE_SIZE + 1
