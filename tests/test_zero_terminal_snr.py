"""Zero terminal SNR end to end: v and x0 models sample and train to finite values; eps is
refused with one clear error in the samplers and the losses, never a NaN."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax import diffusion, losses, samplers, schedules

SCHEDULE = schedules.get_schedule("cosine", 50, zero_terminal_snr=True)


def half(params, x_t, t):
    """A stand-in model: any finite output, for every parameterisation."""
    return params * x_t


def test_the_schedule_ends_with_no_signal():
    assert SCHEDULE.zero_terminal_snr
    assert float(SCHEDULE.alphas_cumprod[-1]) == 0.0


@pytest.mark.parametrize("parameterization", ["v", "x0"])
@pytest.mark.parametrize("method", ["ddpm", "ddim", "dpm_solver++"])
def test_v_and_x0_models_sample_to_finite_values(method, parameterization):
    out = samplers.sample(
        half,
        0.5,
        SCHEDULE,
        jax.random.key(0),
        (4, 2),
        method=method,
        num_steps=5,
        parameterization=parameterization,
        clip_x0=False,
    )
    assert bool(jnp.isfinite(out).all())


def test_eps_from_x0_is_finite_at_the_last_step():
    x_t = jnp.ones((2, 3))
    t = jnp.full((2,), SCHEDULE.num_timesteps - 1, jnp.int32)
    eps = diffusion.predict_eps_from_x0(SCHEDULE, x_t, t, jnp.zeros((2, 3)))
    # abar_T = 0: x_t is all noise, so the implied noise is x_t itself.
    np.testing.assert_allclose(np.asarray(eps), np.asarray(x_t), rtol=1e-6)


@pytest.mark.parametrize("parameterization", ["v", "x0"])
def test_v_and_x0_losses_are_finite(parameterization):
    x0 = jnp.linspace(-1.0, 1.0, 8).reshape(4, 2)
    t = jnp.array([0, 10, 30, SCHEDULE.num_timesteps - 1], jnp.int32)
    loss, _ = losses.training_loss(
        half,
        0.5,
        SCHEDULE,
        x0,
        None,
        t=t,
        noise=jnp.ones_like(x0),
        parameterization=parameterization,
    )
    assert bool(jnp.isfinite(loss))


def test_eps_is_refused_by_the_samplers_and_the_losses():
    with pytest.raises(ValueError, match="zero terminal SNR needs v or x0 prediction"):
        samplers.sample(half, 0.5, SCHEDULE, jax.random.key(0), (4, 2), method="ddim")
    loss_fn = jax.jit(
        lambda p: losses.training_loss(half, p, SCHEDULE, jnp.zeros((4, 2)), jax.random.key(0))
    )
    with pytest.raises(ValueError, match="zero terminal SNR needs v or x0 prediction"):
        loss_fn(0.5)
