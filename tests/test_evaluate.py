"""The digits check used by the demo: real digits pass, noise and blanks do not."""

import numpy as np
import pytest

from diffusion_jax import evaluate
from diffusion_jax.data import digits


@pytest.fixture(scope="module")
def held_out():
    images, labels = digits.load_digits_uint8()
    test = digits.split_indices()["test"]
    return images[test], labels[test]


def test_real_held_out_digits_are_recognisable(held_out):
    images, _ = held_out
    report = evaluate.digits_report(images)
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
    report = evaluate.digits_report(fake.astype(np.uint8))
    # The linear classifier alone is confidently wrong here; the distance test catches it.
    assert report["recognisable_fraction"] < 0.05


def test_cli_exit_code(tmp_path, held_out, capsys):
    images, _ = held_out
    path = tmp_path / "samples.npz"
    np.savez(path, images=images)
    assert evaluate.main(["digits", "--samples", str(path), "--min_recognisable", "0.5"]) == 0
    assert "classes present: 10/10" in capsys.readouterr().out
    np.savez(path, images=np.zeros_like(images))
    assert evaluate.main(["digits", "--samples", str(path), "--min_recognisable", "0.5"]) == 1


def test_rejects_wrong_images():
    with pytest.raises(ValueError, match=r"uint8 \[N, 8, 8"):
        evaluate.digits_report(np.zeros((4, 28, 28, 1), np.uint8))
