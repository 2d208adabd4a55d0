"""The digits check used by the demo (real digits pass, noise and blanks do not) and the
variational bound in bits/dim (closed form, CLI and JSON, trained beats untrained)."""

import json
import os

import numpy as np
import pytest

from diffusion_jax import options
from diffusion_jax.data import digits
from diffusion_jax.evaluation import __main__ as evaluate_cli
from diffusion_jax.evaluation import digits_check, likelihood, runs


@pytest.fixture(scope="module")
def held_out():
    images, labels = digits.load_digits_uint8()
    test = digits.split_indices()["test"]
    return images[test], labels[test]


def test_real_held_out_digits_are_recognisable(held_out):
    images, _ = held_out
    report = digits_check.digits_report(images)
    assert report["num"] == 297
    assert report["recognisable_fraction"] > 0.8
    assert report["classes_present"] == 10
    assert sum(report["class_counts"]) == round(report["recognisable_fraction"] * 297)


@pytest.mark.parametrize("kind", ["uniform", "blank", "half_noise"])
def test_noise_and_blanks_are_not(held_out, kind):
    rng = np.random.default_rng(0)
    images, _ = held_out
    if kind == "uniform":
        fake = rng.integers(0, 256, images.shape)
    elif kind == "blank":
        fake = np.zeros(images.shape)
    else:
        fake = 0.5 * images + 0.5 * rng.integers(0, 256, images.shape)
    report = digits_check.digits_report(fake.astype(np.uint8))
    # The linear classifier alone is confidently wrong here; the distance test catches it.
    assert report["recognisable_fraction"] < 0.05


def test_cli_exit_code(tmp_path, held_out, capsys):
    images, _ = held_out
    path = tmp_path / "samples.npz"
    np.savez(path, images=images)
    assert evaluate_cli.main(["digits", "--samples", str(path), "--min_recognisable", "0.5"]) == 0
    assert "classes present: 10/10" in capsys.readouterr().out
    np.savez(path, images=np.zeros_like(images))
    assert evaluate_cli.main(["digits", "--samples", str(path), "--min_recognisable", "0.5"]) == 1
    capsys.readouterr()
    np.savez(path, x=np.zeros((4, 2), np.float32))  # sample.py's file for 2-D data
    assert evaluate_cli.main(["digits", "--samples", str(path)]) == 2
    assert "holds no 'images'" in capsys.readouterr().err


def test_rejects_wrong_images():
    with pytest.raises(ValueError, match=r"uint8 \[N, 8, 8"):
        digits_check.digits_report(np.zeros((4, 28, 28, 1), np.uint8))


# ----------------------------------------------------------------------------- bits/dim

# Measured on 2 CPU cores, on the first 32 test digits: the tiny U-Net's random init scores
# 7.36 bits/dim; after 40 steps at a constant lr of 2e-3 its EMA params score 6.71 (60 steps at
# 1e-3 with the cosine decay: 7.11; 100 steps: 6.48). L_0 stays near 2.6 throughout: with
# T = 100, fixed_small's decoder is that narrow. Training on one device saves one checkpoint
# quickly.
NLL_TRAIN = {"train__num_steps": 40, "optim__lr": 2e-3, "optim__lr_schedule": "constant"}
NLL_MARGIN = 0.3  # bits/dim the trained model must beat its initialisation by


@pytest.fixture(scope="module")
def nll_workdir(tmp_path_factory):
    """A tiny digits U-Net trained just long enough to beat its initialisation clearly."""
    import jax
    import trainer_helpers as h

    from diffusion_jax import train

    steps = NLL_TRAIN["train__num_steps"]
    config = h.digits(
        **NLL_TRAIN,
        train__checkpoint_every=steps,
        train__eval_every=0,
        train__log_every=steps,
        train__num_samples=0,
    )
    workdir = str(tmp_path_factory.mktemp("nll") / "digits")
    train.train_and_evaluate(config, workdir, devices=jax.devices()[:1])
    return workdir


def one_point_model(schedule, x_star):
    """The exact eps-denoiser of the one-point dataset {x_star}: every KL term of the bound
    vanishes, and the decoder and prior terms have closed forms."""
    import jax.numpy as jnp

    def model_fn(params, x_t, t):
        del params
        abar = jnp.take(schedule.alphas_cumprod, t)[:, None, None, None]
        return (x_t - jnp.sqrt(abar) * x_star) / jnp.sqrt(1.0 - abar)

    return model_fn


def test_nll_of_one_point_dataset_matches_closed_form():
    from scipy.special import ndtr

    from diffusion_jax import schedules
    from diffusion_jax.data.sources import ArraySource

    num_timesteps = 20
    schedule = schedules.get_schedule("linear", num_timesteps)
    pixels = np.array([0, 37, 128, 200, 255, 255, 90, 1], np.uint8).reshape(2, 4, 1)
    x_star = pixels.astype(np.float64) / 127.5 - 1.0
    source = ArraySource({"image": np.broadcast_to(pixels, (10, 2, 4, 1)).copy()})
    result = likelihood.nll_of_source(
        one_point_model(schedule, x_star.astype(np.float32)),
        None,
        schedule,
        source,
        batch_size=8,  # 10 examples: a full batch and a padded one
    )

    # Closed forms (Ho et al. 2020, eq. 5 with the exact model), from float64 tables.
    betas = np.asarray(schedule.betas, np.float64)
    abar = np.cumprod(1.0 - betas)
    decoder_std = np.sqrt(betas[1] * (1.0 - abar[0]) / (1.0 - abar[1]))  # fixed_small at t=1
    half_bin = 1.0 / 255.0
    edge = (pixels == 0) | (pixels == 255)
    bin_mass = np.where(edge, ndtr(half_bin / decoder_std), 2 * ndtr(half_bin / decoder_std) - 1)
    decoder_bpd = np.mean(-np.log2(bin_mass))
    mean_t, var_t = np.sqrt(abar[-1]) * x_star, 1.0 - abar[-1]
    prior_bpd = np.mean(0.5 * (-1.0 - np.log(var_t) + var_t + mean_t**2)) / np.log(2.0)

    assert result["num_examples"] == 10 and result["num_timesteps"] == num_timesteps
    np.testing.assert_allclose(result["decoder_bpd"], decoder_bpd, rtol=1e-4)
    np.testing.assert_allclose(result["prior_bpd"], prior_bpd, rtol=1e-4)
    assert abs(result["transitions_bpd"]) < 1e-4
    np.testing.assert_allclose(result["total_bpd"], decoder_bpd + prior_bpd, rtol=1e-4)
    assert result["total_bpd_stderr"] < 1e-5  # every example scores the same


def _half_model(params, x_t, t):
    """A poor but deterministic denoiser: eps = x_t / 2."""
    del params, t
    return 0.5 * x_t


def test_nll_does_not_depend_on_batch_size_or_devices():
    import jax

    from diffusion_jax import schedules
    from diffusion_jax.data.sources import ArraySource
    from diffusion_jax.train import sharding

    schedule = schedules.get_schedule("cosine", 10)
    images = np.random.default_rng(0).integers(0, 256, (12, 4, 4, 3), dtype=np.uint8)
    source = ArraySource({"image": images})
    results = [
        likelihood.nll_of_source(
            _half_model, None, schedule, source, batch_size=batch, seed=3, mesh=mesh
        )
        for batch, mesh in [
            (4, sharding.make_mesh(jax.devices()[:1])),
            (16, sharding.make_mesh()),  # 8 devices, 4 padded examples
        ]
    ]
    for key in ("decoder_bpd", "transitions_bpd", "prior_bpd", "total_bpd", "total_bpd_stderr"):
        np.testing.assert_allclose(results[0][key], results[1][key], rtol=1e-6, err_msg=key)
    other_seed = likelihood.nll_of_source(_half_model, None, schedule, source, seed=4)
    assert other_seed["transitions_bpd"] != results[0]["transitions_bpd"]


@pytest.mark.parametrize(
    ("kwargs", "argument", "message"),
    [
        ({"num": 0}, "num", r"^num must lie in \[1, 3\]"),
        ({"num": 4}, "num", r"^num must lie in \[1, 3\] \(the split's size\), got 4"),
        ({"batch_size": 0}, "batch_size", "^batch_size must be >= 1, got 0"),
    ],
)
def test_nll_of_source_errors_name_the_argument(kwargs, argument, message):
    from diffusion_jax import schedules
    from diffusion_jax.data.sources import ArraySource

    source = ArraySource({"image": np.zeros((3, 4, 4, 1), np.uint8)})
    schedule = schedules.get_schedule("linear", 10)
    with pytest.raises(options.ArgumentError, match=message) as raised:
        likelihood.nll_of_source(_half_model, None, schedule, source, **kwargs)
    assert raised.value.argument == argument


def test_nll_cli_prints_and_writes_the_bound(nll_workdir, capsys):
    # 40 examples in batches of 32: the second batch is padded.
    argv = ["nll", "--workdir", nll_workdir, "--num", "40", "--batch_size", "32"]
    assert evaluate_cli.main(argv) == 0
    out = capsys.readouterr().out
    total_line = next(line for line in out.splitlines() if line.lstrip().startswith("total"))
    assert "bits/dim" in total_line
    assert "17-level" in out and "no published figure" in out
    steps = NLL_TRAIN["train__num_steps"]
    path = os.path.join(nll_workdir, f"nll_test_ema_step{steps}_n40.json")
    assert f"wrote {path}" in out
    with open(path) as f:
        result = json.load(f)
    assert result["num_examples"] == 40 and result["num_timesteps"] == 100
    assert result["dataset"] == "digits" and result["split"] == "test"
    assert result["params"] == "ema" and result["step"] == steps and result["clip_x0"] is True
    terms = np.asarray(result["terms_bpd"])
    assert terms.shape == (100,)
    np.testing.assert_allclose(result["decoder_bpd"], terms[0], rtol=1e-12)
    np.testing.assert_allclose(result["transitions_bpd"], terms[1:].sum(), rtol=1e-12)
    parts = result["decoder_bpd"] + result["transitions_bpd"] + result["prior_bpd"]
    np.testing.assert_allclose(result["total_bpd"], parts, rtol=1e-12)
    assert f"{result['total_bpd']:.5f}" in total_line
    # Every term of a bound is non-negative, and L_T is ~0 for the cosine schedule.
    assert terms.min() >= 0 and 0 <= result["prior_bpd"] < 1e-3


def test_nll_cli_names_its_flags_in_errors(nll_workdir, capsys):
    argv = ["nll", "--workdir", nll_workdir, "--batch_size", "0"]
    assert evaluate_cli.main(argv) == 2
    assert capsys.readouterr().err == "error: --batch_size must be >= 1, got 0.\n"
    assert evaluate_cli.main(["nll", "--workdir", nll_workdir, "--num", "1000"]) == 2
    assert (
        "error: --num must lie in [1, 297] (the split's size), got 1000." in capsys.readouterr().err
    )


def test_trained_model_scores_lower_than_its_initialisation(nll_workdir):
    import jax

    from diffusion_jax import data

    run = runs.restore_run(nll_workdir)
    x = np.zeros((1, *run.data_shape), np.float32)
    init = jax.jit(run.model.init)(jax.random.key(run.config.seed), x, np.zeros((1,), np.int32))
    _, source = data.open_split("digits", split="test")
    trained, untrained = (  # run.model_fn: the CLI's compiled bound serves both
        likelihood.nll_of_source(run.model_fn, params, run.schedule, source, num=32, batch_size=32)
        for params in (run.params, init["params"])
    )
    assert trained["total_bpd"] < untrained["total_bpd"] - NLL_MARGIN, (trained, untrained)
    # Training improves the KL terms; the decoder of fixed_small barely moves.
    assert trained["transitions_bpd"] < untrained["transitions_bpd"] - NLL_MARGIN


def test_nll_refuses_missing_workdirs_and_checkpoints(tmp_path, capsys):
    # 2-D data get a bound in nats/dim now (tests/test_likelihood_continuous.py).
    assert evaluate_cli.main(["nll", "--workdir", str(tmp_path / "nothing")]) == 2
    assert "No such workdir" in capsys.readouterr().err
    assert not (tmp_path / "nothing").exists()
    # An empty checkpoints/ folder: the checkpoint module's CheckpointError, no traceback.
    os.makedirs(tmp_path / "empty" / "checkpoints")
    assert evaluate_cli.main(["nll", "--workdir", str(tmp_path / "empty")]) == 2
    assert capsys.readouterr().err.startswith("error: No checkpoint found in")
