"""The quick check of generated 8x8 digits (the demo's judge).

A classifier trained on the real digits (the train split of the offline ``digits`` dataset)
labels generated digits. A sample counts as recognisable when the classifier is confident *and*
the sample lies as close to some real digit as real held-out digits do (a linear classifier
alone is confidently wrong on noise). Good samples are mostly recognisable and cover all ten
classes.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.neighbors import NearestNeighbors
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from diffusion_jax.data import digits

__all__ = ["DIGITS_CONFIDENCE", "NEAR_QUANTILE", "digits_classifier", "digits_report"]

NEAR_QUANTILE = 0.95  # "near the data": within this quantile of held-out digits' distances

DIGITS_CONFIDENCE = 0.8  # a sample counts as recognisable when the classifier is this sure


@functools.lru_cache(maxsize=1)
def digits_classifier():
    """A probabilistic classifier of 8x8 uint8 digit images, fitted on the ``train`` split.

    Returns:
      A fitted scikit-learn pipeline taking ``[N, 64]`` pixels in [0, 1].
    """
    images, labels = digits.load_digits_uint8()
    train = digits.split_indices()["train"]
    features = images[train].reshape(len(train), -1).astype(np.float64) / 255.0
    model = make_pipeline(StandardScaler(), LogisticRegression(C=0.5, max_iter=2000))
    return model.fit(features, labels[train])


@functools.lru_cache(maxsize=1)
def _digits_neighbours() -> tuple[Any, float]:
    """A nearest-neighbour index of the train digits and the distance below which a sample is
    as close to the data as :data:`NEAR_QUANTILE` of the held-out test digits are."""
    images, _ = digits.load_digits_uint8()
    split = digits.split_indices()
    flat = images.reshape(len(images), -1).astype(np.float64) / 255.0
    index = NearestNeighbors(n_neighbors=1).fit(flat[split["train"]])
    distances, _ = index.kneighbors(flat[split["test"]])
    return index, float(np.quantile(distances[:, 0], NEAR_QUANTILE))


def digits_report(images: np.ndarray, confidence: float = DIGITS_CONFIDENCE) -> dict[str, Any]:
    """How recognisable generated digits are.

    Args:
      images: uint8 ``[N, 8, 8, 1]`` (or ``[N, 8, 8]``) samples.
      confidence: the probability above which a sample counts as confidently labelled.

    Returns:
      ``{"num", "confident_fraction" (classifier sure), "near_fraction" (as close to a real
      digit as held-out digits are), "recognisable_fraction" (both), "mean_confidence",
      "class_counts" (recognisable samples per class 0..9), "classes_present"}``.
    """
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.shape[1:3] != (8, 8):
        raise ValueError(f"images must be uint8 [N, 8, 8(, 1)], got {images.dtype} {images.shape}.")
    features = images.reshape(len(images), -1).astype(np.float64) / 255.0
    probs = digits_classifier().predict_proba(features)
    best, label = probs.max(axis=1), probs.argmax(axis=1)
    confident = best >= confidence
    index, radius = _digits_neighbours()
    near = index.kneighbors(features)[0][:, 0] <= radius
    recognisable = confident & near
    counts = np.bincount(label[recognisable], minlength=10)
    return {
        "num": len(images),
        "confident_fraction": float(confident.mean()),
        "near_fraction": float(near.mean()),
        "recognisable_fraction": float(recognisable.mean()),
        "mean_confidence": float(best.mean()),
        "class_counts": counts.tolist(),
        "classes_present": int((counts > 0).sum()),
    }
