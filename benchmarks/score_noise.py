"""How much of a quality score's spread is the evaluation's own: one model, many sample sets.

Samples ``--num`` digits once from a trained workdir's EMA parameters (DDIM-50, as the demo
and ``quality_per_minute.py`` sample), cuts them into disjoint sets of each ``--sizes`` and
scores every set as the study does (:func:`benchmarks.quality_per_minute.score`: the
recognisable share and the PCA Frechet distance to the held-out digits). The range over the
sets of one size is what the evaluation alone adds to a seed spread at that sample size; the
real digits' Frechet floor is printed beside it (``digits_frechet_floor``, 6 draws per size,
one at 1,500 where all train digits are drawn).

Run from the repository root, on any trained digits workdir:
  .venv/bin/python benchmarks/score_noise.py --workdir /tmp/qpm/default_seed0 --num 6000
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np

from benchmarks import quality_per_minute as qpm
from diffusion_jax.evaluation import digits_check, sampling


def chunk_scores(images: np.ndarray, size: int) -> dict[str, list[float]]:
    """The recognisable share and Frechet distance of each disjoint ``size``-set of
    ``images`` (a remainder shorter than ``size`` is left out)."""
    sets = [images[i : i + size] for i in range(0, len(images) - size + 1, size)]
    scored = [qpm.score(s) for s in sets]
    return {
        "recognisable": [s["recognisable"] for s in scored],
        "frechet_pca": [s["frechet_pca"] for s in scored],
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True, help="a trained digits workdir")
    parser.add_argument("--num", type=int, default=6000, help="samples drawn in all")
    parser.add_argument("--sizes", type=int, nargs="+", default=[500, 1500, 3000])
    parser.add_argument("--seed", type=int, default=100)
    args = parser.parse_args(argv)
    if min(args.sizes) < 2 or max(args.sizes) > args.num:
        parser.error("every --sizes value must be >= 2 and <= --num.")
    written = sampling.sample_from_workdir(
        args.workdir,
        out=os.path.join(args.workdir, "generated", "score_noise"),
        num=args.num,
        method="ddim",
        steps=50,
        seed=args.seed,
        progress=False,
    )
    with np.load(written["npz"]) as npz:
        images = npz["images"]
    print("| samples per set | sets | recognisable: min - max | Frechet: min - max | real floor |")
    print("| ---: | ---: | --- | --- | --- |")
    for size in [*args.sizes, args.num]:
        scores = chunk_scores(images, size)
        rec, fre = scores["recognisable"], scores["frechet_pca"]
        draws = 1 if size >= qpm.CEILING_SAMPLES else 6
        floors = (
            [digits_check.digits_frechet_floor(size, seed=s) for s in range(draws)]
            if size <= qpm.CEILING_SAMPLES
            else []
        )
        floor = f"{min(floors):.3f} - {max(floors):.3f}" if floors else "-"
        print(
            f"| {size} | {len(rec)} | {min(rec):.3f} - {max(rec):.3f} | "
            f"{min(fre):.3f} - {max(fre):.3f} | {floor} |"
        )


if __name__ == "__main__":
    main()
