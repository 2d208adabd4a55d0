"""sample.py and evaluation.sampling: restore, sample across devices, write files;
reproducibility and clear errors."""

from __future__ import annotations

import jax
import numpy as np
import pytest
import trainer_helpers as h

from diffusion_jax import options, samplers, train
from diffusion_jax.evaluation import runs, sampling
from diffusion_jax.models import make_model_fn


@pytest.fixture(scope="module")
def swiss_workdir(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("sample_swiss") / "run"
    config = h.swissroll(train__num_steps=20, train__checkpoint_every=10, train__eval_every=0)
    train.train_and_evaluate(config, str(workdir))
    return workdir


@pytest.fixture(scope="module")
def moons_workdir(tmp_path_factory):
    """A class-conditional MLP on the two-moons set, trained with label dropout."""
    workdir = tmp_path_factory.mktemp("sample_moons") / "run"
    config = h.swissroll(
        data__name="moons",
        model__class_conditional=True,
        diffusion__p_uncond=0.2,
        train__num_steps=10,
        train__checkpoint_every=10,
        train__eval_every=0,
    )
    train.train_and_evaluate(config, str(workdir))
    return workdir


def test_same_seed_same_samples_at_any_batch_size(swiss_workdir, tmp_path):
    kwargs = dict(num=40, method="ddim", steps=10, seed=3, progress=False)
    big = sampling.sample_from_workdir(
        str(swiss_workdir), out=str(tmp_path / "a"), batch_size=64, **kwargs
    )
    small = sampling.sample_from_workdir(
        str(swiss_workdir), out=str(tmp_path / "b"), batch_size=16, **kwargs
    )
    a, b = np.load(big["npz"])["x"], np.load(small["npz"])["x"]
    assert a.shape == (40, 2) and np.isfinite(a).all()
    # Batches of 16 land on 8 devices as 2 rows each; 64 as 8: the math is elementwise in the
    # batch, so only the compiled kernels' float rounding may differ.
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    other = sampling.sample_from_workdir(
        str(swiss_workdir), out=str(tmp_path / "c"), batch_size=64, **dict(kwargs, seed=4)
    )
    assert not np.allclose(np.load(other["npz"])["x"], a)


def test_spacing_and_edm_settings_reach_the_sampler(swiss_workdir, tmp_path):
    """sample.py's --timestep_spacing and EDM flags: the samples are the sampler's own with
    those settings, and each setting changes them."""
    run = runs.restore_run(str(swiss_workdir), which="ema")
    model_fn = make_model_fn(run.model, train=False)
    d = run.config.diffusion
    cases = {
        "quadratic": {"method": "ddim", "timestep_spacing": "quadratic"},
        "linspace": {"method": "ddim"},
        "edm": {"method": "heun", "edm": samplers.EDMOptions(sigma_max=5.0, S_churn=2.0)},
        "edm_default": {"method": "heun"},
    }
    drawn = {}
    for name, settings in cases.items():
        written = sampling.sample_from_workdir(
            str(swiss_workdir), out=str(tmp_path / name), num=8, steps=4, seed=2,
            progress=False, **settings,
        )  # fmt: skip
        drawn[name] = np.load(written["npz"])["x"]
    expected = samplers.sample(
        model_fn, run.params, run.schedule, jax.random.key(2), (8, 2), method="heun",
        num_steps=4, parameterization=d.parameterization, variance=d.variance, clip_x0=False,
        edm=samplers.EDMOptions(sigma_max=5.0, S_churn=2.0),
    )  # fmt: skip
    np.testing.assert_allclose(drawn["edm"], np.asarray(expected), rtol=1e-5, atol=1e-5)
    assert not np.allclose(drawn["quadratic"], drawn["linspace"])
    assert not np.allclose(drawn["edm"], drawn["edm_default"])
    with pytest.raises(ValueError, match=r"edm\.sigma_max must lie within the schedule's sigmas"):
        sampling.sample_from_workdir(
            str(swiss_workdir), out=str(tmp_path / "far"), num=4, steps=4, method="heun",
            edm=samplers.EDMOptions(sigma_max=1e9), progress=False,
        )  # fmt: skip


def test_raw_and_checkpoint_step_choices(swiss_workdir, tmp_path):
    ema = sampling.sample_from_workdir(
        str(swiss_workdir), out=str(tmp_path / "ema"), num=8, steps=5, progress=False
    )
    raw = sampling.sample_from_workdir(
        str(swiss_workdir), out=str(tmp_path / "raw"), num=8, steps=5, which="raw", progress=False
    )
    early = sampling.sample_from_workdir(
        str(swiss_workdir),
        out=str(tmp_path / "early"),
        num=8,
        steps=5,
        checkpoint_step=10,
        progress=False,
    )
    values = [np.load(p["npz"])["x"] for p in (ema, raw, early)]
    assert not np.allclose(values[0], values[1]) and not np.allclose(values[0], values[2])


def test_guided_conditional_sampling(moons_workdir, tmp_path):
    written = sampling.sample_from_workdir(
        str(moons_workdir),
        out=str(tmp_path / "guided"),
        num=16,
        method="dpm_solver++",
        steps=8,
        guidance=3.0,
        labels="0,1",
        progress=False,
    )
    samples = np.load(written["npz"])["x"]
    assert samples.shape == (16, 2) and np.isfinite(samples).all()
    assert written["grid"].endswith("scatter.png")
    with pytest.raises(options.ArgumentError, match=r"out of range: the model has classes 0\.\.1"):
        sampling.sample_from_workdir(
            str(moons_workdir), out=str(tmp_path / "x"), num=4, labels="0,2", progress=False
        )


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("0,x", "labels must be comma-separated integers, got '0,x'"),
        ("{0}", "labels must be comma-separated integers, got '{0}'"),
        (",", "labels is empty"),
        ("3,-1", r"labels \[3, -1\] out of range"),
    ],
)
def test_parse_labels_errors_name_the_argument(text, message):
    with pytest.raises(options.ArgumentError, match=message) as raised:
        sampling.parse_labels(text, 4, num_classes=3)
    assert raised.value.argument == "labels"
    assert raised.value.for_flags({"labels": "--labels"}).startswith("--labels ")


@pytest.mark.parametrize(
    ("kwargs", "argument", "message"),
    [
        ({"method": "lms"}, "method", "Unknown method .lms.; expected one of"),
        ({"num": 0}, "num", "num must be >= 1, got 0"),
        ({"batch_size": -1}, "batch_size", "batch_size must be >= 1, got -1"),
        ({"steps": 51}, "steps", r"^steps must lie in \[1, 50\]"),
        ({"steps": 0}, "steps", "^steps must lie in"),
        ({"labels": "1"}, "labels", "^labels given, but the model is not class-conditional"),
        ({"guidance": 2.0}, "guidance", "^guidance needs a class-conditional model"),
        ({"which": "best"}, "which", "Unknown which .best.; expected one of"),
        ({"timestep_spacing": "even"}, "timestep_spacing", "Unknown timestep_spacing .even."),
        (
            {"edm": samplers.EDMOptions(sigma_max=10.0)},
            "edm",
            "^edm settings apply to heun and euler only, not to method 'ddim'",
        ),
    ],
)
def test_bad_arguments_are_errors_naming_them(swiss_workdir, tmp_path, kwargs, argument, message):
    with pytest.raises(options.ArgumentError, match=message) as raised:
        sampling.sample_from_workdir(
            str(swiss_workdir), out=str(tmp_path / "x"), progress=False, **{"num": 4, **kwargs}
        )
    assert raised.value.argument == argument
    assert "--" not in str(raised.value)  # the library's words, not a command line's


def test_missing_checkpoint_step_is_a_clear_error(swiss_workdir, tmp_path):
    with pytest.raises(ValueError, match="No checkpoint at step 7"):
        sampling.sample_from_workdir(
            str(swiss_workdir), out=str(tmp_path / "x"), checkpoint_step=7, progress=False
        )


def test_relative_workdir_path(swiss_workdir, tmp_path, monkeypatch):
    monkeypatch.chdir(swiss_workdir.parent)
    written = sampling.sample_from_workdir(
        swiss_workdir.name, out="relative_out", num=8, steps=5, progress=False
    )
    assert np.load(swiss_workdir.parent / "relative_out" / "samples.npz")["x"].shape == (8, 2)
    assert written["npz"].endswith("samples.npz")


def test_workdir_without_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="No checkpoint in"):
        sampling.sample_from_workdir(str(tmp_path), out=str(tmp_path / "x"), progress=False)


def test_sample_py_command_line(swiss_workdir, tmp_path):
    out = tmp_path / "cli"
    result = h.run(
        [
            h.sys.executable,
            str(h.REPO / "sample.py"),
            f"--workdir={swiss_workdir}",
            f"--out={out}",
            "--num=16",
            "--batch_size=8",
            "--method=ddpm",
            "--steps=10",
        ]
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "read only" not in result.stderr  # orbax's notice on every read-only open
    assert (out / "samples.npz").exists() and (out / "scatter.png").stat().st_size > 1000
    failed = h.run([h.sys.executable, str(h.REPO / "sample.py"), f"--workdir={tmp_path}/none"])
    assert failed.returncode == 2 and "No such workdir" in failed.stderr
    # The library's ArgumentError about `steps`, worded with this command line's flag.
    refused = h.run(
        [h.sys.executable, str(h.REPO / "sample.py"), f"--workdir={swiss_workdir}", "--steps=51"]
    )
    assert refused.returncode == 2, refused.stderr[-3000:]
    assert "error: --steps must lie in [1, 50]" in refused.stderr
    assert "Traceback" not in refused.stderr
    # EDM's flags belong to heun/euler: one line naming them.
    refused = h.run(
        [h.sys.executable, str(h.REPO / "sample.py"), f"--workdir={swiss_workdir}", "--rho=3"]
    )
    assert refused.returncode == 2, refused.stderr[-3000:]
    assert "error: --sigma_min/--sigma_max/--rho/--S_* settings apply to heun and euler" in (
        refused.stderr
    )
