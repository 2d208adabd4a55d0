"""The FID Inception's weights: where the converted file is, how to read, write and make it.

The weights are pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth``, converted once (with
torch) to an ``.npz`` of the Flax port's variables; nothing is downloaded at run time. The file
is named by the ``inception_weights`` argument (``--inception_weights`` on the command line) or
by ``$DIFFUSION_JAX_INCEPTION_WEIGHTS``.
"""

from __future__ import annotations

import hashlib
import os
import sys
from typing import Any

import jax
import numpy as np
from flax import traverse_util

from diffusion_jax.models import inception

__all__ = [
    "TORCH_WEIGHTS_URL",
    "WEIGHTS_ENV",
    "convert_torch_file",
    "load_inception_variables",
    "resolve_inception_weights",
    "save_inception_variables",
]

WEIGHTS_ENV = "DIFFUSION_JAX_INCEPTION_WEIGHTS"
"""Environment variable naming the converted weights file (an explicit path wins)."""

TORCH_WEIGHTS_URL = (
    "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
    "pt_inception-2015-12-05-6726825d.pth"
)
"""pytorch-fid's FID Inception weights (TF's 2015-12-05 graph), the source of ours."""

_TORCH_WEIGHTS_SHA256_PREFIX = "6726825d"  # pytorch-fid's file name carries it
_META = "meta/"  # npz keys that are not variables


def _weights_help() -> str:
    return (
        "The FID Inception weights are pytorch-fid's, converted once to .npz (nothing is "
        f"downloaded at run time). On a machine with internet, download\n  {TORCH_WEIGHTS_URL}\n"
        "then, with torch installed (pip install -e '.[compare]'), convert it:\n"
        "  python -m diffusion_jax.evaluation convert-inception "
        "--pth pt_inception-2015-12-05-6726825d.pth --out fid_inception.npz\n"
        "and pass that file as inception_weights (--inception_weights on the command line) or "
        f"set {WEIGHTS_ENV}."
    )


def resolve_inception_weights(path: str | os.PathLike | None = None) -> str:
    """The converted weights file: ``path``, else ``$DIFFUSION_JAX_INCEPTION_WEIGHTS``.

    Raises:
      FileNotFoundError: neither given, or the file does not exist; the message says how to
        produce it.
    """
    source = "inception_weights" if path else f"${WEIGHTS_ENV}"
    path = path or os.environ.get(WEIGHTS_ENV)
    if not path:
        raise FileNotFoundError(f"No Inception weights given.\n{_weights_help()}")
    path = os.path.expanduser(os.fspath(path))
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"Inception weights {path!r} ({source}) not found.\n{_weights_help()}"
        )
    return path


def save_inception_variables(variables: Any, path: str, *, source_sha256: str = "") -> str:
    """Writes FID Inception variables to an ``.npz`` (keys like ``params/Mixed_5b/...``)."""
    flat = traverse_util.flatten_dict(jax.device_get(variables), sep="/")
    arrays = {key: np.asarray(value, np.float32) for key, value in flat.items()}
    arrays[_META + "source_sha256"] = np.array(source_sha256)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "wb") as file:
        np.savez(file, **arrays)
    return path


def load_inception_variables(path: str | os.PathLike | None = None) -> dict[str, Any]:
    """Reads converted FID Inception weights (see :func:`resolve_inception_weights`).

    Returns:
      ``{"params": ..., "batch_stats": ...}`` of float32 NumPy arrays.

    Raises:
      FileNotFoundError: no weights file (the message says how to make one).
      ValueError: the file is not a converted FID Inception.
    """
    path = resolve_inception_weights(path)
    try:
        with np.load(path, allow_pickle=False) as npz:
            flat = {tuple(k.split("/")): npz[k] for k in npz.files if not k.startswith(_META)}
    except Exception as error:  # not a zip, truncated, pickled, ...: one line naming the file
        text = (str(error).strip().splitlines() or [""])[0]
        raise ValueError(
            f"Inception weights {path!r} are not a readable .npz ({type(error).__name__}: "
            f"{text}); convert pytorch-fid's weights with `python -m diffusion_jax.evaluation "
            "convert-inception` (see --help)."
        ) from None
    expected = inception.variable_shapes()
    if {k: v.shape for k, v in flat.items()} != expected:
        missing = sorted("/".join(k) for k in expected.keys() - flat.keys())
        wrong = sorted("/".join(k) for k in flat if expected.get(k) != flat[k].shape)
        raise ValueError(
            f"{path} is not a converted FID Inception: missing={missing[:5]} "
            f"unexpected or wrong shapes={wrong[:5]}.\n{_weights_help()}"
        )
    return traverse_util.unflatten_dict(flat)


def convert_torch_file(pth: str, out: str) -> str:
    """Converts pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth`` to our ``.npz``.

    Needs torch (``torch.load(..., weights_only=True)``; no code in the file is run). Warns
    when the file's SHA-256 does not start with pytorch-fid's ``6726825d``.

    Returns:
      ``out``.
    """
    import torch

    with open(pth, "rb") as file:
        digest = hashlib.sha256(file.read()).hexdigest()
    if not digest.startswith(_TORCH_WEIGHTS_SHA256_PREFIX):
        print(
            f"warning: {pth} has SHA-256 {digest[:8]}..., not pytorch-fid's "
            f"{_TORCH_WEIGHTS_SHA256_PREFIX}...: FIDs will not be comparable to published ones.",
            file=sys.stderr,
        )
    state_dict = torch.load(pth, map_location="cpu", weights_only=True)
    variables = inception.convert_torch_weights(state_dict)
    return save_inception_variables(variables, out, source_sha256=digest)
