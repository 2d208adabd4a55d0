"""The table of ``benchmarks/quality_per_minute.py``'s results: rows grouped by recipe,
sampler, budget and sample size, each figure's mean and seed spread, and real digits' own
scores beside them (``quality_per_minute.py --table`` prints it).
"""

from __future__ import annotations

import json
import statistics
from typing import Any

from diffusion_jax.data import digits
from diffusion_jax.evaluation import digits_check

# The Frechet distance is also scored on the first this-many samples: the real digits' floor
# (all 1,500 train digits against the held-out ones) is known exactly only at this size.
CEILING_SAMPLES = 1500

# Figures aggregated over seeds by :func:`aggregate`.
FIGURES = ("steps", "steps_per_s", "recognisable", "classes", "frechet_pca", "frechet_pca_1500")


def read_rows(path: str) -> list[dict[str, Any]]:
    """The rows of a results file."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def aggregate(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows grouped by (recipe, sampler, minutes, num_samples), in first-seen order; per group
    the seeds and, for each of :data:`FIGURES`, the mean and the spread (max - min over seeds,
    0 for one seed; None when no row has the figure).

    Example:
      >>> aggregate([{"recipe": "a", "sampler": "ddim:50", "minutes": 5, "num_samples": 500,
      ...             "seed": s, "frechet_pca": f} for s, f in ((0, 1.0), (1, 3.0))])[0][
      ...     "frechet_pca"]
      (2.0, 2.0)
    """
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for row in rows:
        key = (row["recipe"], row["sampler"], row["minutes"], row["num_samples"])
        groups.setdefault(key, []).append(row)
    out = []
    for (recipe, sampler, minutes, num), members in groups.items():
        entry: dict[str, Any] = {
            "recipe": recipe,
            "sampler": sampler,
            "minutes": minutes,
            "num_samples": num,
            "seeds": sorted(r["seed"] for r in members),
        }
        for figure in FIGURES:
            values = [r[figure] for r in members if r.get(figure) is not None]
            entry[figure] = (
                (statistics.fmean(values), max(values) - min(values)) if values else None
            )
        out.append(entry)
    return out


def ceiling(num_samples: int, seeds: list[int]) -> dict[str, Any]:
    """Real digits' own scores: the check on the held-out (test) digits, and the Frechet
    distance of ``num_samples`` real train digits per seed (mean, spread) against them. There
    are only :data:`CEILING_SAMPLES` train digits: for a larger ``num_samples`` the Frechet
    figure is None and ``frechet_pca_1500`` is that of all of them (no spread: every seed
    draws the same set)."""
    images, _ = digits.load_digits_uint8()
    report = digits_check.digits_report(images[digits.split_indices()["test"]])
    top: dict[str, Any] = {
        "recognisable": report["recognisable_fraction"],
        "classes": report["classes_present"],
        "frechet_pca": None,
        "frechet_pca_1500": None,
    }
    if num_samples <= CEILING_SAMPLES:
        floors = [digits_check.digits_frechet_floor(num_samples, seed=s) for s in seeds]
        top["frechet_pca"] = (statistics.fmean(floors), max(floors) - min(floors))
    else:
        top["frechet_pca_1500"] = (digits_check.digits_frechet_floor(CEILING_SAMPLES), 0.0)
    return top


def _cell(value, fmt: str) -> str:
    if value is None:
        return "-"
    mean, spread = value
    return f"{format(mean, fmt)} ({format(spread, fmt)})"


def table(rows: list[dict[str, Any]]) -> str:
    """The markdown table of a results file: each cell the mean over seeds and, in brackets,
    the seed spread (max - min); one row of real digits' scores per sample size."""
    lines = [
        "Each cell: mean over seeds (spread = max - min over seeds).",
        "",
        "| recipe | sampler | samples | minutes | seeds | steps | steps/s | recognisable | "
        "classes | Frechet (PCA) | Frechet, first 1500 | load (1 min) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for entry in aggregate(rows):
        group = (entry["recipe"], entry["sampler"], entry["minutes"], entry["num_samples"])
        members = [
            r for r in rows if (r["recipe"], r["sampler"], r["minutes"], r["num_samples"]) == group
        ]
        loads = [r.get("load_before") for r in members if r.get("load_before") is not None]
        load = f"{max(loads):.1f}" if loads else "-"
        lines.append(
            f"| {entry['recipe']} | {entry['sampler']} | {entry['num_samples']} | "
            f"{entry['minutes']:g} | {len(entry['seeds'])} | {_cell(entry['steps'], '.0f')} | "
            f"{_cell(entry['steps_per_s'], '.1f')} | {_cell(entry['recognisable'], '.2f')} | "
            f"{_cell(entry['classes'], '.1f')} | {_cell(entry['frechet_pca'], '.3f')} | "
            f"{_cell(entry['frechet_pca_1500'], '.3f')} | {load} |"
        )
    sizes = sorted({r["num_samples"] for r in rows})
    seeds = sorted({r["seed"] for r in rows}) or [0]
    for num in sizes:
        top = ceiling(num, seeds)
        real = f"{num} train" if num <= CEILING_SAMPLES else f"all {CEILING_SAMPLES} train"
        lines.append(
            f"| real digits (ceiling; check on the 297 held-out, Frechet of {real}) | - | "
            f"{num} | - | {len(seeds)} | - | - | {top['recognisable']:.2f} | {top['classes']} | "
            f"{_cell(top['frechet_pca'], '.3f')} | {_cell(top['frechet_pca_1500'], '.3f')} | - |"
        )
    return "\n".join(lines)
