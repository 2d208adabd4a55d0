"""The 2-D toy sets of the diffusion tutorials, as fixed, seeded point clouds.

Each set has a fixed ``train`` split of 10,000 points and a ``test`` split of 2,000 points,
drawn once from a seed that depends only on the set and the split, so every run (and every
process) sees the same points. They are read through the same grain pipeline as the image
sets (`diffusion_jax.data.create_iterator`), which shuffles, shards and checkpoints them.

The points do not lie in [-1, 1] (the swiss roll spans about [-1.4, 1.8] with its noise, the
8 Gaussians and the checkerboard [-4, 4]): models trained on them must sample with x0 clipping
off.
"""

import functools

import numpy as np

TOY_DATASETS = ("swissroll", "moons", "8gaussians", "checkerboard")
"""Names of the generated 2-D sets."""

TOY_SPLIT_SIZES = {"train": 10_000, "test": 2_000}
"""Number of points in each split of every toy set."""

TOY_NUM_CLASSES = {"swissroll": None, "moons": 2, "8gaussians": 8, "checkerboard": None}
"""Number of classes of each toy set (``None``: the set has no labels)."""

# Fixed so that a split is the same array in every run; changing it changes every toy set.
_DATA_SEED = 20_200_619

_SWISSROLL_NOISE = 1.0  # The acids-ircam tutorial's default noise.
_GAUSSIANS_RADIUS = 4.0 / np.sqrt(2.0)  # FFJORD's eight centres at 4 on the unit circle, / 1.414.
_GAUSSIANS_STD = 0.5 / np.sqrt(2.0)


def _swissroll(num_points: int, rng: np.random.Generator) -> tuple[np.ndarray, None]:
    # Imported here: scikit-learn takes a second to import and only this path needs it.
    from sklearn.datasets import make_swiss_roll

    points, _ = make_swiss_roll(
        num_points, noise=_SWISSROLL_NOISE, random_state=int(rng.integers(2**31))
    )
    # Columns 0 and 2 are the roll's plane; dividing by 10 brings it near [-1, 1].
    return points[:, [0, 2]] / 10.0, None


def _moons(num_points: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import make_moons

    points, labels = make_moons(num_points, noise=0.1, random_state=int(rng.integers(2**31)))
    # make_moons is centred on (0.5, 0.25) and about 3 x 1.5 wide: centre it and double it.
    return 2.0 * (points - np.array([0.5, 0.25])), labels


def _eight_gaussians(num_points: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    labels = rng.integers(0, 8, size=num_points)
    angles = labels * (np.pi / 4.0)
    centres = _GAUSSIANS_RADIUS * np.stack([np.cos(angles), np.sin(angles)], axis=-1)
    return centres + _GAUSSIANS_STD * rng.standard_normal((num_points, 2)), labels


def _checkerboard(num_points: int, rng: np.random.Generator) -> tuple[np.ndarray, None]:
    # A 4 x 4 board of unit squares on [-2, 2]^2 (then scaled by 2); points fill the eight
    # squares whose column and row indices have the same parity.
    x = rng.uniform(-2.0, 2.0, size=num_points)
    column = np.floor(x)
    row = 2.0 * rng.integers(-1, 1, size=num_points) + np.mod(column, 2.0)
    y = row + rng.uniform(0.0, 1.0, size=num_points)
    return 2.0 * np.stack([x, y], axis=-1), None


_GENERATORS = {
    "swissroll": _swissroll,
    "moons": _moons,
    "8gaussians": _eight_gaussians,
    "checkerboard": _checkerboard,
}


def sample_toy(
    name: str, num_points: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray | None]:
    """Draws fresh points from a toy distribution.

    Args:
      name: one of `TOY_DATASETS`.
      num_points: number of points N.
      rng: the NumPy generator to draw from.

    Returns:
      ``(points, labels)``: points float32 [N, 2]; labels int32 [N] for the sets in
      `TOY_NUM_CLASSES` with classes (moons: which moon, 8gaussians: which centre), else None.

    Example:
      >>> points, _ = sample_toy("swissroll", 100, np.random.default_rng(0))
      >>> points.shape, points.dtype
      ((100, 2), dtype('float32'))
    """
    if name not in _GENERATORS:
        raise ValueError(f"Unknown toy set {name=}; the toy sets are {TOY_DATASETS}.")
    if num_points <= 0:
        raise ValueError(f"num_points must be positive, got {num_points=}.")
    points, labels = _GENERATORS[name](num_points, rng)
    if labels is not None:
        labels = np.asarray(labels, dtype=np.int32)
    return np.asarray(points, dtype=np.float32), labels


@functools.cache
def toy_split(name: str, split: str) -> tuple[np.ndarray, np.ndarray | None]:
    """Returns one fixed split of a toy set (computed once per process, then cached).

    Args:
      name: one of `TOY_DATASETS`.
      split: ``"train"`` or ``"test"`` (sizes in `TOY_SPLIT_SIZES`).

    Returns:
      ``(points, labels)`` as in `sample_toy`; the arrays are read-only.
    """
    if split not in TOY_SPLIT_SIZES:
        raise ValueError(
            f"Toy set {name!r} has no split {split!r}; its splits are {tuple(TOY_SPLIT_SIZES)}."
        )
    if name not in _GENERATORS:
        raise ValueError(f"Unknown toy set {name=}; the toy sets are {TOY_DATASETS}.")
    # The seed depends on (set, split) only, so the test points never overlap the train draw.
    seed_sequence = np.random.SeedSequence(
        [_DATA_SEED, TOY_DATASETS.index(name), list(TOY_SPLIT_SIZES).index(split)]
    )
    points, labels = sample_toy(name, TOY_SPLIT_SIZES[split], np.random.default_rng(seed_sequence))
    points.flags.writeable = False
    if labels is not None:
        labels.flags.writeable = False
    return points, labels


def reference_points(name: str) -> np.ndarray | None:
    """The train points of toy set ``name`` (to draw samples over), or None for other data."""
    return toy_split(name, "train")[0] if name in TOY_DATASETS else None
