"""EDM training (Karras et al. 2022): the preconditioning, the loss and its weight, the map to
the VP chain, the preconditioned model, the config checks, and a run end to end.

The references are float64 NumPy written from the paper's Table 1:
c_skip = sd^2 / (s^2 + sd^2), c_out = s sd / sqrt(s^2 + sd^2), c_in = 1 / sqrt(s^2 + sd^2),
c_noise = ln(s) / 4, lambda = (s^2 + sd^2) / (s sd)^2, with s = sigma and sd = sigma_data.
"""

from __future__ import annotations

import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import trainer_helpers as h
from sklearn.decomposition import PCA

from configs import digits_edm
from diffusion_jax import models, schedules, train
from diffusion_jax.data import digits as digits_data
from diffusion_jax.diffusion import edm
from diffusion_jax.evaluation import digits_check, likelihood
from diffusion_jax.losses import edm as edm_losses
from diffusion_jax.models.preconditioned import Preconditioned, make_denoise_fn
from diffusion_jax.train import config as config_lib
from diffusion_jax.train import metrics as metrics_lib

SIGMAS = np.array([0.002, 0.01, 0.1, 0.5, 0.75, 1.0, 3.0, 80.0])


def table1(sigma, sigma_data):
    """Table 1 of the paper in float64."""
    sigma = np.asarray(sigma, np.float64)
    c_skip = sigma_data**2 / (sigma**2 + sigma_data**2)
    c_out = sigma * sigma_data / np.sqrt(sigma**2 + sigma_data**2)
    c_in = 1.0 / np.sqrt(sigma**2 + sigma_data**2)
    c_noise = np.log(sigma) / 4.0
    weight = (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2
    return c_skip, c_out, c_in, c_noise, weight


@pytest.mark.parametrize("sigma_data", [0.5, 0.75])
def test_preconditioning_and_weight_match_table_1(sigma_data):
    c_skip, c_out, c_in, c_noise, weight = table1(SIGMAS, sigma_data)
    got = edm.preconditioning(jnp.asarray(SIGMAS, jnp.float32), sigma_data)
    # float32 against float64: a few ulps relative; c_noise crosses 0, so absolute there.
    np.testing.assert_allclose(got.c_skip, c_skip, rtol=2e-6)
    np.testing.assert_allclose(got.c_out, c_out, rtol=2e-6)
    np.testing.assert_allclose(got.c_in, c_in, rtol=2e-6)
    np.testing.assert_allclose(got.c_noise, c_noise, rtol=2e-6, atol=1e-6)
    np.testing.assert_allclose(edm.loss_weight(SIGMAS, sigma_data), weight, rtol=2e-6)
    # lambda c_out^2 = 1: the weighted loss is the unit-weight MSE of F.
    np.testing.assert_allclose(weight * c_out**2, 1.0, rtol=1e-12)


def test_ideal_denoiser_of_gaussian_data_has_unit_weighted_loss_at_sigma_data():
    """Data ~ N(0, sd^2 I): the ideal denoiser is E[x0 | x] = sd^2 / (sd^2 + s^2) x = c_skip x
    (F = 0), with error variance sd^2 s^2 / (sd^2 + s^2) per dimension; at s = sd that is
    sd^2 / 2, times lambda = 2 / sd^2 gives a weighted loss of exactly 1."""
    sigma_data, batch, dims = 0.75, 4096, 16
    x0 = sigma_data * jax.random.normal(jax.random.key(0), (batch, dims))
    sigma = jnp.full((batch,), sigma_data)

    def ideal(params, x, s):
        return edm.expand(edm.preconditioning(s, sigma_data).c_skip, x.ndim) * x * params

    loss, metrics = edm_losses.edm_loss(
        ideal, 1.0, x0, jax.random.key(1), sigma_data=sigma_data, sigma=sigma
    )
    # Monte Carlo over 65,536 squared Gaussians: the per-dimension weighted error is chi^2_1,
    # standard error sqrt(2 / 65536) = 0.0055; 4 standard errors.
    assert abs(float(loss) - 1.0) < 0.022
    np.testing.assert_allclose(
        metrics["per_example_loss"], 2.0 / sigma_data**2 * metrics["per_example_mse"], rtol=1e-6
    )
    # The ideal denoiser's expected loss is the minimum: D = c x with c = (1 + d) / 2 has
    # lambda E[((c - 1) x0 + c n)^2] = 2 ((c - 1)^2 + c^2) = 1 + d^2; on the same draws.
    for scale, excess in ((0.8, 0.04), (1.2, 0.04)):
        worse, _ = edm_losses.edm_loss(
            ideal, scale, x0, jax.random.key(1), sigma_data=sigma_data, sigma=sigma
        )
        assert float(worse) - float(loss) == pytest.approx(excess, abs=0.006)


def test_loss_with_given_sigma_and_noise_matches_float64():
    rng = np.random.default_rng(0)
    x0 = rng.normal(size=(6, 4, 4, 1)).astype(np.float32)
    noise = rng.normal(size=x0.shape).astype(np.float32)
    sigma = np.array([0.01, 0.2, 0.5, 1.0, 5.0, 60.0], np.float32)
    sigma_data = 0.5

    def denoise(params, x, s):  # any fixed map: a shrinkage plus a constant
        return 0.3 * x + params

    loss, metrics = edm_losses.edm_loss(
        denoise, 0.1, x0, None, sigma_data=sigma_data, sigma=sigma, noise=noise
    )
    x0_64, noise_64, s64 = (a.astype(np.float64) for a in (x0, noise, sigma))
    noisy = x0_64 + s64[:, None, None, None] * noise_64
    mse = np.mean((0.3 * noisy + 0.1 - x0_64) ** 2, axis=(1, 2, 3))
    weight = table1(s64, sigma_data)[4]
    np.testing.assert_allclose(metrics["per_example_loss"], weight * mse, rtol=1e-5)
    np.testing.assert_allclose(loss, np.mean(weight * mse), rtol=1e-5)
    np.testing.assert_allclose(metrics["mse"], mse.mean(), rtol=1e-5)


def test_sigma_draw_is_log_normal():
    sigma = edm_losses.sample_sigma(jax.random.key(3), 40_000, P_mean=-1.2, P_std=1.2)
    log_sigma = np.log(np.asarray(sigma, np.float64))
    # standard errors: 1.2 / 200 = 0.006 for the mean, 1.2 / sqrt(2 * 40000) = 0.0042 for the std
    assert abs(log_sigma.mean() + 1.2) < 0.024
    assert abs(log_sigma.std() - 1.2) < 0.017


def test_sigma_vp_map_round_trips():
    sigma = np.asarray(SIGMAS, np.float64)
    alpha_bar = 1.0 / (1.0 + sigma**2)  # reference: abar = 1 / (1 + s^2)
    np.testing.assert_allclose(edm.alpha_bar_from_sigma(sigma), alpha_bar, rtol=1e-6)
    # abar -> sigma -> abar is well conditioned; sigma -> abar -> sigma loses float32's 6e-8
    # of abar = 1 - sigma^2 to 1 - abar, a relative error of 6e-8 / sigma^2 in sigma.
    np.testing.assert_allclose(
        edm.alpha_bar_from_sigma(edm.sigma_from_alpha_bar(alpha_bar)), alpha_bar, rtol=1e-6
    )
    back = np.asarray(edm.sigma_from_alpha_bar(edm.alpha_bar_from_sigma(sigma)), np.float64)
    assert np.all(np.abs(back / sigma - 1.0) <= 1e-6 + 6e-8 / sigma**2)
    x = np.random.default_rng(1).normal(size=(len(SIGMAS), 3, 2)).astype(np.float32)
    x_t = edm.edm_to_vp(x, sigma)
    np.testing.assert_allclose(x_t, x * np.sqrt(alpha_bar)[:, None, None], rtol=1e-6)
    np.testing.assert_allclose(edm.vp_to_edm(x_t, alpha_bar), x, rtol=1e-5)


def test_vp_preconditioning_is_table_1_on_rescaled_data():
    """c_skip and c_in act on x_t = sqrt(abar) x, so they are Table 1's divided by sqrt(abar);
    c_out and c_noise are Table 1's; all stay finite as abar -> 0."""
    sigma_data = 0.5
    alpha_bar = np.array([0.9999, 0.9, 0.5, 0.1, 1e-3, 4e-5])
    sigma = np.sqrt((1.0 - alpha_bar) / alpha_bar)
    c_skip, c_out, c_in, c_noise, _ = table1(sigma, sigma_data)
    got = edm.vp_preconditioning(alpha_bar, sigma_data)
    root = np.sqrt(alpha_bar)
    # float32 abar near 1 loses digits of 1 - abar (relative 6e-8 / 1e-4): hence 1e-3 on c_out.
    np.testing.assert_allclose(got.c_skip, c_skip / root, rtol=1e-5)
    np.testing.assert_allclose(got.c_in, c_in / root, rtol=1e-5)
    np.testing.assert_allclose(got.c_out, c_out, rtol=1e-3)
    np.testing.assert_allclose(got.c_noise, c_noise, rtol=1e-3, atol=1e-4)
    far = edm.vp_preconditioning(np.array([1e-30]), sigma_data)
    assert np.all(np.isfinite([far.c_skip, far.c_out, far.c_in, far.c_noise]))
    np.testing.assert_allclose([far.c_out[0], far.c_in[0]], [sigma_data, 1.0], rtol=1e-6)


def test_settings_are_checked():
    for kwargs, name in (
        ({"sigma_data": 0.0}, "sigma_data"),
        ({"sigma_data": float("inf")}, "sigma_data"),
        ({"sigma_data": 0.5, "P_mean": float("nan")}, "P_mean"),
        ({"sigma_data": 0.5, "P_std": -1.0}, "P_std"),
    ):
        with pytest.raises(ValueError, match=name):
            edm.check_settings(**kwargs)


def test_preconditioned_model_as_vp_x0_model_is_its_denoiser():
    """__call__(x_t, t) = denoise(x_t / sqrt(abar_t), sigma_t) on the same parameters; the
    network sees c_in x and c_noise."""
    schedule = schedules.get_schedule("linear", 50)
    alphas_cumprod = tuple(float(a) for a in schedule.alphas_cumprod)
    model = Preconditioned(
        models.MLP(features=16, num_layers=1), alphas_cumprod=alphas_cumprod, sigma_data=0.7
    )
    x_t = jax.random.normal(jax.random.key(0), (5, 2))
    t = jnp.array([0, 5, 20, 40, 49])
    params = model.init(jax.random.key(1), x_t, t)["params"]
    # The zero-initialised output layer makes F = 0; perturb it so F matters.
    params = jax.tree.map(lambda p: p + 0.05, params)
    as_vp = models.make_model_fn(model, train=False)(params, x_t, t)
    alpha_bar = np.asarray(schedule.alphas_cumprod)[np.asarray(t)].astype(np.float64)
    sigma = np.sqrt((1.0 - alpha_bar) / alpha_bar)
    x = np.asarray(x_t, np.float64) / np.sqrt(alpha_bar)[:, None]
    denoised = make_denoise_fn(model, train=False)(params, x.astype(np.float32), sigma)
    np.testing.assert_allclose(as_vp, denoised, rtol=2e-4, atol=2e-5)
    # D = c_skip x + c_out F(c_in x, c_noise), F the bare network.
    c_skip, c_out, c_in, c_noise, _ = table1(sigma, 0.7)
    f = models.MLP(features=16, num_layers=1).apply(
        {"params": params["net"]}, (c_in[:, None] * x).astype(np.float32), c_noise
    )
    expected = c_skip[:, None] * x + c_out[:, None] * np.asarray(f, np.float64)
    np.testing.assert_allclose(denoised, expected, rtol=1e-4, atol=1e-5)


def tiny_edm(**extra):
    """The tiny swiss-roll run trained EDM's way."""
    overrides = {
        "diffusion__formulation": "edm",
        "diffusion__parameterization": "x0",
        "edm__sigma_data": 1.0,
    }
    return h.swissroll(**(overrides | extra))


@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"diffusion__parameterization": "eps"}, "config.diffusion.parameterization"),
        (
            {"diffusion__variance": "learned_range", "diffusion__loss_type": "hybrid"},
            "config.diffusion.variance",
        ),
        ({"diffusion__loss_type": "vlb"}, "config.diffusion.loss_type"),
        ({"diffusion__min_snr_gamma": 5.0}, "config.diffusion.min_snr_gamma"),
        ({"diffusion__zero_terminal_snr": True}, "config.diffusion.zero_terminal_snr"),
        ({"edm__sigma_data": 0.0}, "config.edm.sigma_data"),
        ({"edm__P_std": float("inf")}, "config.edm.P_std"),
        ({"edm__P_mean": float("nan")}, "config.edm.P_mean"),
        ({"diffusion__formulation": "vp"}, "config.diffusion.formulation"),
    ],
)
def test_conflicting_or_invalid_edm_settings_are_refused(overrides, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")) as error:
        config_lib.validate_config(tiny_edm(**overrides))
    assert "\n" not in str(error.value)


def test_configs_saved_before_edm_existed_still_load_and_resume():
    saved = config_lib.config_to_dict(h.swissroll())
    del saved["diffusion"]["formulation"]
    del saved["edm"]
    config = ml_collections.ConfigDict(saved)
    assert config_lib.formulation(config) == "ddpm"
    model = config_lib.build_model(config, (2,), None)
    assert isinstance(model, models.MLP)
    now = config_lib.config_to_dict(h.swissroll())
    assert config_lib.identity_dict(saved) == config_lib.identity_dict(now)


def test_digits_edm_config_is_valid_and_edm():
    config = digits_edm.get_config()
    config_lib.validate_config(config)
    assert config.diffusion.formulation == "edm"
    model = config_lib.build_model(config, (8, 8, 1), 10)
    assert isinstance(model, Preconditioned) and isinstance(model.net, models.UNet)
    assert len(model.alphas_cumprod) == config.diffusion.num_timesteps


def test_edm_run_end_to_end_resume_and_sample_with_heun(tmp_path):
    """A few EDM steps through train_and_evaluate, resumed, then sample.py --method heun and
    the bound."""
    workdir = tmp_path / "run"
    config = tiny_edm(train__num_steps=6, train__checkpoint_every=3, train__eval_every=3)
    state = train.train_and_evaluate(config, str(workdir))
    assert int(state.step) == 6
    assert "net" in state.params  # the U-Net/MLP sits inside the preconditioning
    resumed = train.train_and_evaluate(tiny_edm(train__num_steps=9), str(workdir))
    assert int(resumed.step) == 9
    records = metrics_lib.read_metrics(str(workdir))
    losses = [r["loss"] for r in records if "loss" in r]
    assert losses and all(np.isfinite(losses))
    assert not any("vb" in r for r in records)  # EDM's loss has no bound term to log
    out = tmp_path / "samples"
    command = [
        sys.executable,
        str(h.REPO / "sample.py"),
        f"--workdir={workdir}",
        "--num=16",
        "--method=heun",
        "--steps=4",
        f"--out={out}",
    ]
    result = subprocess.run(command, env=h.subprocess_env(), capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    with np.load(out / "samples.npz") as npz:
        samples = next(npz[k] for k in npz.files if npz[k].dtype.kind == "f")
    assert samples.shape == (16, 2) and np.all(np.isfinite(samples))
    # The bound of the discrete chain the x0 view defines (README, "EDM training").
    bound = likelihood.nll_from_workdir(
        str(workdir), split="test", num=16, batch_size=16, write=False, progress=False
    )
    assert bound["parameterization"] == "x0" and np.isfinite(bound["total_nats"])


def test_digits_frechet_distance_in_pca_space():
    """The feature-space distance of the comparison (evaluation.digits_check): the PCA matches
    scikit-learn's up to the sign of each axis, held-out digits are at distance 0 from
    themselves, and real digits score far below noise."""
    images, _ = digits_data.load_digits_uint8()
    split = digits_data.split_indices()
    pixels = images[split["train"]].reshape(len(split["train"]), -1) / 255.0
    reference = PCA(n_components=digits_check.PCA_COMPONENTS).fit(pixels)
    sample = images[split["test"][:50]]
    np.testing.assert_allclose(
        np.abs(digits_check.digits_features(sample)),
        np.abs(reference.transform(sample.reshape(50, -1) / 255.0)),
        atol=1e-8,
    )
    assert digits_check.digits_frechet_distance(images[split["test"]]) == pytest.approx(
        0.0, abs=1e-8
    )
    floor = digits_check.digits_frechet_floor(100)
    noise = np.random.default_rng(0).integers(0, 256, (100, 8, 8, 1), dtype=np.uint8)
    assert 0 < floor < 0.2 * digits_check.digits_frechet_distance(noise)
