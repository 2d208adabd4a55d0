"""FID and IS: the Flax FID Inception against pytorch-fid's own network sharing one random
initialisation, the Frechet distance against a float64 SciPy reference and closed forms, the
Inception Score by construction, weights files and their errors, and the ``ref-stats`` and
``fid`` commands end to end on the digits.

The cross-check needs the ``compare`` extra (torch, torchvision, pytorch-fid) and is skipped
without it. pytorch-fid's ``InceptionV3()`` downloads its weights, so its loader is replaced by
one that returns a random state dict: the network under test is pytorch-fid's (its FID blocks,
resize and input scaling, BatchNorm in eval mode), with weights the Flax port also gets through
``convert_torch_weights``.
"""

from __future__ import annotations

import json
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg
import trainer_helpers as h

from diffusion_jax import data, options
from diffusion_jax.evaluation import __main__ as evaluate_cli
from diffusion_jax.evaluation import fid, scoring
from diffusion_jax.models import inception

# Measured: 7e-7 for pool features and logits (float32 on CPU); a wrong block (average pooling
# counting the padding, or Mixed_7c average- instead of max-pooling) or BatchNorm eps 1e-5
# instead of 1e-3 costs 1e-2 .. 2.5e-1.
TORCH_RTOL = 1e-5

_TORCH_LEAF = {
    ("conv", "kernel"): "conv.weight",
    ("bn", "scale"): "bn.weight",
    ("bn", "bias"): "bn.bias",
    ("bn", "mean"): "bn.running_mean",
    ("bn", "var"): "bn.running_var",
}


def torch_name(path: tuple[str, ...]) -> str:
    """torchvision's ``Inception3`` name of a Flax variable path."""
    _, *modules, layer, leaf = path
    if layer == "fc":
        return "fc." + {"kernel": "weight", "bias": "bias"}[leaf]
    return ".".join([*modules, _TORCH_LEAF[(layer, leaf)]])


def random_state_dict(seed: int) -> dict[str, np.ndarray]:
    """A random FID Inception ``state_dict`` (torch layouts) whose activations stay O(1).

    He-scaled kernels and random BatchNorm affine parameters and running statistics, so that
    each layer's scale, shift and eps matter.
    """
    rng = np.random.default_rng(seed)
    state = {}
    for path, shape in sorted(inception.variable_shapes().items()):
        name = torch_name(path)
        if name.endswith("conv.weight"):
            kh, kw, cin, cout = shape
            value = rng.normal(0.0, np.sqrt(2.0 / (kh * kw * cin)), (cout, cin, kh, kw))
        elif name == "fc.weight":
            value = rng.normal(0.0, np.sqrt(1.0 / shape[0]), shape[::-1])
        elif name.endswith("bn.weight"):
            value = rng.uniform(0.5, 1.5, shape)
        elif name.endswith("running_var"):
            value = rng.uniform(0.5, 2.0, shape)
        else:
            value = rng.normal(0.0, 0.2, shape)
        state[name] = value.astype(np.float32)
    return state


@pytest.fixture(scope="module")
def state_dict():
    return random_state_dict(0)


@pytest.fixture(scope="module")
def weights_file(state_dict, tmp_path_factory):
    path = tmp_path_factory.mktemp("inception") / "fid_inception.npz"
    return fid.save_inception_variables(inception.convert_torch_weights(state_dict), str(path))


def relative_error(actual, expected) -> float:
    return float(np.abs(np.asarray(actual) - expected).max() / np.abs(expected).max())


# --- the network against pytorch-fid ---------------------------------------------------------


def import_pytorch_fid():
    """pytorch-fid's ``inception`` module, or a skip saying what is missing."""
    pytest.importorskip("torch")
    try:  # imports torchvision
        from pytorch_fid import inception as pytorch_fid
    except ImportError as err:
        pytest.skip(f"pytorch-fid or torchvision missing (pip install -e '.[compare]'): {err}")
    except RuntimeError as err:  # e.g. a torchvision built for another torch
        pytest.skip(f"torchvision does not work beside this torch: {err}")
    return pytorch_fid


def test_matches_pytorch_fid_network(state_dict):
    pytorch_fid = import_pytorch_fid()
    import torch

    tensors = {name: torch.from_numpy(value) for name, value in state_dict.items()}

    def no_download(url, **kwargs):
        assert url == pytorch_fid.FID_WEIGHTS_URL
        return tensors

    with mock.patch.object(pytorch_fid, "load_state_dict_from_url", no_download):
        network = pytorch_fid.InceptionV3([3]).eval()  # load_state_dict is strict
    assert isinstance(network.blocks[3][2], pytorch_fid.FIDInceptionE_2)  # FID's blocks

    # Not square and not 299: pytorch-fid's bilinear resize is part of what is compared.
    images = np.random.default_rng(1).integers(0, 256, (3, 40, 56, 3), dtype=np.uint8)
    unit = images.astype(np.float32) / 255.0
    with torch.no_grad():
        pool = network(torch.from_numpy(unit.transpose(0, 3, 1, 2)))[0][:, :, 0, 0].numpy()
    weight, bias = state_dict["fc.weight"].astype(np.float64), state_dict["fc.bias"]
    unbiased = pool.astype(np.float64) @ weight.T

    variables = inception.convert_torch_weights(tensors)
    out = jax.jit(inception.InceptionV3().apply)(variables, jnp.asarray(unit))
    assert 0.1 < np.abs(pool).mean() < 10  # activations neither vanished nor exploded
    assert relative_error(out["pool"], pool) < TORCH_RTOL
    assert relative_error(out["logits"], unbiased + bias) < TORCH_RTOL
    assert relative_error(out["logits_unbiased"], unbiased) < TORCH_RTOL


@pytest.mark.parametrize("size", [(8, 8), (40, 56), (299, 299), (320, 500)])
def test_resize_matches_torch_interpolate(size):
    torch = pytest.importorskip("torch")
    images = np.random.default_rng(2).random((2, *size, 3), dtype=np.float32)
    expected = torch.nn.functional.interpolate(
        torch.from_numpy(images.transpose(0, 3, 1, 2)),
        size=(299, 299),
        mode="bilinear",
        align_corners=False,
    )
    actual = inception.resize_bilinear(jnp.asarray(images), 299)
    np.testing.assert_allclose(actual, expected.numpy().transpose(0, 2, 3, 1), atol=1e-6)


def test_to_unit_rgb_scales_and_repeats_gray():
    gray = np.array([0, 51, 255], np.uint8).reshape(1, 1, 3, 1)
    rgb = np.asarray(fid.to_unit_rgb(gray))
    assert rgb.shape == (1, 1, 3, 3) and rgb.dtype == np.float32
    np.testing.assert_allclose(rgb[0, 0], np.repeat([[0.0], [0.2], [1.0]], 3, axis=1))
    colour = np.random.default_rng(0).integers(0, 256, (2, 4, 4, 3), dtype=np.uint8)
    np.testing.assert_allclose(fid.to_unit_rgb(colour), colour / 255.0, rtol=1e-6)


# --- Frechet distance and Inception Score ---------------------------------------------------


def scipy_frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """pytorch-fid's formula in float64 with ``scipy.linalg.sqrtm``."""
    covmean = scipy.linalg.sqrtm(sigma1 @ sigma2).real
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def gaussian_statistics(rng, num: int, dim: int):
    mixing = rng.normal(size=(dim, dim)) / np.sqrt(dim)
    samples = rng.normal(size=(num, dim)) @ mixing + rng.normal(size=dim)
    return fid.compute_statistics(samples)


@pytest.mark.parametrize(("num", "dim", "rtol"), [(500, 64, 1e-9), (40, 64, 1e-7)])
def test_frechet_distance_matches_scipy(num, dim, rtol):
    # num < dim: singular covariances, as with fewer samples than 2048 features.
    rng = np.random.default_rng(num)
    first, second = gaussian_statistics(rng, num, dim), gaussian_statistics(rng, num, dim)
    expected = scipy_frechet_distance(*first, *second)
    assert fid.frechet_distance(*first, *second) == pytest.approx(expected, rel=rtol)


def test_frechet_distance_of_diagonal_gaussians_in_closed_form():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=16), rng.normal(size=16)
    var1, var2 = rng.uniform(0.1, 3, 16), rng.uniform(0.1, 3, 16)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(var1) - np.sqrt(var2)) ** 2)
    actual = fid.frechet_distance(mu1, np.diag(var1), mu2, np.diag(var2))
    assert actual == pytest.approx(expected, rel=1e-12)


def test_fid_of_a_set_against_itself_is_zero_and_symmetric():
    rng = np.random.default_rng(3)
    features = rng.normal(size=(300, 128)) * rng.uniform(0.5, 2, 128)
    other = features[:150] + 0.3 * rng.normal(size=(150, 128))
    stats, other_stats = fid.compute_statistics(features), fid.compute_statistics(other)
    assert abs(fid.frechet_distance(*stats, *stats)) < 1e-9 * np.trace(stats[1])
    forward = fid.frechet_distance(*stats, *other_stats)
    assert forward > 1.0
    assert fid.frechet_distance(*other_stats, *stats) == pytest.approx(forward, rel=1e-10)


def test_compute_statistics_and_shape_errors():
    features = np.random.default_rng(4).normal(size=(50, 6)).astype(np.float32)
    mu, sigma = fid.compute_statistics(features)
    assert mu.dtype == sigma.dtype == np.float64
    np.testing.assert_allclose(mu, features.astype(np.float64).mean(0), rtol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(features.astype(np.float64).T), rtol=1e-12)
    with pytest.raises(ValueError, match="N >= 2"):
        fid.compute_statistics(features[:1])
    with pytest.raises(ValueError, match="sigma2"):
        fid.frechet_distance(mu, sigma, mu, sigma[:5, :5])


def test_inception_score_by_construction():
    # The same prediction for every sample: p(y|x) = p(y), IS = 1.
    assert fid.inception_score(np.zeros((40, 1008))) == pytest.approx((1.0, 0.0), abs=1e-12)
    # Certain predictions, every class used equally in each split: IS = number of classes.
    for classes, num, splits in ((10, 100, 10), (1008, 2016, 2)):
        logits = 60.0 * np.eye(classes)[np.arange(num) % classes]
        mean, std = fid.inception_score(logits, splits)
        assert mean == pytest.approx(classes, rel=1e-12) and std < 1e-9
    # Certain predictions over two of three classes: IS = 2; 1000 logits far below: no effect.
    logits = np.full((8, 3), -1000.0)
    logits[np.arange(8), np.arange(8) % 2] = 0.0
    assert fid.inception_score(logits, 1)[0] == pytest.approx(2.0, rel=1e-12)
    with pytest.raises(ValueError, match="num_splits"):
        fid.inception_score(np.zeros((5, 3)), 10)


def test_inception_score_matches_its_definition():
    logits = np.random.default_rng(5).normal(size=(60, 7)) * 3
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    scores = []
    for part in np.split(p, 3):
        kl = (part * (np.log(part) - np.log(part.mean(0)))).sum(1)
        scores.append(np.exp(kl.mean()))
    mean, std = fid.inception_score(logits, 3)
    assert mean == pytest.approx(np.mean(scores), rel=1e-12)
    assert std == pytest.approx(np.std(scores), rel=1e-9)


# --- weights files --------------------------------------------------------------------------


def test_missing_weights_say_where_to_get_them(monkeypatch, tmp_path):
    monkeypatch.delenv(fid.WEIGHTS_ENV, raising=False)
    for path in (None, str(tmp_path / "nowhere.npz")):
        with pytest.raises(FileNotFoundError) as info:
            fid.load_inception_variables(path)
        message = str(info.value)
        assert "pt_inception-2015-12-05-6726825d.pth" in message
        assert "convert-inception" in message and fid.WEIGHTS_ENV in message
    monkeypatch.setenv(fid.WEIGHTS_ENV, str(tmp_path / "gone.npz"))
    with pytest.raises(FileNotFoundError, match=r"gone\.npz"):
        fid.resolve_inception_weights()
    (tmp_path / "here.npz").write_bytes(b"")
    monkeypatch.setenv(fid.WEIGHTS_ENV, str(tmp_path / "here.npz"))
    assert fid.resolve_inception_weights() == str(tmp_path / "here.npz")
    (tmp_path / "flag.npz").write_bytes(b"")  # an explicit path wins over the environment
    assert fid.resolve_inception_weights(str(tmp_path / "flag.npz")) == str(tmp_path / "flag.npz")


def test_weights_roundtrip_and_validation(state_dict, weights_file, tmp_path):
    loaded = fid.load_inception_variables(weights_file)
    kernel = loaded["params"]["Mixed_6b"]["branch7x7_2"]["conv"]["kernel"]
    assert kernel.shape == (1, 7, 128, 128)  # torch (128, 128, 1, 7) -> HWIO
    np.testing.assert_array_equal(
        kernel, state_dict["Mixed_6b.branch7x7_2.conv.weight"].transpose(2, 3, 1, 0)
    )
    np.testing.assert_array_equal(
        loaded["batch_stats"]["Conv2d_1a_3x3"]["bn"]["var"],
        state_dict["Conv2d_1a_3x3.bn.running_var"],
    )
    # pytorch-fid's file holds BatchNorm counters; torchvision dicts may hold the aux head.
    extra = dict(state_dict, **{"Conv2d_1a_3x3.bn.num_batches_tracked": np.array(0)})
    extra["AuxLogits.fc.weight"] = np.zeros((1008, 768), np.float32)
    inception.convert_torch_weights(extra)
    broken = dict(state_dict)
    del broken["Mixed_7c.branch_pool.conv.weight"]
    broken["Mixed_5b.branch1x1.conv.weight"] = np.zeros((64, 192, 3, 3), np.float32)
    with pytest.raises(ValueError, match=r"Mixed_7c/branch_pool/conv/kernel.*wrong shapes"):
        inception.convert_torch_weights(broken)
    with np.load(weights_file) as npz:
        arrays = {k: npz[k] for k in npz.files if k != "params/fc/bias"}
    np.savez(tmp_path / "partial.npz", **arrays)
    with pytest.raises(ValueError, match="params/fc/bias"):
        fid.load_inception_variables(str(tmp_path / "partial.npz"))


def test_convert_command_reads_a_pth(state_dict, tmp_path, capsys):
    torch = pytest.importorskip("torch")
    pth, out = tmp_path / "weights.pth", tmp_path / "converted.npz"
    torch.save({name: torch.from_numpy(value) for name, value in state_dict.items()}, pth)
    assert evaluate_cli.main(["convert-inception", "--pth", str(pth), "--out", str(out)]) == 0
    assert "not pytorch-fid's 6726825d" in capsys.readouterr().err  # a different file
    loaded = fid.load_inception_variables(str(out))
    np.testing.assert_array_equal(loaded["params"]["fc"]["kernel"], state_dict["fc.weight"].T)


# --- ref-stats and fid end to end -------------------------------------------------------------


@pytest.fixture(scope="module")
def digits_workdir(tmp_path_factory):
    """A workdir whose one checkpoint holds the digits U-Net with random parameters."""
    return h.random_digits_workdir(tmp_path_factory.mktemp("fid_digits") / "run", seed=0)


def test_ref_stats_and_fid_commands(digits_workdir, weights_file, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(fid.WEIGHTS_ENV, weights_file)
    stats_path = tmp_path / "digits_stats.npz"
    # Inception batches of 8 images: one per fake device (each costs ~2 s on 2 CPU cores).
    argv = ["ref-stats", "--dataset", "digits", "--num", "8", "--batch_size", "8"]
    assert evaluate_cli.main([*argv, "--out", str(stats_path)]) == 0
    assert "statistics of 8 images of digits:train" in capsys.readouterr().out
    with np.load(stats_path) as npz:
        assert npz["mu"].shape == (2048,) and npz["sigma"].shape == (2048, 2048)
        assert int(npz["num"]) == 8 and str(npz["split"]) == "train"

    # The same statistics from the first 8 train digits fed directly (gray -> RGB).
    _, source = data.open_split("digits", split="train")
    images = np.stack(source.read(np.arange(8))["image"])
    extract = fid.FeatureExtractor(fid.load_inception_variables(), batch_size=8)
    pool, _ = extract(images)
    mu, sigma = fid.compute_statistics(pool)
    ref_mu, ref_sigma = fid.load_statistics(str(stats_path))
    np.testing.assert_allclose(ref_mu, mu, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ref_sigma, sigma, rtol=1e-5, atol=1e-6 * np.abs(sigma).max())

    compiled = fid._features._cache_size()
    argv = ["fid", "--workdir", str(digits_workdir), "--ref", str(stats_path), "--num", "6"]
    # 6 samples: one Inception batch, padded, and no new compilation of the network.
    assert evaluate_cli.main([*argv, "--steps", "4", "--inception_batch_size", "8"]) == 0
    assert fid._features._cache_size() == compiled
    out = capsys.readouterr().out
    assert "FID " in out and "(6 samples, ema params, ddim 4 steps)" in out
    result = json.loads((digits_workdir / "eval" / "fid_ema_ddim4_n6_seed0.json").read_text())
    assert result["fid"] > 0 and np.isfinite(result["fid"])
    assert 1.0 <= result["inception_score"] <= 1008


def test_commands_report_missing_inputs(digits_workdir, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv(fid.WEIGHTS_ENV, raising=False)
    argv = ["ref-stats", "--dataset", "digits", "--out", str(tmp_path / "s.npz")]
    assert evaluate_cli.main(argv) == 2
    assert "convert-inception" in capsys.readouterr().err
    argv = ["fid", "--workdir", str(digits_workdir), "--ref", str(tmp_path / "none.npz")]
    assert evaluate_cli.main(argv) == 2
    assert "ref-stats" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("kwargs", "argument", "message"),
    [
        ({"which": "best"}, "which", "^Unknown which 'best'"),
        ({"method": "lms"}, "method", "^Unknown method 'lms'"),
        ({"num": 1}, "num", "^num must be >= 2 for a covariance, got 1"),
        ({"steps": 101}, "steps", r"^steps must lie in \[1, 100\] \(T of this model\)"),
        ({"guidance": 2.0}, "guidance", "^guidance needs a class-conditional model"),
    ],
)
def test_fid_errors_name_the_argument(
    digits_workdir, weights_file, tmp_path, kwargs, argument, message
):
    stats = fid.save_statistics(str(tmp_path / "s.npz"), np.zeros(2048), np.eye(2048))
    with pytest.raises(options.ArgumentError, match=message) as raised:
        scoring.fid_from_workdir(
            str(digits_workdir), stats, inception_weights=weights_file, progress=False, **kwargs
        )
    assert raised.value.argument == argument


def test_commands_name_their_flags_in_errors(digits_workdir, weights_file, tmp_path, capsys):
    argv = ["fid", "--workdir", str(digits_workdir), "--ref", str(tmp_path / "none.npz")]
    assert evaluate_cli.main([*argv, "--num", "1"]) == 2
    assert capsys.readouterr().err == "error: --num must be >= 2 for a covariance, got 1.\n"
    argv = ["ref-stats", "--dataset", "digits", "--out", str(tmp_path / "s.npz"), "--num", "1"]
    assert evaluate_cli.main([*argv, "--inception_weights", weights_file]) == 2
    err = capsys.readouterr().err
    assert err == "error: --num must lie in [2, 1500] (the split's size), got 1.\n"
    assert not (tmp_path / "s.npz").exists()
