"""The picture commands write non-blank PNGs of the expected size."""

import numpy as np
import pytest
from PIL import Image

from diffusion_jax import options, plots
from diffusion_jax.evaluation import figures as run_figures
from diffusion_jax.plots import __main__ as plots_cli


def _assert_png_not_blank(path, min_size=(400, 200)):
    with Image.open(path) as img:
        assert img.format == "PNG"
        assert img.size[0] >= min_size[0] and img.size[1] >= min_size[1], img.size
        pixels = np.asarray(img.convert("L"), dtype=np.float32)
    # A blank (single-colour) figure has no spread at all; a drawn one has plenty.
    assert pixels.std() > 10.0, f"{path} looks blank (std {pixels.std():.2f})"


def test_schedules_figure(tmp_path):
    out = tmp_path / "schedules.png"
    assert plots_cli.main(["schedules", "--out", str(out), "--num_timesteps", "200"]) == 0
    _assert_png_not_blank(out, min_size=(1400, 380))


def test_noising_figure(tmp_path):
    out = tmp_path / "sub" / "noising.png"
    assert plots_cli.main(["noising", "--out", str(out), "--num_timesteps", "100"]) == 0
    _assert_png_not_blank(out, min_size=(1200, 600))


def test_noising_rejects_bad_input(tmp_path):
    with pytest.raises(ValueError, match="timesteps must lie in"):
        plots.plot_noising(str(tmp_path / "x.png"), timesteps=(0, 1000), num_timesteps=1000)
    with pytest.raises(ValueError, match=r"image must be \[H, W, C\]"):
        plots.plot_noising(str(tmp_path / "x.png"), image=np.zeros((8, 8)))


def test_noising_on_a_dataset_image_or_the_synthetic_one(tmp_path):
    image = plots.dataset_image("digits", index=3)
    assert image.shape == (8, 8, 1) and image.dtype == np.float32
    assert image.min() >= -1.0 and image.max() <= 1.0 and image.std() > 0.3
    out = tmp_path / "synthetic.png"
    argv = ["noising", "--out", str(out), "--num_timesteps", "100", "--dataset", "synthetic"]
    assert plots_cli.main(argv) == 0
    _assert_png_not_blank(out, min_size=(1200, 600))
    with pytest.raises(ValueError, match="not images"):
        plots.dataset_image("swissroll")
    with pytest.raises(options.ArgumentError, match=r"^index must lie in \[0, 1499\]") as raised:
        plots.dataset_image("digits", index=1500)
    assert raised.value.argument == "index"


def test_command_line_errors_name_its_flags(tmp_path, capsys):
    argv = ["noising", "--out", str(tmp_path / "x.png"), "--index", "-1"]
    assert plots_cli.main(argv) == 2
    assert capsys.readouterr().err == "error: --index must lie in [0, 1499], got -1.\n"
    argv = ["loss", "--workdir", str(tmp_path / "none"), "--out", str(tmp_path / "x.png")]
    assert plots_cli.main(argv) == 2
    assert capsys.readouterr().err.startswith("error: No such workdir")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "metrics.jsonl").write_text("")
    argv = ["loss", "--workdir", str(tmp_path / "empty"), "--out", str(tmp_path / "x.png")]
    assert plots_cli.main(argv) == 2
    assert capsys.readouterr().err.startswith("error: No training losses in")


# ----------------------------------------------------------------------------- from a workdir


@pytest.fixture(scope="module")
def digits_workdir(tmp_path_factory):
    """The tiny digits U-Net after 6 steps on one device (the train step of test_evaluate's
    run, so the compilation cache serves both): enough to draw, not to admire."""
    import jax
    import trainer_helpers as h

    from diffusion_jax import train

    config = h.digits(
        optim__lr=2e-3, optim__lr_schedule="constant", train__checkpoint_every=6,
        train__num_samples=0,
    )  # fmt: skip
    workdir = str(tmp_path_factory.mktemp("plots") / "digits")
    train.train_and_evaluate(config, workdir, devices=jax.devices()[:1])
    return workdir


@pytest.fixture(scope="module")
def swissroll_workdir(tmp_path_factory):
    """The tiny swiss-roll MLP (40 steps)."""
    import jax
    import trainer_helpers as h

    from diffusion_jax import train

    workdir = str(tmp_path_factory.mktemp("plots") / "swissroll")
    config = h.swissroll(train__checkpoint_every=40, train__num_samples=0)
    train.train_and_evaluate(config, workdir, devices=jax.devices()[:1])
    return workdir


def test_trajectory_figure_of_images(digits_workdir, tmp_path):
    out = tmp_path / "trajectory.png"
    argv = ["trajectory", "--workdir", digits_workdir, "--out", str(out), "--steps", "10"]
    assert plots_cli.main([*argv, "--num", "4", "--frames", "5"]) == 0
    # 5 pairs of 32-pixel tiles and the sample: wider than tall, every row visible.
    _assert_png_not_blank(out, min_size=(500, 180))


def test_trajectory_figure_of_points(swissroll_workdir, tmp_path):
    out = tmp_path / "trajectory.png"
    argv = ["trajectory", "--workdir", swissroll_workdir, "--out", str(out), "--steps", "10"]
    assert plots_cli.main([*argv, "--num", "200", "--frames", "5"]) == 0
    _assert_png_not_blank(out, min_size=(1300, 450))


def test_loss_figure(digits_workdir, tmp_path):
    out = tmp_path / "loss.png"
    assert plots_cli.main(["loss", "--workdir", digits_workdir, "--out", str(out)]) == 0
    _assert_png_not_blank(out, min_size=(1200, 420))
    with pytest.raises(FileNotFoundError, match="No such workdir"):
        run_figures.plot_loss(str(tmp_path / "empty"), str(tmp_path / "x.png"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"metrics\.jsonl: the run has not logged"):
        run_figures.plot_loss(str(tmp_path / "empty"), str(tmp_path / "x.png"))


def test_samples_figure_of_images(digits_workdir, tmp_path):
    out = tmp_path / "samples.png"
    argv = ["samples", "--workdir", digits_workdir, "--out", str(out), "--num", "16"]
    assert plots_cli.main([*argv, "--steps", "5"]) == 0
    _assert_png_not_blank(out, min_size=(400, 400))


def test_samples_figure_of_points(swissroll_workdir, tmp_path):
    out = tmp_path / "samples.png"
    argv = ["samples", "--workdir", swissroll_workdir, "--out", str(out), "--num", "256"]
    assert plots_cli.main([*argv, "--steps", "10"]) == 0
    _assert_png_not_blank(out, min_size=(600, 600))


@pytest.mark.parametrize(
    ("kwargs", "argument", "message"),
    [
        ({"steps": 0}, "steps", r"^steps must lie in \[1, 100\]"),
        ({"frames": 0}, "frames", "^frames must be >= 1, got 0"),
        ({"num": 0}, "num", "^num must be >= 1, got 0"),
        ({"method": "lms"}, "method", "^Unknown method 'lms'"),
        ({"which": "best"}, "which", "^Unknown which 'best'"),
    ],
)
def test_trajectory_errors_name_the_argument(digits_workdir, tmp_path, kwargs, argument, message):
    with pytest.raises(options.ArgumentError, match=message) as raised:
        run_figures.plot_trajectory(digits_workdir, str(tmp_path / "x.png"), **kwargs)
    assert raised.value.argument == argument


def test_samples_command_names_its_flags_in_errors(digits_workdir, tmp_path, capsys):
    argv = ["samples", "--workdir", digits_workdir, "--out", str(tmp_path / "x.png")]
    assert plots_cli.main([*argv, "--steps", "101"]) == 2
    err = capsys.readouterr().err
    assert err == "error: --steps must lie in [1, 100] (T of this model), got 101.\n"
    assert not (tmp_path / "x.png").exists()


def test_workdir_figures_need_a_workdir(tmp_path):
    with pytest.raises(SystemExit):
        plots_cli.main(["samples", "--out", str(tmp_path / "x.png")])
