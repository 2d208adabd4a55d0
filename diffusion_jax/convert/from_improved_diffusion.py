"""Import OpenAI's improved-diffusion checkpoints (Nichol & Dhariwal 2021) into a workdir.

``python -m diffusion_jax.convert improved-diffusion --src model.pt --flags "..." --out WORKDIR``
reads a ``model.pt`` written by ``github.com/openai/improved-diffusion`` (a PyTorch state dict)
together with the flags it was trained with, exactly as their scripts take them, and writes a
workdir like a trained run (:func:`diffusion_jax.convert.workdir.write_workdir`) whose config
describes the same network and diffusion. The flags and the config they become are
:mod:`~diffusion_jax.convert.improved_diffusion_flags`; the weights are
:mod:`~diffusion_jax.convert.improved_diffusion_weights`.

What the tests (``tests/test_convert_improved_diffusion.py``) prove, and what they do not:
they enumerate, independently of this package and from a reading of their ``unet.py``, every
key and shape of the state dict for the published CIFAR-10 and ImageNet-64 flag sets (52.5M
and 121M parameters), and check that the mapping uses each key exactly once, that every shape
matches, and that the result has exactly the parameter shapes of our U-Net built from the
converted config; that our betas equal their ``get_named_beta_schedule``'s in float32; and, on
small flag sets with random weights, that our converted U-Net's output equals a float64 NumPy
forward pass of their network (written from their ``unet.py``/``nn.py``, run on their
torch-layout state dict) to 1e-4 of its scale. They do **not** run improved-diffusion's own
code (it is not installable here) or its published weights, so a misreading of their code
shared by the mapping and the reference would go unseen.
"""

from __future__ import annotations

import argparse

from diffusion_jax.convert import workdir
from diffusion_jax.convert.improved_diffusion_flags import build_config, parse_flags
from diffusion_jax.convert.improved_diffusion_weights import convert_state_dict, load_state_dict

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds ``--src``, ``--flags``, ``--dataset`` and ``--out``."""
    parser.add_argument("--src", required=True, help="improved-diffusion checkpoint (model.pt)")
    parser.add_argument(
        "--flags",
        required=True,
        help='their MODEL_FLAGS and DIFFUSION_FLAGS, quoted: "--image_size 32 ..."',
    )
    parser.add_argument(
        "--dataset",
        default=None,
        help="config.data.name of the workdir (default: cifar10 for a 32x32 model, else "
        "'converted'); the bound and FID evaluate on it",
    )
    parser.add_argument("--out", required=True, help="workdir to write")


def run(args: argparse.Namespace) -> str:
    """Converts ``args.src`` with ``args.flags`` into the workdir ``args.out``.

    Returns:
      The workdir written.

    Raises:
      ValueError: bad flags, a config that does not validate, or a mismatched state dict.
    """
    flags = parse_flags(args.flags)
    config = build_config(flags, args.dataset)
    params = convert_state_dict(load_state_dict(args.src), flags)
    source = {
        "format": "improved-diffusion",
        "src": str(args.src),
        "flags": args.flags,
        "null_label": "zeros (never trained)" if flags.class_cond else None,
    }
    return workdir.write_workdir(args.out, config, params, source=source)
