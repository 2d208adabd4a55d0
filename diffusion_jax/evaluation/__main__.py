"""Judging a trained model: its likelihood bound, FID/IS, and how its samples look.

Command line (``python -m diffusion_jax.evaluation CMD``):

- ``nll --workdir DIR [--split test]``: the variational bound in bits/dim (nats/dim for 2-D
  data), all T terms
  (:mod:`diffusion_jax.evaluation.likelihood`), printed and written as JSON into the workdir.
- ``ref-stats --dataset NAME --out STATS.npz`` and ``fid --workdir DIR --ref STATS.npz``:
  Inception statistics and FID/IS (:mod:`diffusion_jax.evaluation.fid`; the Inception weights
  are a file you supply), and ``convert-inception`` to produce that file from pytorch-fid's
  weights.
- ``digits --samples F.npz``: the classifier check of generated 8x8 digits
  (:mod:`diffusion_jax.evaluation.digits_check`), the quick check of the demo.

A request the library refuses exits with status 2 and one ``error: ...`` line on stderr that
names the flag to change.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

import numpy as np

from diffusion_jax import _runtime
from diffusion_jax.evaluation.digits_check import DIGITS_CONFIDENCE, digits_report
from diffusion_jax.evaluation.inception_weights import WEIGHTS_ENV, convert_torch_file
from diffusion_jax.evaluation.likelihood import format_nll, nll_from_workdir
from diffusion_jax.evaluation.outputs import check_writable
from diffusion_jax.evaluation.scoring import fid_from_workdir, ref_stats
from diffusion_jax.options import ArgumentError
from diffusion_jax.train.checkpoint import CheckpointError

FLAGS = {
    "which": "--params",
    "batch_size": "--batch_size",
    "checkpoint_step": "--checkpoint_step",
    "eta": "--eta",
    "guidance": "--guidance",
    "inception_weights": "--inception_weights",
    "method": "--method",
    "num": "--num",
    "out": "--out",
    "split": "--split",
    "steps": "--steps",
}
"""The library's argument names -> the flags of this command line, for error messages."""


def _run(job, args: argparse.Namespace) -> int:
    """``job(args)``'s exit code (None: 0), or 2 with ``error: <message>`` on stderr (no
    traceback) when the library refuses the request; an :class:`ArgumentError` names the flag."""
    try:
        return job(args) or 0
    except ArgumentError as err:
        print(f"error: {err.for_flags(FLAGS)}", file=sys.stderr)
    except (ValueError, FileNotFoundError, CheckpointError) as err:
        print(f"error: {err}", file=sys.stderr)
    return 2


def _nll(args: argparse.Namespace) -> None:
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
    print(format_nll(result))
    if "json_path" in result:
        print(f"wrote {result['json_path']}")


def _digits(args: argparse.Namespace) -> int:
    with np.load(args.samples) as npz:
        if "images" not in npz:
            raise ValueError(
                f"{args.samples} holds no 'images' (sample.py writes them for images)."
            )
        report = digits_report(npz["images"])
    print(json.dumps(report))
    print(
        f"{report['recognisable_fraction']:.0%} of {report['num']} samples recognisable "
        f"(classifier >= {DIGITS_CONFIDENCE:.0%} sure and near a real digit); "
        f"classes present: {report['classes_present']}/10"
    )
    return 0 if report["recognisable_fraction"] >= args.min_recognisable else 1


def _ref_stats(args: argparse.Namespace) -> None:
    report = ref_stats(
        args.dataset,
        args.split,
        args.out,
        args.inception_weights,
        args.data_dir,
        args.num,
        image_size=args.image_size,
        batch_size=args.batch_size,
    )
    print(json.dumps(report))
    print(
        f"wrote {report['out']}: statistics of {report['num']} images of "
        f"{args.dataset}:{args.split} (their IS {report['inception_score']:.2f})"
    )


def _fid(args: argparse.Namespace) -> None:
    result = fid_from_workdir(
        args.workdir,
        args.ref,
        num=args.num,
        batch_size=args.batch_size,
        method=args.method,
        steps=args.steps,
        eta=args.eta,
        timestep_spacing=args.timestep_spacing,
        seed=args.seed,
        which=args.params,
        checkpoint_step=args.checkpoint_step,
        guidance=args.guidance,
        inception_weights=args.inception_weights,
        inception_batch_size=args.inception_batch_size,
        samples_dir=args.samples_dir,
    )
    print(json.dumps(result))
    print(
        f"FID {result['fid']:.3f}  IS {result['inception_score']:.3f} "
        f"+- {result['inception_score_std']:.3f}  ({result['num']} samples, "
        f"{args.params} params, {args.method} {result['steps']} steps)"
    )


def _convert(args: argparse.Namespace) -> None:
    check_writable(args.out, "out")
    print(f"wrote {convert_torch_file(args.pth, args.out)}")


def _add_weights_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--inception_weights",
        default=None,
        help=f"converted FID Inception weights (.npz); default ${WEIGHTS_ENV}",
    )


def build_parser() -> argparse.ArgumentParser:
    """The command line's parser; each subcommand's ``job`` default is its handler."""
    parser = argparse.ArgumentParser(prog="python -m diffusion_jax.evaluation")
    sub = parser.add_subparsers(dest="command", required=True)

    nll = sub.add_parser(
        "nll", help="variational bound of a checkpoint (bits/dim; nats/dim for 2-D data)"
    )
    nll.add_argument("--workdir", required=True, help="the training run's directory")
    nll.add_argument("--split", default="test", help="dataset split to score")
    nll.add_argument("--num", type=int, default=None, help="first N examples (all)")
    nll.add_argument("--batch_size", type=int, default=64)
    nll.add_argument("--params", choices=("ema", "raw"), default="ema")
    nll.add_argument("--checkpoint_step", type=int, default=None, help="default: newest")
    nll.add_argument("--seed", type=int, default=0)
    nll.add_argument(
        "--clip_x0",
        choices=("config", "on", "off"),
        default="config",
        help="clip the predicted x0 to [-1, 1] in each term (default: as the config says)",
    )
    nll.add_argument("--data_dir", default=None, help="TFDS data_dir (default: config's)")
    nll.set_defaults(job=_nll)

    digits = sub.add_parser("digits", help="classifier check of generated 8x8 digits")
    digits.add_argument("--samples", required=True, help="samples.npz from sample.py")
    digits.add_argument(
        "--min_recognisable", type=float, default=0.0, help="exit 1 below this fraction"
    )
    digits.set_defaults(job=_digits)

    ref = sub.add_parser("ref-stats", help="FID reference statistics of a dataset split")
    ref.add_argument("--dataset", required=True, help="dataset name, e.g. cifar10")
    ref.add_argument("--split", default="train")
    ref.add_argument("--out", required=True, help="statistics .npz to write")
    ref.add_argument("--data_dir", default=None, help="TFDS data directory")
    ref.add_argument("--num", type=int, default=None, help="first N examples (default: all)")
    ref.add_argument("--image_size", type=int, default=None, help="resize + centre-crop first")
    ref.add_argument("--batch_size", type=int, default=200, help="images per Inception call")
    _add_weights_flag(ref)
    ref.set_defaults(job=_ref_stats)

    fid = sub.add_parser("fid", help="sample a checkpoint and report FID and IS")
    fid.add_argument("--workdir", required=True, help="training workdir with checkpoints/")
    fid.add_argument("--ref", required=True, help="reference statistics .npz (ref-stats)")
    fid.add_argument("--num", type=int, default=50_000, help="number of samples")
    fid.add_argument("--batch_size", type=int, default=None, help="samples per sampler call")
    fid.add_argument("--method", default="ddim", help="ddpm | ddim | dpm_solver++ | heun | euler")
    fid.add_argument("--steps", type=int, default=50, help="sampler steps")
    fid.add_argument("--eta", type=float, default=0.0, help="DDIM stochasticity")
    fid.add_argument(
        "--timestep_spacing",
        default="linspace",
        help="timesteps of a shortened run: linspace | leading | trailing | quadratic",
    )
    fid.add_argument(
        "--samples_dir", default=None, help="also keep the samples, one .npz shard per batch"
    )
    fid.add_argument("--seed", type=int, default=0)
    fid.add_argument("--params", choices=("ema", "raw"), default="ema")
    fid.add_argument("--checkpoint_step", type=int, default=None)
    fid.add_argument("--guidance", type=float, default=None, help="classifier-free guidance")
    fid.add_argument("--inception_batch_size", type=int, default=200)
    _add_weights_flag(fid)
    fid.set_defaults(job=_fid)

    convert = sub.add_parser(
        "convert-inception", help="convert pytorch-fid's Inception .pth to our .npz (needs torch)"
    )
    convert.add_argument("--pth", required=True, help="pt_inception-2015-12-05-6726825d.pth")
    convert.add_argument("--out", required=True, help=".npz to write")
    convert.set_defaults(job=_convert)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: ``python -m diffusion_jax.evaluation {nll,digits,ref-stats,fid,...} ...``."""
    args = build_parser().parse_args(argv)
    return _run(args.job, args)


if __name__ == "__main__":
    # As train.py's: compiled samplers are reused across runs (DIFFUSION_JAX_COMPILATION_CACHE).
    _runtime.use_compilation_cache()
    sys.exit(main())
