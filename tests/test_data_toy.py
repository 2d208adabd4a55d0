"""Tests of the 2-D toy sets: their statistics, and that they go through the same pipeline."""

import chex
import numpy as np
import pytest

from diffusion_jax import data
from diffusion_jax.data import toy


def _iterator(name, **kwargs):
    settings = dict(split="train", batch_size=1000, seed=0, process_index=0, process_count=1)
    settings.update(kwargs)
    return data.create_iterator(name, **settings)


@pytest.mark.parametrize("name", toy.TOY_DATASETS)
def test_splits_are_fixed_and_distinct(name):
    train, train_labels = toy.toy_split(name, "train")
    test, _ = toy.toy_split(name, "test")
    assert train.shape == (10_000, 2) and test.shape == (2_000, 2)
    assert train.dtype == np.float32 and np.isfinite(train).all()
    assert not train.flags.writeable
    assert (train_labels is None) == (toy.TOY_NUM_CLASSES[name] is None)
    toy.toy_split.cache_clear()
    np.testing.assert_array_equal(toy.toy_split(name, "train")[0], train)
    assert not np.array_equal(train[:2_000], test)


def test_swissroll_statistics():
    points, _ = toy.toy_split("swissroll", "train")
    # t ~ U[1.5 pi, 4.5 pi]; (t cos t, t sin t) / 10 has mean (2, 2 / (3 pi)) / 10 in closed
    # form; the noise (std 1 / 10 per coordinate) has mean 0. Tolerance: ~4 standard errors.
    np.testing.assert_allclose(points.mean(0), [0.2, 2 / (30 * np.pi)], atol=0.03)
    # Noise-free extremes are [-0.94, 1.26] x [-1.10, 1.41]; allow 5 noise standard deviations.
    assert points.min(0).min() > -1.1 - 0.5 and points.max(0).max() < 1.41 + 0.5
    assert points[:, 0].min() < -0.8 and points[:, 1].max() > 1.3  # The roll is all there.


def test_eight_gaussians_centres():
    points, labels = toy.toy_split("8gaussians", "train")
    radius, std = 4 / np.sqrt(2), 0.5 / np.sqrt(2)
    for k in range(8):
        members = points[labels == k]
        assert len(members) > 1_000  # ~1250 each.
        centre = radius * np.array([np.cos(k * np.pi / 4), np.sin(k * np.pi / 4)])
        np.testing.assert_allclose(members.mean(0), centre, atol=0.05)
        np.testing.assert_allclose(members.std(0), [std, std], rtol=0.1)


def test_checkerboard_fills_only_the_dark_squares():
    points, _ = toy.toy_split("checkerboard", "train")
    assert points.min() >= -4 and points.max() <= 4
    column, row = np.floor(points[:, 0] / 2), np.floor(points[:, 1] / 2)
    assert (np.mod(column + row, 2) == 0).all()
    squares, counts = np.unique(np.stack([column, row], 1), axis=0, return_counts=True)
    assert len(squares) == 8 and counts.min() > 1_000


def test_moons_are_centred_and_balanced():
    points, labels = toy.toy_split("moons", "train")
    np.testing.assert_allclose(points.mean(0), [0, 0], atol=0.05)
    assert np.bincount(labels).tolist() == [5_000, 5_000]


def test_toy_batches_through_the_pipeline():
    iterator = _iterator("8gaussians")
    batch = next(iterator)
    assert set(batch) == {"x", "label"}
    assert batch["x"].shape == (1000, 2) and batch["x"].dtype == np.float32
    assert batch["label"].dtype == np.int32
    assert set(next(_iterator("swissroll"))) == {"x"}
    info = data.get_dataset_info("swissroll")
    assert (info.kind, info.shape, info.num_classes) == ("vector", (2,), None)
    assert dict(info.splits) == {"train": 10_000, "test": 2_000}


def test_toy_sharding_and_state():
    single = [next(it) for it in [_iterator("swissroll", seed=5)] for _ in range(12)]
    halves = [_iterator("swissroll", seed=5, process_index=p, process_count=2) for p in range(2)]
    for global_batch in single:
        blocks = [next(half) for half in halves]
        joined = {key: np.concatenate([block[key] for block in blocks]) for key in blocks[0]}
        chex.assert_trees_all_equal(joined, global_batch, strict=True)
    # Over one epoch (10 batches of 1000) every point appears exactly once.
    epoch = np.concatenate([batch["x"] for batch in single[:10]])
    assert len(np.unique(epoch, axis=0)) == 10_000

    iterator = _iterator("swissroll", seed=5)
    for _ in range(9):
        next(iterator)
    resumed = _iterator("swissroll", seed=5)
    resumed.set_state(iterator.get_state())
    for expected in single[9:]:  # Across the epoch boundary.
        chex.assert_trees_all_equal(next(resumed), expected, strict=True)


def test_image_options_are_rejected_for_vectors():
    with pytest.raises(ValueError, match="apply to images"):
        _iterator("moons", random_flip=True)


def test_sample_toy_is_seeded():
    first, _ = data.sample_toy("checkerboard", 50, np.random.default_rng(1))
    again, _ = data.sample_toy("checkerboard", 50, np.random.default_rng(1))
    np.testing.assert_array_equal(first, again)
    with pytest.raises(ValueError, match="Unknown toy set"):
        data.sample_toy("spiral", 5, np.random.default_rng(0))
