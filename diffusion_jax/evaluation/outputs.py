"""Where the command lines write: checked before the work that fills it, creating nothing.

Sampling, FID statistics and figures can take minutes to hours; an ``--out`` that cannot be
written should fail at once, not after the work. These checks only look: the output folder is
created when something is written, so a mistyped path leaves no directory behind.
"""

from __future__ import annotations

import os

from diffusion_jax.options import ArgumentError

__all__ = ["check_writable"]


def _refuse(argument: str, path: str, reason: str) -> ArgumentError:
    return ArgumentError(argument, "{name} {path}: {reason}", path=path, reason=reason)


def check_writable(path: str, argument: str = "out", *, directory: bool = False) -> str:
    """Checks that ``path`` (a file, or with ``directory`` a folder) could be written.

    Nothing is created. The nearest existing ancestor must be a writable directory, and an
    existing ``path`` must be of the right kind.

    Args:
      path: the output file or folder.
      argument: the argument's name, for the error (a CLI renders it as its flag).
      directory: ``path`` is a folder to write files into.

    Returns:
      ``path`` made absolute.

    Raises:
      ArgumentError: about ``argument``, saying why ``path`` cannot be written.
    """
    path = os.path.abspath(os.path.expanduser(os.fspath(path)))
    if os.path.exists(path):
        if directory and not os.path.isdir(path):
            raise _refuse(argument, path, "exists and is not a directory.")
        if not directory and os.path.isdir(path):
            raise _refuse(argument, path, "is a directory, not a file.")
        folder = path if directory else os.path.dirname(path)
    else:
        folder = os.path.dirname(path)
        while not os.path.exists(folder):
            folder = os.path.dirname(folder)
        if not os.path.isdir(folder):
            raise _refuse(argument, path, f"cannot be created: {folder} is a file.")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise _refuse(argument, path, f"cannot be written: {folder} is not writable.")
    return path
