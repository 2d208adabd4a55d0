"""The continuous-data bound of ``evaluation/likelihood.py``: nats/dim with a Gaussian decoder.

What is checked, and how closely:
  * a one-point vector dataset {x*} scored with its exact eps-denoiser (fixed_small): every KL
    term vanishes, L_0 = log(2 pi s^2) / 2 with s^2 the decoder variance (the posterior variance
    of index 1) and L_T = KL(N(sqrt(abar_T) x*, 1 - abar_T) || N(0, 1)), both in nats/dim from
    float64 tables built from the schedule's own betas: within 1e-4 relative; the KL terms sum
    to below 1e-4 nats/dim; the result says ``units: "nats/dim"`` and has no bits/dim keys.
  * the command line on a tiny swiss-roll run (two training steps): a finite bound, printed
    and written as JSON in nats/dim, with a note that it is a continuous-data bound.
  * the notes of 8-bit images say that L_0 uses the exact normal CDF and by how much the
    published tanh approximation differs.
"""

from __future__ import annotations

import json
import math
import os

import jax.numpy as jnp
import numpy as np

from diffusion_jax import schedules
from diffusion_jax.data.sources import ArraySource
from diffusion_jax.evaluation import __main__ as evaluate_cli
from diffusion_jax.evaluation import likelihood


def _one_point_vector_model(schedule, x_star):
    """The exact eps of the one-point dataset {x_star}, for ``[B, D]`` data."""
    sqrt_abar = jnp.asarray(schedule.sqrt_alphas_cumprod)
    sqrt_one_minus = jnp.asarray(schedule.sqrt_one_minus_alphas_cumprod)

    def model_fn(params, x_t, t):
        del params
        return (x_t - sqrt_abar[t][:, None] * x_star) / sqrt_one_minus[t][:, None]

    return model_fn


def test_continuous_bound_of_a_one_point_dataset_matches_closed_form():
    num_timesteps = 30
    schedule = schedules.get_schedule("cosine", num_timesteps)
    x_star = np.array([2.5, -3.0, 0.1], np.float32)
    source = ArraySource({"x": np.broadcast_to(x_star, (10, 3)).copy()})
    result = likelihood.nll_of_source(
        _one_point_vector_model(schedule, x_star),
        None,
        schedule,
        source,
        batch_size=8,  # a full batch and a padded one
        clip_x0=False,
    )

    betas = np.asarray(schedule.betas, np.float64)
    abar = np.cumprod(1.0 - betas)
    decoder_var = betas[1] * (1.0 - abar[0]) / (1.0 - abar[1])  # fixed_small at index 0
    decoder_nats = 0.5 * math.log(2.0 * math.pi * decoder_var)
    x = x_star.astype(np.float64)
    mean_t, var_t = np.sqrt(abar[-1]) * x, 1.0 - abar[-1]
    prior_nats = np.mean(0.5 * (-1.0 - np.log(var_t) + var_t + mean_t**2))

    assert result["units"] == "nats/dim" and result["decoder"] == "gaussian"
    assert not any(key.endswith("_bpd") for key in result)
    np.testing.assert_allclose(result["decoder_nats"], decoder_nats, rtol=1e-4)
    np.testing.assert_allclose(result["prior_nats"], prior_nats, rtol=1e-4)
    assert abs(result["transitions_nats"]) < 1e-4
    np.testing.assert_allclose(result["total_nats"], decoder_nats + prior_nats, rtol=1e-4)
    assert len(result["terms_nats"]) == num_timesteps
    text = likelihood.format_nll(result)
    assert "nats per dimension" in text and text.splitlines()[-1].endswith("nats/dim")


def test_nll_cli_scores_two_dimensional_data_in_nats(tmp_path, capsys):
    import jax
    import trainer_helpers as h

    from diffusion_jax import train

    workdir = str(tmp_path / "swissroll")
    config = h.swissroll(
        train__num_steps=2,
        train__checkpoint_every=2,
        train__eval_every=0,
        train__log_every=2,
        train__num_samples=0,
    )
    train.train_and_evaluate(config, workdir, devices=jax.devices()[:1])
    argv = ["nll", "--workdir", workdir, "--num", "32", "--batch_size", "32"]
    assert evaluate_cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert "nats/dim" in printed and "continuous data" in printed
    with open(os.path.join(workdir, "nll_test_ema_step2_n32.json")) as f:
        result = json.load(f)
    assert result["units"] == "nats/dim" and result["num_bins"] is None
    assert result["clip_x0"] is False
    assert "not comparable with bits/dim" in result["notes"]
    assert np.isfinite(result["total_nats"])


def test_image_notes_state_the_exact_cdf_and_the_tanh_gap():
    note = likelihood.DECODER_NOTES["discretized"]
    assert "exact normal CDF" in note and "tanh" in note and "4.8e-4 bits/dim" in note
