"""Digits trained the DDPM way (configs/digits.py) and the EDM way (configs/digits_edm.py) for
the same budget, each sampled at 10, 20 and 35 model evaluations by every sampler.

Budget: ``--budget_steps N`` trains each run N optimiser steps; ``--budget_seconds S`` trains
each for S seconds of wall time (compilation included): ``train.py`` runs with
``train.num_steps = --max_steps`` (the learning-rate schedule's length) and is sent SIGTERM at
S seconds, on which it saves its checkpoint and exits (status 143). The two runs train one
after the other, never together, so each has the machine to itself (as far as the machine is
quiet: the script records the load average before and after each run).

Each run is sampled with ``ddim``, ``dpm_solver++``, ``euler`` (N steps = N evaluations) and
``heun`` (N steps = 2N - 1 evaluations, so the largest N within the budget) from the EMA
parameters, 100 samples (``--num_samples``) with one seed, and scored with the digits check
(:func:`diffusion_jax.evaluation.digits_check.digits_report`: recognisable share, classes
present) and the Frechet distance to the held-out digits in PCA space
(:func:`~diffusion_jax.evaluation.digits_check.digits_frechet_distance`; lower is better; the
floor of real digits at the same N is printed). A run's best method at an evaluation budget is
the one with the lowest distance.

Run from the repository root (benchmarks/README.md has the figures):
  python benchmarks/edm_vs_ddpm.py --budget_seconds 600 --out /tmp/edm_vs_ddpm
  python benchmarks/edm_vs_ddpm.py --budget_steps 3000 --out /tmp/edm_vs_ddpm_steps
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np

from diffusion_jax.evaluation import digits_check, sampling

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = {"ddpm": "configs/digits.py", "edm": "configs/digits_edm.py"}
METHODS = ("ddim", "dpm_solver++", "euler", "heun")


def steps_for(method: str, evaluations: int) -> int:
    """The sampler steps that use at most ``evaluations`` model evaluations."""
    return (evaluations + 1) // 2 if method == "heun" else evaluations


def evaluations_of(method: str, steps: int) -> int:
    """Model evaluations of ``steps`` steps (Heun's last step is Euler's)."""
    return 2 * steps - 1 if method == "heun" else steps


def train(name: str, workdir: str, args: argparse.Namespace) -> dict:
    """Trains one run in a ``train.py`` process within the budget; returns what it did."""
    num_steps = args.budget_steps or args.max_steps
    command = [
        sys.executable,
        os.path.join(REPO, "train.py"),
        f"--config={os.path.join(REPO, CONFIGS[name])}",
        f"--workdir={workdir}",
        f"--config.train.num_steps={num_steps}",
        f"--config.train.checkpoint_every={num_steps}",
        "--config.train.sample_every=0",
        "--config.train.eval_every=0",
        "--config.train.num_samples=0",
        "--config.train.progress_bar=False",
        f"--config.seed={args.seed}",
    ]
    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    with open(os.path.join(os.path.dirname(workdir), f"{name}_train.log"), "w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
        try:
            process.wait(timeout=args.budget_seconds)
        except subprocess.TimeoutExpired:
            process.send_signal(signal.SIGTERM)  # the trainer saves, then exits with 143
            process.wait()
    seconds = time.perf_counter() - start
    if process.returncode not in (0, 128 + signal.SIGTERM):
        raise SystemExit(
            f"train.py for {name} failed (status {process.returncode}); see {log.name}"
        )
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    losses = [r for r in records if "loss" in r]
    return {
        "steps": max(r["step"] for r in records),
        "seconds": round(seconds, 1),
        "final_loss": losses[-1]["loss"] if losses else None,
        "load_before": round(load_before, 2),
        "load_after": round(os.getloadavg()[0], 2),
    }


def score(workdir: str, method: str, steps: int, args: argparse.Namespace) -> dict:
    """Samples a run with one method and scores the samples."""
    out = os.path.join(workdir, "generated", f"{method}_{steps}")
    written = sampling.sample_from_workdir(
        workdir,
        out=out,
        num=args.num_samples,
        method=method,
        steps=steps,
        seed=args.seed,
        progress=False,
    )
    with np.load(written["npz"]) as npz:
        images = npz["images"]
    report = digits_check.digits_report(images)
    return {
        "method": method,
        "steps": steps,
        "evaluations": evaluations_of(method, steps),
        "recognisable": report["recognisable_fraction"],
        "classes": report["classes_present"],
        "frechet_pca": digits_check.digits_frechet_distance(images),
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    budget = parser.add_mutually_exclusive_group(required=True)
    budget.add_argument("--budget_steps", type=int, help="optimiser steps per run")
    budget.add_argument("--budget_seconds", type=float, help="wall seconds of training per run")
    parser.add_argument("--max_steps", type=int, default=20_000, help="lr schedule length")
    parser.add_argument("--out", required=True, help="directory for the two workdirs")
    parser.add_argument("--evaluations", default="10,20,35", help="model-evaluation budgets")
    parser.add_argument("--num_samples", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args(argv)
    budgets = [int(b) for b in args.evaluations.split(",")]
    os.makedirs(args.out, exist_ok=True)

    results = {"args": vars(args), "runs": {}}
    for name in CONFIGS:
        workdir = os.path.join(os.path.abspath(args.out), name)
        run = {"training": train(name, workdir, args), "samples": []}
        print(f"{name}: {run['training']}", flush=True)
        for evaluations in budgets:
            for method in METHODS:
                row = score(workdir, method, steps_for(method, evaluations), args)
                row["budget"] = evaluations
                run["samples"].append(row)
                print(f"  {row}", flush=True)
        results["runs"][name] = run
    results["floor_frechet_pca"] = digits_check.digits_frechet_floor(args.num_samples)

    print()
    print(
        "| training | steps in budget | evaluations | best method (steps) | recognisable | "
        "classes | Frechet (PCA) |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name, run in results["runs"].items():
        for evaluations in budgets:
            rows = [r for r in run["samples"] if r["budget"] == evaluations]
            best = min(rows, key=lambda r: r["frechet_pca"])
            print(
                f"| {name} | {run['training']['steps']} | {best['evaluations']} | "
                f"{best['method']} ({best['steps']}) | {best['recognisable']:.0%} | "
                f"{best['classes']} | {best['frechet_pca']:.3f} |"
            )
    print(
        f"\nreal digits ({args.num_samples}) against the held-out ones: "
        f"Frechet (PCA) {results['floor_frechet_pca']:.3f}"
    )
    print("\nall methods (recognisable / Frechet):")
    for name, run in results["runs"].items():
        for row in run["samples"]:
            print(
                f"  {name:4s} {row['method']:12s} steps {row['steps']:3d} evals "
                f"{row['evaluations']:3d}: {row['recognisable']:.0%} / {row['frechet_pca']:.3f}"
            )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
