"""FID and Inception Score with the FID Inception network in JAX.

The numbers are those of the standard implementations: pool features of pytorch-fid's FID
Inception (:mod:`diffusion_jax.models.inception`), the Frechet distance between Gaussians fitted
to them in float64 (Heusel et al., 2017), and the Inception Score of Salimans et al. (2016) over
the 1008 logits without the classifier's bias (as their code and torch-fidelity compute it),
in 10 splits. Statistics files hold ``mu`` and ``sigma`` under pytorch-fid's and TTUR's keys,
so their reference statistics files can be read too. Both can be accumulated batch by batch
(:class:`RunningStatistics`, :class:`RunningInceptionScore`), so scoring 50,000 images needs no
more memory than scoring one batch.

The Inception weights are never downloaded at run time. Once, on a machine with internet,
fetch pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth`` (:data:`TORCH_WEIGHTS_URL`) and
convert it (needs torch)::

  python -m diffusion_jax.evaluation convert-inception --pth pt_inception-2015-12-05-6726825d.pth \\
      --out fid_inception.npz
  export DIFFUSION_JAX_INCEPTION_WEIGHTS=$PWD/fid_inception.npz   # or --inception_weights

then::

  python -m diffusion_jax.evaluation ref-stats --dataset cifar10 --split train --out cifar10.npz
  python -m diffusion_jax.evaluation fid --workdir W --ref cifar10.npz --num 50000 --steps 100

(the weights file itself is handled by :mod:`diffusion_jax.evaluation.inception_weights`; the
two jobs, reference statistics of a dataset and FID/IS of a trained run, by
:mod:`diffusion_jax.evaluation.scoring`.)
"""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax import _runtime
from diffusion_jax.evaluation.inception_weights import (
    TORCH_WEIGHTS_URL,
    WEIGHTS_ENV,
    convert_torch_file,
    load_inception_variables,
    resolve_inception_weights,
    save_inception_variables,
)
from diffusion_jax.models import inception
from diffusion_jax.train import sharding

__all__ = [
    "TORCH_WEIGHTS_URL",
    "WEIGHTS_ENV",
    "FeatureExtractor",
    "RunningInceptionScore",
    "RunningStatistics",
    "compute_statistics",
    "convert_torch_file",
    "default_num_splits",
    "frechet_distance",
    "inception_score",
    "load_inception_variables",
    "load_statistics",
    "resolve_inception_weights",
    "save_inception_variables",
    "save_statistics",
    "to_unit_rgb",
]


def to_unit_rgb(images: jax.Array) -> jax.Array:
    """uint8 ``[B, H, W, 1 or 3]`` -> float32 RGB ``[B, H, W, 3]`` in [0, 1] (gray repeated),
    what pytorch-fid feeds its network (``ToTensor`` of the image)."""
    x = images.astype(jnp.float32) / 255.0
    return jnp.repeat(x, 3, axis=-1) if x.shape[-1] == 1 else x


@_runtime.jit
def _features(variables: Any, images: jax.Array) -> tuple[jax.Array, jax.Array]:
    out = inception.InceptionV3().apply(variables, to_unit_rgb(images))
    return out["pool"], out["logits_unbiased"]


class FeatureExtractor:
    """Inception pool features and logits of uint8 images, batch by batch over devices.

    Every call runs the same compiled function (batches are padded to ``batch_size``), so the
    network compiles once per image size.

    Args:
      variables: FID Inception variables (:func:`load_inception_variables`).
      batch_size: images per compiled call; rounded up to a multiple of the mesh size.
      mesh: devices to split each batch over (default: every device). With several processes,
        every process must pass the same images.

    Example:
      >>> extract = FeatureExtractor(load_inception_variables(), batch_size=100)
      >>> pool, logits = extract(images)  # uint8 [N, H, W, 3] -> [N, 2048], [N, 1008]
    """

    def __init__(self, variables: Any, *, batch_size: int = 200, mesh=None):
        self.mesh = sharding.make_mesh() if mesh is None else mesh
        self.batch_size = -(-batch_size // self.mesh.size) * self.mesh.size
        self._sharding = sharding.data_sharding(self.mesh)
        self.variables = jax.device_put(variables, sharding.replicated(self.mesh))

    def __call__(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Features of ``images``.

        Args:
          images: uint8 ``[N, H, W, C]`` with C = 3 (RGB) or 1 (grayscale, repeated to RGB).

        Returns:
          ``(pool float32 [N, 2048], logits float32 [N, 1008])``; the logits are without the
          classifier's bias, as :func:`inception_score` expects.
        """
        images = np.asarray(images)
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3):
            raise ValueError(
                f"images must be uint8 [N, H, W, 1 or 3], got {images.dtype} {images.shape}."
            )
        pools, logits = [], []
        for start in range(0, len(images), self.batch_size):
            chunk = images[start : start + self.batch_size]
            padded = np.zeros((self.batch_size, *images.shape[1:]), np.uint8)
            padded[: len(chunk)] = chunk
            batch = jax.make_array_from_callback(
                padded.shape, self._sharding, lambda index, a=padded: a[index]
            )
            pool, logit = _features(self.variables, batch)
            pools.append(sharding.to_host(pool)[: len(chunk)])
            logits.append(sharding.to_host(logit)[: len(chunk)])
        if not pools:
            return np.zeros((0, inception.FEATURE_DIM), np.float32), np.zeros(
                (0, inception.NUM_LOGITS), np.float32
            )
        return np.concatenate(pools), np.concatenate(logits)


def compute_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance (unbiased, as pytorch-fid) of features, in float64.

    Args:
      features: ``[N, D]`` with N >= 2.

    Returns:
      ``(mu float64 [D], sigma float64 [D, D])``.
    """
    features = np.asarray(features, np.float64)
    if features.ndim != 2 or len(features) < 2:
        raise ValueError(f"features must be [N >= 2, D], got {features.shape=}.")
    return features.mean(axis=0), np.cov(features, rowvar=False)


class RunningStatistics:
    """Mean and covariance of features that arrive in batches, in float64, in memory
    independent of their number (``O(D^2)``: 32 MB for D = 2048).

    Batches are merged with Chan et al.'s pairwise update of the mean and of the centred sum
    of outer products ``M2`` (no ``E[x x^T] - mu mu^T`` cancellation), so the result equals
    :func:`compute_statistics` of all the features at once up to float64 rounding.

    Example:
      >>> running = RunningStatistics(2048)
      >>> for pool in batches_of_features:  # doctest: +SKIP
      ...     running.update(pool)
      >>> mu, sigma = running.statistics()  # as compute_statistics(np.concatenate(...))
    """

    def __init__(self, dim: int):
        self.count = 0
        self.mean = np.zeros(dim, np.float64)  # [D]
        self.m2 = np.zeros((dim, dim), np.float64)  # [D, D] sum of (x - mean)(x - mean)^T

    def update(self, features: np.ndarray) -> None:
        """Folds a batch ``[n, D]`` (any n >= 0) into the running sums."""
        features = np.asarray(features, np.float64)
        if features.ndim != 2 or features.shape[1] != self.mean.shape[0]:
            raise ValueError(f"features must be [n, {self.mean.shape[0]}], got {features.shape}.")
        n = len(features)
        if n == 0:
            return
        batch_mean = features.mean(axis=0)
        centred = features - batch_mean
        delta = batch_mean - self.mean
        total = self.count + n
        self.m2 += centred.T @ centred + np.outer(delta, delta) * (self.count * n / total)
        self.mean += delta * (n / total)
        self.count = total

    def statistics(self) -> tuple[np.ndarray, np.ndarray]:
        """``(mu float64 [D], sigma float64 [D, D])``, the covariance unbiased (as pytorch-fid).

        Raises:
          ValueError: fewer than 2 features seen.
        """
        if self.count < 2:
            raise ValueError(f"need >= 2 features for a covariance, got {self.count}.")
        return self.mean.copy(), self.m2 / (self.count - 1)


class RunningInceptionScore:
    """The Inception Score of :func:`inception_score` over logits that arrive in order, without
    keeping them: ``O(num_splits x K)`` memory.

    Split ``s`` holds the same consecutive samples as ``np.array_split(range(num),
    num_splits)``. Per split it keeps ``sum_x sum_y p(y|x) log p(y|x)`` and ``sum_x p(y|x)``;
    then ``E_x KL(p(y|x) || p(y)) = E_x[sum_y p log p] - sum_y p(y) log p(y)`` with
    ``p(y) = E_x p(y|x)``, the same quantity :func:`inception_score` computes directly.

    Args:
      num: the number of samples that will be fed (fixes the splits).
      num_splits: as :func:`inception_score`.
      num_classes: K, the logits' width.

    Example:
      >>> score = RunningInceptionScore(50_000, 10)
      >>> for logits in batches_of_logits:  # doctest: +SKIP
      ...     score.update(logits)
      >>> mean, std = score.result()
    """

    def __init__(self, num: int, num_splits: int = 10, num_classes: int = inception.NUM_LOGITS):
        if not 1 <= num_splits <= num:
            raise ValueError(f"need 1 <= num_splits <= num: {num=}, {num_splits=}")
        self.num = num
        sizes = [len(part) for part in np.array_split(np.arange(num), num_splits)]
        self.split_ends = np.cumsum(sizes)  # [S] one past each split's last index
        self.sizes = np.asarray(sizes, np.float64)  # [S]
        self.neg_entropy = np.zeros(num_splits, np.float64)  # [S] sum_x sum_y p log p
        self.prob_sum = np.zeros((num_splits, num_classes), np.float64)  # [S, K] sum_x p(y|x)
        self.seen = 0

    def update(self, logits: np.ndarray) -> None:
        """Folds the logits ``[n, K]`` of the next ``n`` samples in."""
        logits = np.asarray(logits, np.float64)
        if logits.ndim != 2 or logits.shape[1] != self.prob_sum.shape[1]:
            raise ValueError(f"logits must be [n, {self.prob_sum.shape[1]}], got {logits.shape}.")
        if self.seen + len(logits) > self.num:
            raise ValueError(f"more than the {self.num} samples announced.")
        log_p = logits - logits.max(axis=1, keepdims=True)
        log_p -= np.log(np.exp(log_p).sum(axis=1, keepdims=True))
        probs = np.exp(log_p)
        splits = np.searchsorted(self.split_ends, self.seen + np.arange(len(logits)), "right")
        np.add.at(self.neg_entropy, splits, (probs * log_p).sum(axis=1))
        np.add.at(self.prob_sum, splits, probs)
        self.seen += len(logits)

    def result(self) -> tuple[float, float]:
        """``(mean, std)`` of the score over the splits, as :func:`inception_score`.

        Raises:
          ValueError: fewer samples seen than announced.
        """
        if self.seen != self.num:
            raise ValueError(f"saw {self.seen} samples of the {self.num} announced.")
        marginal = self.prob_sum / self.sizes[:, None]
        # 0 log 0 = 0 for classes no sample of a split predicts.
        marginal_neg_entropy = (marginal * np.log(np.where(marginal > 0, marginal, 1.0))).sum(1)
        scores = np.exp(self.neg_entropy / self.sizes - marginal_neg_entropy)
        return float(np.mean(scores)), float(np.std(scores))


def frechet_distance(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray
) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2), in float64.

    ``|mu1 - mu2|^2 + tr(sigma1) + tr(sigma2) - 2 tr((sigma1 sigma2)^(1/2))``. The trace of the
    matrix square root is ``sum(sqrt(eig(A sigma2 A)))`` with ``A = sigma1^(1/2)`` (symmetric
    eigendecompositions: real and stable for the singular covariances of N < D samples),
    rather than ``scipy.linalg.sqrtm`` of the non-symmetric product.

    Args:
      mu1, mu2: means ``[D]``.
      sigma1, sigma2: covariances ``[D, D]`` (symmetric positive semi-definite).

    Returns:
      The distance (>= 0 up to rounding), a Python float.
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    dim = mu1.shape[0]
    for name, value, shape in (
        ("mu2", mu2, (dim,)),
        ("sigma1", sigma1, (dim, dim)),
        ("sigma2", sigma2, (dim, dim)),
    ):
        if value.shape != shape:
            raise ValueError(f"{name} must have shape {shape}, got {value.shape}.")
    eigenvalues, eigenvectors = np.linalg.eigh((sigma1 + sigma1.T) / 2)
    sqrt_sigma1 = (eigenvectors * np.sqrt(np.clip(eigenvalues, 0, None))) @ eigenvectors.T
    product = sqrt_sigma1 @ sigma2 @ sqrt_sigma1
    trace_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh((product + product.T) / 2), 0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_sqrt)


def inception_score(logits: np.ndarray, num_splits: int = 10) -> tuple[float, float]:
    """Inception Score ``exp(E_x KL(p(y|x) || p(y)))``, mean and std over splits, in float64.

    Args:
      logits: ``[N, K]`` classifier logits (:class:`FeatureExtractor` returns them without the
        bias, over K = 1008, as Salimans et al.'s code).
      num_splits: the samples are cut into this many consecutive splits (10 in the papers).

    Returns:
      ``(mean, std)`` over the splits. It lies in [1, K]: 1 when every prediction is the same,
      K when each is certain and the classes are used equally.
    """
    logits = np.asarray(logits, np.float64)
    if logits.ndim != 2 or not 1 <= num_splits <= len(logits):
        raise ValueError(
            f"need logits [N, K] and 1 <= num_splits <= N: {logits.shape=}, {num_splits=}"
        )
    log_p = logits - logits.max(axis=1, keepdims=True)
    log_p -= np.log(np.exp(log_p).sum(axis=1, keepdims=True))
    scores = []
    for part in np.array_split(log_p, num_splits):
        top = part.max(axis=0)  # log p(y) without underflow for classes no sample predicts
        log_marginal = top + np.log(np.exp(part - top).mean(axis=0))
        kl = (np.exp(part) * (part - log_marginal)).sum(axis=1)
        scores.append(np.exp(kl.mean()))
    return float(np.mean(scores)), float(np.std(scores))


def default_num_splits(num: int) -> int:
    """The Inception Score's number of splits for ``num`` samples."""
    # The papers' 10 splits (of 5000 samples each); one per 100 samples below 1000 samples, as
    # the score of a split of a few samples says little.
    return max(1, min(10, num // 100))


def save_statistics(path: str, mu: np.ndarray, sigma: np.ndarray, **meta: Any) -> str:
    """Writes ``mu``, ``sigma`` (pytorch-fid's keys) and scalar metadata to ``path`` (.npz)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "wb") as file:
        np.savez(file, mu=mu, sigma=sigma, **{k: np.asarray(v) for k, v in meta.items()})
    return path


def _first_line(error: Exception) -> str:
    text = (str(error).strip().splitlines() or [""])[0]
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def load_statistics(path: str) -> tuple[np.ndarray, np.ndarray]:
    """Reads ``(mu [2048], sigma [2048, 2048])`` from ours, pytorch-fid's or TTUR's ``.npz``.

    Raises:
      FileNotFoundError: no such file.
      ValueError: the file is not such an ``.npz`` (one line naming it).
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"Reference statistics {path!r} not found: make them with "
            "`python -m diffusion_jax.evaluation ref-stats --dataset NAME --out FILE`."
        )
    try:
        with np.load(path, allow_pickle=False) as npz:
            if not {"mu", "sigma"} <= set(npz.files):
                raise ValueError(f"it holds {sorted(npz.files)[:5]}, not 'mu' and 'sigma'")
            mu, sigma = npz["mu"].astype(np.float64), npz["sigma"].astype(np.float64)
    except Exception as error:  # not a zip, truncated, pickled, ...: one line naming the file
        raise ValueError(
            f"Reference statistics {path!r} are not a readable statistics .npz "
            f"({_first_line(error)}); make them with "
            "`python -m diffusion_jax.evaluation ref-stats --dataset NAME --out FILE`."
        ) from None
    dim = inception.FEATURE_DIM
    if mu.shape != (dim,) or sigma.shape != (dim, dim):
        raise ValueError(
            f"{path}: need mu [{dim}] and sigma [{dim}, {dim}], got {mu.shape}, {sigma.shape}."
        )
    return mu, sigma
