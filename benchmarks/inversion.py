"""DDIM inversion on digits: how well ``samplers.invert`` + DDIM (eta = 0) give back a real digit.

For each step count N (``--steps``, default 10, 20, 50, 100, 200) the held-out digits (the
``test`` split, first ``--num_images``) are inverted to x_T with N model evaluations and sampled
back with deterministic DDIM over the same grid (``clip_x0=False``, the run's parameterisation,
``--spacing``: ``leading`` by default, since the digits run is an eps model on the cosine
schedule, whose reconstruction from t = T - 1 diverges; see ``samplers.invert``). Printed per
N: the pixel MSE of the round trip in the model's [-1, 1] scale (and the PSNR with a
peak-to-peak of 2), the largest pixel error, the std of the inverted x_T (a standard normal
would give 1), and the seconds of the inversion and the reconstruction (compilation included,
so the first N pays it). For scale, the MSE between the inputs and fresh DDIM samples from the
same number of steps is printed too: what "no memory of the input" costs. ``--t_stop t``
inverts only up to the last visited timestep below t and reconstructs from there (editing
from a partly noised input; the largest N then runs only the steps below t).

The model: ``--workdir`` of a trained run (e.g. the demo's ``out/digits``); if it has no
checkpoint, ``train.py`` first trains ``configs/digits.py`` there for ``--train_steps`` steps.

Run from the repository root (benchmarks/README.md has the figures):
  python benchmarks/inversion.py --workdir /tmp/inversion_digits --train_steps 600
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax import samplers
from diffusion_jax.data import digits
from diffusion_jax.evaluation import runs

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def train_if_needed(workdir: str, train_steps: int, seed: int) -> None:
    """Trains configs/digits.py into ``workdir`` unless it already holds a checkpoint."""
    ckpt_dir = runs.checkpoint_dir(workdir)
    if os.path.isdir(ckpt_dir) and os.listdir(ckpt_dir):
        return
    command = [
        sys.executable,
        os.path.join(REPO, "train.py"),
        f"--config={os.path.join(REPO, 'configs', 'digits.py')}",
        f"--workdir={workdir}",
        f"--config.train.num_steps={train_steps}",
        f"--config.train.checkpoint_every={train_steps}",
        "--config.train.sample_every=0",
        "--config.train.eval_every=0",
        "--config.train.num_samples=0",
        "--config.train.progress_bar=False",
        f"--config.seed={seed}",
    ]
    print(f"training {train_steps} steps into {workdir} ...", flush=True)
    subprocess.run(command, check=True, cwd=REPO)


def held_out_digits(num: int) -> tuple[np.ndarray, np.ndarray]:
    """The first ``num`` test-split digits in [-1, 1], [num, 8, 8, 1], and their labels."""
    images, labels = digits.load_digits_uint8()
    test = digits.split_indices()["test"][:num]
    return images[test].astype(np.float32) / 127.5 - 1.0, labels[test]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True, help="a trained digits run, or where to train")
    parser.add_argument("--train_steps", type=int, default=600)
    parser.add_argument("--num_images", type=int, default=128)
    parser.add_argument("--steps", default="10,20,50,100,200")
    parser.add_argument("--spacing", default="leading")
    parser.add_argument("--which", default="ema", choices=("ema", "raw"))
    parser.add_argument(
        "--t_stop", type=int, default=None, help="invert only below this timestep (editing)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="also write the results as JSON here")
    args = parser.parse_args(argv)

    train_if_needed(args.workdir, args.train_steps, args.seed)
    run = runs.restore_run(args.workdir, which=args.which)
    d = run.config.diffusion
    x0, labels = held_out_digits(args.num_images)
    x0 = jnp.asarray(x0)
    model_kwargs = {"y": jnp.asarray(labels)} if run.config.model.class_conditional else None
    common = dict(
        timestep_spacing=args.spacing,
        parameterization=d.parameterization,
        variance=d.variance,
        model_kwargs=model_kwargs,
    )
    print(
        f"run {args.workdir} step {run.step} ({args.which}); {d.schedule} T={d.num_timesteps}, "
        f"{d.parameterization}; {x0.shape[0]} held-out digits; spacing {args.spacing}; "
        f"t_stop {args.t_stop or d.num_timesteps}; "
        f"load {os.getloadavg()[0]:.1f}"
    )
    header = (
        f"{'steps':>5} {'MSE':>9} {'PSNR dB':>8} {'max err':>8} {'x_T std':>8} "
        f"{'invert s':>9} {'recon s':>8} {'fresh MSE':>10}"
    )
    print(header)
    rows = []
    for num_steps in [int(s) for s in args.steps.split(",")]:
        start = time.perf_counter()
        x_T = samplers.invert(
            run.model_fn, run.params, run.schedule, x0, num_steps=num_steps, t_stop=args.t_stop,
            **common,
        ).block_until_ready()  # fmt: skip
        invert_seconds = time.perf_counter() - start
        start = time.perf_counter()
        back = samplers.sample(
            run.model_fn, run.params, run.schedule, jax.random.key(args.seed), x0.shape,
            method="ddim", num_steps=num_steps, clip_x0=False, x_T=x_T, t_start=args.t_stop,
            **common,
        ).block_until_ready()  # fmt: skip
        recon_seconds = time.perf_counter() - start
        fresh = samplers.sample(
            run.model_fn, run.params, run.schedule, jax.random.key(args.seed), x0.shape,
            method="ddim", num_steps=num_steps, clip_x0=False, **common,
        )  # fmt: skip
        error = np.asarray(back, np.float64) - np.asarray(x0, np.float64)
        mse = float(np.mean(error**2))
        row = {
            "steps": num_steps,
            "mse": mse,
            "psnr_db": float(10.0 * np.log10(4.0 / mse)),
            "max_abs_error": float(np.max(np.abs(error))),
            "x_T_std": float(np.std(np.asarray(x_T))),
            "invert_seconds": round(invert_seconds, 2),
            "reconstruct_seconds": round(recon_seconds, 2),
            "fresh_sample_mse": float(np.mean((np.asarray(fresh) - np.asarray(x0)) ** 2)),
        }
        rows.append(row)
        print(
            f"{num_steps:>5} {mse:>9.2e} {row['psnr_db']:>8.1f} {row['max_abs_error']:>8.3f} "
            f"{row['x_T_std']:>8.3f} {invert_seconds:>9.2f} {recon_seconds:>8.2f} "
            f"{row['fresh_sample_mse']:>10.3f}",
            flush=True,
        )
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"workdir": args.workdir, "step": run.step, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
