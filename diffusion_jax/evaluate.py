"""Judging a trained model: its likelihood bound, FID/IS, and how its samples look.

Command line (``python -m diffusion_jax.evaluate CMD``):

- ``nll --workdir DIR [--split test]``: the variational bound in bits/dim, all T terms
  (:mod:`diffusion_jax.likelihood`), printed and written as JSON into the workdir.
- ``ref-stats --dataset NAME --out STATS.npz`` and ``fid --workdir DIR --ref STATS.npz``:
  Inception statistics and FID/IS (:mod:`diffusion_jax.fid`; the Inception weights are a file
  you supply), and ``convert-inception`` to produce that file from pytorch-fid's weights.
- ``digits --samples F.npz``: a classifier trained on the real digits (the train split of the
  offline ``digits`` dataset) labels generated 8x8 digits. A sample counts as recognisable when
  the classifier is confident *and* the sample lies as close to some real digit as real
  held-out digits do (a linear classifier alone is confidently wrong on noise). Good samples
  are mostly recognisable and cover all ten classes. It is the quick check of the demo.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np

from diffusion_jax.likelihood import (
    Run,
    format_nll,
    nll_from_workdir,
    nll_of_source,
    restore_run,
)

__all__ = [
    "DIGITS_CONFIDENCE",
    "Run",
    "digits_classifier",
    "digits_report",
    "format_nll",
    "main",
    "nll_from_workdir",
    "nll_of_source",
    "restore_run",
]

NEAR_QUANTILE = 0.95  # "near the data": within this quantile of held-out digits' distances

DIGITS_CONFIDENCE = 0.8  # a sample counts as recognisable when the classifier is this sure


@functools.lru_cache(maxsize=1)
def digits_classifier():
    """A probabilistic classifier of 8x8 uint8 digit images, fitted on the ``train`` split.

    Returns:
      A fitted scikit-learn pipeline taking ``[N, 64]`` pixels in [0, 1].
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from diffusion_jax.data import digits

    images, labels = digits.load_digits_uint8()
    train = digits.split_indices()["train"]
    features = images[train].reshape(len(train), -1).astype(np.float64) / 255.0
    model = make_pipeline(StandardScaler(), LogisticRegression(C=0.5, max_iter=2000))
    return model.fit(features, labels[train])


@functools.lru_cache(maxsize=1)
def _digits_neighbours() -> tuple[Any, float]:
    """A nearest-neighbour index of the train digits and the distance below which a sample is
    as close to the data as :data:`NEAR_QUANTILE` of the held-out test digits are."""
    from sklearn.neighbors import NearestNeighbors

    from diffusion_jax.data import digits

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


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: ``python -m diffusion_jax.evaluate {nll,digits,ref-stats,fid,...} ...``."""
    parser = argparse.ArgumentParser(prog="python -m diffusion_jax.evaluate")
    sub = parser.add_subparsers(dest="command", required=True)
    nll_parser = sub.add_parser("nll", help="variational bound in bits/dim of a checkpoint")
    nll_parser.add_argument("--workdir", required=True, help="the training run's directory")
    nll_parser.add_argument("--split", default="test", help="dataset split to score")
    nll_parser.add_argument("--num", type=int, default=None, help="first N examples (all)")
    nll_parser.add_argument("--batch_size", type=int, default=64)
    nll_parser.add_argument("--params", choices=("ema", "raw"), default="ema")
    nll_parser.add_argument("--checkpoint_step", type=int, default=None, help="default: newest")
    nll_parser.add_argument("--seed", type=int, default=0)
    nll_parser.add_argument(
        "--clip_x0",
        choices=("config", "on", "off"),
        default="config",
        help="clip the predicted x0 to [-1, 1] in each term (default: as the config says)",
    )
    nll_parser.add_argument("--data_dir", default=None, help="TFDS data_dir (default: config's)")
    digits_parser = sub.add_parser("digits", help="classifier check of generated 8x8 digits")
    digits_parser.add_argument("--samples", required=True, help="samples.npz from sample.py")
    digits_parser.add_argument(
        "--min_recognisable", type=float, default=0.0, help="exit 1 below this fraction"
    )
    from diffusion_jax import fid

    fid.add_subcommands(sub)
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is not None:
        return args.func(args)
    if args.command == "nll":
        try:
            result = nll_from_workdir(
                args.workdir,
                split=args.split,
                num=args.num,
                batch_size=args.batch_size,
                which=args.params,
                checkpoint_step=args.checkpoint_step,
                seed=args.seed,
                clip_x0={"config": None, "on": True, "off": False}[args.clip_x0],
                data_dir=args.data_dir,
            )
        except (ValueError, FileNotFoundError) as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
        print(format_nll(result))
        if "json_path" in result:
            print(f"wrote {result['json_path']}")
        return 0
    with np.load(args.samples) as npz:
        report = digits_report(npz["images"])
    print(json.dumps(report))
    print(
        f"{report['recognisable_fraction']:.0%} of {report['num']} samples recognisable "
        f"(classifier >= {DIGITS_CONFIDENCE:.0%} sure and near a real digit); "
        f"classes present: {report['classes_present']}/10"
    )
    return 0 if report["recognisable_fraction"] >= args.min_recognisable else 1


if __name__ == "__main__":
    sys.exit(main())
