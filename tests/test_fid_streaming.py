"""FID and IS that stream: the running mean/covariance and the per-split Inception Score against
float64 all-at-once references, and ``fid_from_workdir`` (which scores each sampler batch as it
is drawn) against the all-in-memory path on a tiny run.

The end-to-end test replaces the Inception network by a fixed random projection of the pixels
(the network itself is tested in ``tests/test_fid.py``): what is tested here is the order in
which samples are drawn, scored and folded into the statistics, and that costs a few seconds
instead of one Inception call per batch. That memory does not grow with ``num`` follows from
the code (one sampler batch, one Inception batch and O(D^2 + splits x K) running sums live at a
time); no test measures memory.
"""

from __future__ import annotations

import glob

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import trainer_helpers as h

from diffusion_jax.evaluation import fid, scoring
from diffusion_jax.models import inception
from diffusion_jax.train import generate


def split_into_batches(array: np.ndarray, sizes: list[int]) -> list[np.ndarray]:
    assert sum(sizes) == len(array)
    return np.split(array, np.cumsum(sizes)[:-1])


@pytest.mark.parametrize("offset", [0.0, 1e4])
def test_running_statistics_equal_all_at_once(offset):
    rng = np.random.default_rng(0)
    # Correlated features; the offset of 1e4 (std ~1) would cost E[xx^T] - mu mu^T about
    # 1e-8 relative in float64 (1e8 cancelled to O(1)); the pairwise update keeps ~1e-12.
    features = rng.normal(size=(103, 16)) @ rng.normal(size=(16, 16)) + offset
    running = fid.RunningStatistics(16)
    for batch in split_into_batches(features, [1, 0, 40, 7, 1, 54]):
        running.update(batch.astype(np.float64))
    mu, sigma = running.statistics()
    ref_mu, ref_sigma = features.mean(axis=0), np.cov(features, rowvar=False)  # float64
    assert running.count == 103
    # float64 rounding only: measured 2e-15 relative (offset 0) and 4e-12 (offset 1e4).
    np.testing.assert_allclose(mu, ref_mu, rtol=1e-12)
    np.testing.assert_allclose(sigma, ref_sigma, rtol=0, atol=1e-10 * np.abs(ref_sigma).max())
    # And compute_statistics (the all-at-once path of FID) agrees.
    chex_mu, chex_sigma = fid.compute_statistics(features)
    np.testing.assert_allclose(sigma, chex_sigma, rtol=0, atol=1e-10 * np.abs(ref_sigma).max())
    np.testing.assert_allclose(mu, chex_mu, rtol=1e-12)


def test_running_statistics_refuse_bad_input():
    running = fid.RunningStatistics(4)
    with pytest.raises(ValueError, match=r"features must be \[n, 4\]"):
        running.update(np.zeros((3, 5)))
    running.update(np.zeros((1, 4)))
    with pytest.raises(ValueError, match="need >= 2 features for a covariance, got 1"):
        running.statistics()


@pytest.mark.parametrize(("num", "num_splits"), [(1037, 10), (25, 1), (30, 7)])
def test_running_inception_score_equals_all_at_once(num, num_splits):
    rng = np.random.default_rng(num)
    # Peaked predictions over 50 classes, and classes 40.. that no sample of a split predicts
    # (logit -1e3: p(y) underflows to 0 and 0 log 0 must count as 0).
    logits = 4.0 * rng.normal(size=(num, 50))
    logits[:, 40:] = -1e3
    running = fid.RunningInceptionScore(num, num_splits, num_classes=50)
    sizes = [int(s) for s in np.diff([0, *sorted(rng.choice(np.arange(1, num), 4)), num])]
    for batch in split_into_batches(logits, sizes):
        running.update(batch)
    expected = fid.inception_score(logits, num_splits)
    # Same quantity, regrouped (E[sum p log p] - sum p(y) log p(y)): float64 rounding.
    np.testing.assert_allclose(running.result(), expected, rtol=1e-10, atol=1e-12)
    assert expected[0] > 1.5  # a score that depends on the logits, not the trivial 1


def test_running_inception_score_refuses_miscounts():
    running = fid.RunningInceptionScore(5, 2, num_classes=3)
    running.update(np.zeros((4, 3)))
    with pytest.raises(ValueError, match="saw 4 samples of the 5 announced"):
        running.result()
    with pytest.raises(ValueError, match="more than the 5 samples announced"):
        running.update(np.zeros((2, 3)))


# --- fid_from_workdir streams -----------------------------------------------------------------

PROJECTION_SEED = 7
# Pool features of the stand-in network: the Frechet distance's two eigendecompositions cost
# seconds at Inception's 2048 (minutes on a loaded machine), milliseconds at 64.
FEATURE_DIM = 64


@jax.jit
def projected_features(variables, images):
    """A stand-in for the Inception network: fixed random projections of the pixels to
    FEATURE_DIM non-negative "pool" features and 1008 logits (functions of each image alone)."""
    del variables
    pixels = fid.to_unit_rgb(images).reshape(images.shape[0], -1)
    key_pool, key_logits = jax.random.split(jax.random.key(PROJECTION_SEED))
    width = pixels.shape[1]
    pool = jax.random.normal(key_pool, (width, FEATURE_DIM)) / jnp.sqrt(width)
    logits = jax.random.normal(key_logits, (width, inception.NUM_LOGITS))
    return jax.nn.relu(pixels @ pool), pixels @ logits


@pytest.fixture(scope="module")
def digits_workdir(tmp_path_factory):
    """A workdir whose one checkpoint holds the digits U-Net with random parameters."""
    return h.random_digits_workdir(tmp_path_factory.mktemp("fid_stream") / "run", seed=1)


def test_streamed_fid_equals_the_all_in_memory_path(digits_workdir, tmp_path, monkeypatch):
    monkeypatch.setattr(fid, "_features", projected_features)
    monkeypatch.setattr(inception, "FEATURE_DIM", FEATURE_DIM)
    monkeypatch.setattr(scoring, "load_inception_variables", lambda path=None: {})
    rng = np.random.default_rng(2)
    ref_features = rng.gamma(1.0, size=(64, FEATURE_DIM))
    ref_stats = fid.save_statistics(
        str(tmp_path / "ref.npz"), *fid.compute_statistics(ref_features)
    )
    # 20 samples in sampler batches of 8 (8, 8, 4) and Inception batches of 16: the second
    # sampler batch completes an Inception batch, the last one is scored alone.
    settings = {"num": 20, "batch_size": 8, "method": "ddim", "steps": 3, "seed": 5}
    result = scoring.fid_from_workdir(
        str(digits_workdir),
        ref_stats,
        inception_batch_size=16,
        samples_dir=str(tmp_path / "shards"),
        progress=False,
        **settings,
    )

    shards = sorted(glob.glob(str(tmp_path / "shards" / "samples_*.npz")))
    assert [s.rsplit("_", 1)[1] for s in shards] == ["0000000.npz", "0000008.npz", "0000016.npz"]
    # The old path on the same samples (``generate`` is these batches concatenated): every
    # sample in memory, then every feature, then the statistics and IS at once.
    images = np.concatenate([np.load(s)["images"] for s in shards])
    assert images.shape == (20, 8, 8, 1) and images.dtype == np.uint8
    assert len(np.unique(images.reshape(20, -1), axis=0)) == 20  # distinct samples
    pool, logits = fid.FeatureExtractor({}, batch_size=16)(images)
    expected_fid = fid.frechet_distance(
        *fid.compute_statistics(pool), *fid.load_statistics(ref_stats)
    )
    expected_is = fid.inception_score(logits, fid.default_num_splits(20))
    assert expected_fid > 1.0  # a distance that the features decide
    # float32 features of the same images, float64 statistics merged in another order:
    # measured 2.5e-10 relative.
    np.testing.assert_allclose(result["fid"], expected_fid, rtol=1e-7)
    np.testing.assert_allclose(
        [result["inception_score"], result["inception_score_std"]], expected_is, rtol=1e-7
    )
    assert result["samples_dir"] == str(tmp_path / "shards")


def test_samples_dir_is_checked_before_sampling(digits_workdir, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    stats = fid.save_statistics(str(tmp_path / "s.npz"), np.zeros(2048), np.eye(2048))
    with pytest.raises(scoring.options.ArgumentError, match="not a directory") as raised:
        scoring.fid_from_workdir(
            str(digits_workdir), stats, samples_dir=str(blocker), progress=False
        )
    assert raised.value.argument == "samples_dir"


def test_timestep_spacing_reaches_the_sampler(digits_workdir, tmp_path, monkeypatch):
    """``timestep_spacing`` changes the samples FID scores (the DDIM paper's CIFAR-10 runs used
    ``quadratic``), they are the sampler's own, and it names the result file."""
    monkeypatch.setattr(fid, "_features", projected_features)
    monkeypatch.setattr(inception, "FEATURE_DIM", FEATURE_DIM)
    monkeypatch.setattr(scoring, "load_inception_variables", lambda path=None: {})
    rng = np.random.default_rng(3)
    ref_stats = fid.save_statistics(
        str(tmp_path / "ref.npz"), *fid.compute_statistics(rng.gamma(1.0, size=(64, FEATURE_DIM)))
    )
    settings = {"num": 8, "batch_size": 8, "method": "ddim", "steps": 3, "seed": 5}
    images = {}
    for spacing in ("linspace", "quadratic"):
        out = tmp_path / spacing
        result = scoring.fid_from_workdir(
            str(digits_workdir), ref_stats, timestep_spacing=spacing, samples_dir=str(out),
            progress=False, **settings,
        )  # fmt: skip
        assert result["timestep_spacing"] == spacing
        images[spacing] = np.load(out / "samples_0000000.npz")["images"]
    assert result["json"].endswith("fid_ema_ddim3_quadratic_n8_seed5.json")
    assert not np.array_equal(images["linspace"], images["quadratic"])

    run = scoring.restore_run(str(digits_workdir), which="ema")
    expected = generate.generate(
        run.config, run.model, run.schedule, run.params, run.data_shape, num=8, batch_size=8,
        seed=5, method="ddim", num_steps=3, is_image=True, timestep_spacing="quadratic",
    )  # fmt: skip
    np.testing.assert_array_equal(images["quadratic"], generate.to_uint8(expected))

    with pytest.raises(scoring.options.ArgumentError, match="timestep_spacing"):
        scoring.fid_from_workdir(
            str(digits_workdir), ref_stats, timestep_spacing="even", progress=False, **settings
        )
