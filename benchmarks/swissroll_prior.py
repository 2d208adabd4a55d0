"""Swiss roll with the literal DDPM betas at T = 200 against betas scaled to T: energy distance.

Each run is a workdir trained with ``configs/swissroll.py`` and sampled with ``sample.py``
(``W/gen/samples.npz``). Each sample set is compared with a fresh draw of as many swiss-roll
points by the energy distance (Szekely & Rizzo): ``2 E|X - Y| - E|X - X'| - E|Y - Y'|``, the
within-set terms as U-statistics (i != j), so it is about 0 for two draws of one distribution.
Two fresh draws give the noise floor. Finer figures go with it: the median distance from a
sample to its nearest data point (how closely samples hug the roll: fidelity), the share of
samples farther than 0.1 from every data point (strays; 0.1 is the roll's own noise), and the
median distance from a data point to its nearest sample (how well samples cover the roll).
The schedules' alpha_bar_T and prior term are printed with them.

Run from the repository root (benchmarks/README.md has the commands and the figures):
  python benchmarks/swissroll_prior.py literal=/tmp/sw_old_s0,/tmp/sw_old_s1 \
      scaled=/tmp/sw_new_s0,/tmp/sw_new_s1
"""

from __future__ import annotations

import argparse
import os
import warnings

import numpy as np
from scipy import spatial

from diffusion_jax import schedules
from diffusion_jax.data import toy

SCHEDULE_OF_LABEL = {"literal": False, "scaled": True}  # scale_to_num_timesteps


def energy_distance(x: np.ndarray, y: np.ndarray) -> float:
    """Energy distance between point sets ``x`` [N, D] and ``y`` [M, D] (float64)."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)

    def mean_distance(a, b, exclude_diagonal):
        distances = np.sqrt(np.sum((a[:, None, :] - b[None, :, :]) ** 2, axis=-1))
        if exclude_diagonal:
            return np.sum(distances) / (len(a) * (len(a) - 1))
        return np.mean(distances)

    return float(
        2.0 * mean_distance(x, y, False) - mean_distance(x, x, True) - mean_distance(y, y, True)
    )


STRAY_DISTANCE = 0.1  # the swiss roll's noise (1.0 before the division by 10 in data/toy.py)


def nearest_distances(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Distance from each point of ``x`` to its nearest point of ``y``."""
    return spatial.cKDTree(y).query(x)[0]


def figures(samples: np.ndarray, data: np.ndarray) -> tuple[float, float, float, float]:
    """(energy distance, median sample -> data distance, % strays, median data -> sample)."""
    to_data = nearest_distances(samples, data)
    return (
        energy_distance(samples, data),
        float(np.median(to_data)),
        100.0 * float(np.mean(to_data > STRAY_DISTANCE)),
        float(np.median(nearest_distances(data, samples))),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="label=workdir[,workdir...]")
    parser.add_argument("--num_timesteps", type=int, default=200)
    args = parser.parse_args()

    # Seed 10_000 + i: fresh points, never the training split's (its seed is fixed in toy.py).
    def fresh(i, n):
        return toy.sample_toy("swissroll", n, np.random.default_rng(10_000 + i))[0]

    reference = fresh(0, 10_000)
    data_scale = float(np.sqrt(np.mean(reference.astype(np.float64) ** 2)))
    print(f"swiss roll: RMS of a coordinate {data_scale:.3f}")
    for label, scaled in SCHEDULE_OF_LABEL.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            schedule = schedules.get_schedule(
                "linear", args.num_timesteps, scale_to_num_timesteps=scaled
            )
        print(
            f"{label:>8}: alpha_bar_T {float(schedule.alphas_cumprod[-1]):.3g}, L_T "
            f"{schedules.prior_bpd(schedule, data_scale):.3g} bits/dim at this data scale"
        )

    def row(label, where, values):
        print(f"{label:<8} {where:<24} " + " ".join(f"{v:>15.4f}" for v in values))

    columns = ("energy distance", "sample->data", "% strays", "data->sample")
    print(f"\n{'run':<8} {'workdir':<24} " + " ".join(f"{c:>15}" for c in columns))
    floors = [figures(fresh(2 * i + 1, 2000), fresh(2 * i + 2, 2000)) for i in range(3)]
    row("data", "(two fresh draws, mean)", np.mean(floors, axis=0))
    for run in args.runs:
        label, workdirs = run.split("=", 1)
        values = []
        for i, workdir in enumerate(workdirs.split(",")):
            samples = np.load(os.path.join(workdir, "gen", "samples.npz"))["x"]
            values.append(figures(samples, fresh(100 + i, len(samples))))
            row(label, workdir, values[-1])
        row(label, "mean", np.mean(values, axis=0))


if __name__ == "__main__":
    main()
