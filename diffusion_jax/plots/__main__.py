"""Command line: ``python -m diffusion_jax.plots NAME --out FILE.png`` with NAME one of

- ``schedules``: beta_t, alphas_cumprod and log-SNR of every schedule;
- ``noising [--dataset digits]``: one dataset image noised at several t under each schedule
  (``--dataset synthetic`` draws a built-in test picture instead);
- ``trajectory --workdir DIR [--method ddim --steps 50 --num 8]``: a checkpoint's reverse
  process from noise to sample, the predicted x0 beside each x_t (2-D data: scatter plots);
- ``loss --workdir DIR``: the training curves of ``metrics.jsonl``;
- ``samples --workdir DIR [--num 64]``: a sample grid (2-D data: samples over the data).

The last three read a training run (:mod:`diffusion_jax.evaluation.figures`). A request the
library refuses exits with status 2 and one ``error: ...`` line on stderr that names the flag.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import numpy as np

from diffusion_jax import _runtime
from diffusion_jax.evaluation.figures import plot_loss, plot_samples, plot_trajectory
from diffusion_jax.evaluation.outputs import check_writable
from diffusion_jax.evaluation.runs import checkpoint_dir
from diffusion_jax.options import ArgumentError
from diffusion_jax.plots.figures import dataset_image, plot_noising, plot_schedules
from diffusion_jax.train.checkpoint import CheckpointError

WORKDIR_FIGURES = ("trajectory", "loss", "samples")

FLAGS = {
    "which": "--params",
    "checkpoint_step": "--checkpoint_step",
    "frames": "--frames",
    "index": "--index",
    "method": "--method",
    "num": "--num",
    "num_timesteps": "--num_timesteps",
    "out": "--out",
    "steps": "--steps",
}
"""The library's argument names -> the flags of this command line, for error messages."""


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry: ``python -m diffusion_jax.plots NAME --out FILE``."""
    parser = argparse.ArgumentParser(
        prog="python -m diffusion_jax.plots",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "name", choices=["schedules", "noising", *WORKDIR_FIGURES], help="which figure"
    )
    parser.add_argument("--out", required=True, help="PNG file to write")
    parser.add_argument("--num_timesteps", type=int, default=1000, help="schedules, noising")
    parser.add_argument(
        "--dataset", default="digits", help="noising: image dataset, or 'synthetic'"
    )
    parser.add_argument("--index", type=int, default=0, help="noising: which train image")
    parser.add_argument("--data_dir", default=None, help="noising: TFDS data_dir")
    parser.add_argument("--workdir", help="trajectory, loss, samples: the training run")
    parser.add_argument("--method", default="ddim", help="trajectory, samples: the sampler")
    parser.add_argument("--steps", type=int, default=50, help="trajectory, samples")
    parser.add_argument(
        "--num",
        type=int,
        default=None,
        help="trajectory: 8 images / 1000 points; samples: 64 / 1000",
    )
    parser.add_argument("--frames", type=int, default=8, help="trajectory: recorded steps")
    parser.add_argument("--seed", type=int, default=0, help="trajectory, samples")
    parser.add_argument("--params", choices=("ema", "raw"), default="ema")
    parser.add_argument("--checkpoint_step", type=int, default=None, help="default: newest")
    args = parser.parse_args(argv)
    if args.name in WORKDIR_FIGURES and not args.workdir:
        parser.error(f"{args.name} needs --workdir")
    try:
        check_writable(args.out, "out")  # before any drawing (a trajectory samples first)
        if args.name in ("trajectory", "samples"):
            checkpoint_dir(args.workdir)
        path = _draw(args)
    except ArgumentError as err:
        print(f"error: {err.for_flags(FLAGS)}", file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError, CheckpointError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0


def _draw(args: argparse.Namespace) -> str:
    """Draws the figure ``args.name`` and returns the path written."""
    sampling = dict(
        method=args.method,
        steps=args.steps,
        seed=args.seed,
        which=args.params,
        checkpoint_step=args.checkpoint_step,
    )
    if args.name == "schedules":
        return plot_schedules(args.out, num_timesteps=args.num_timesteps)
    if args.name == "noising":
        steps = np.linspace(0, args.num_timesteps - 1, 8).round().astype(int).tolist()
        image = None
        if args.dataset != "synthetic":
            image = dataset_image(args.dataset, args.index, data_dir=args.data_dir)
        return plot_noising(
            args.out, image=image, num_timesteps=args.num_timesteps, timesteps=steps
        )
    if args.name == "trajectory":
        return plot_trajectory(args.workdir, args.out, num=args.num, frames=args.frames, **sampling)
    if args.name == "loss":
        return plot_loss(args.workdir, args.out)
    return plot_samples(args.workdir, args.out, num=args.num, **sampling)


if __name__ == "__main__":
    # As train.py's: compiled samplers are reused across runs (DIFFUSION_JAX_COMPILATION_CACHE).
    _runtime.use_compilation_cache()
    sys.exit(main())
