"""The picture commands write non-blank PNGs of the expected size."""

import numpy as np
import pytest
from PIL import Image

from diffusion_jax import plots


def _assert_png_not_blank(path, min_size=(400, 200)):
    with Image.open(path) as img:
        assert img.format == "PNG"
        assert img.size[0] >= min_size[0] and img.size[1] >= min_size[1], img.size
        pixels = np.asarray(img.convert("L"), dtype=np.float32)
    # A blank (single-colour) figure has no spread at all; a drawn one has plenty.
    assert pixels.std() > 10.0, f"{path} looks blank (std {pixels.std():.2f})"


def test_schedules_figure(tmp_path):
    out = tmp_path / "schedules.png"
    assert plots.main(["schedules", "--out", str(out), "--num_timesteps", "200"]) == 0
    _assert_png_not_blank(out, min_size=(1400, 380))


def test_noising_figure(tmp_path):
    out = tmp_path / "sub" / "noising.png"
    assert plots.main(["noising", "--out", str(out), "--num_timesteps", "100"]) == 0
    _assert_png_not_blank(out, min_size=(1200, 600))


def test_noising_rejects_bad_input(tmp_path):
    with pytest.raises(ValueError, match="timesteps must lie in"):
        plots.plot_noising(str(tmp_path / "x.png"), timesteps=(0, 1000), num_timesteps=1000)
    with pytest.raises(ValueError, match=r"image must be \[H, W, C\]"):
        plots.plot_noising(str(tmp_path / "x.png"), image=np.zeros((8, 8)))
