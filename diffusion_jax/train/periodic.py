"""When periodic work is due: one rule for logging, evaluation, checkpoints and sample grids.

The loop asks :func:`itstime` after each optimiser step, so every "every N steps" setting of
the config (where 0 means never) is read the same way.

Example:
  >>> [step for step in range(1, 11) if itstime(step, 4, 10, last=True)]
  [4, 8, 10]
  >>> [step for step in range(1, 11) if itstime(step, 0, 10, last=True)]
  []
"""

from __future__ import annotations

__all__ = ["itstime"]


def itstime(
    step: int, every_n_steps: int, total_steps: int, *, first: bool = False, last: bool = False
) -> bool:
    """Whether work done every ``every_n_steps`` is due once ``step`` steps are done.

    Args:
      step: optimiser steps done so far (1 after the first step).
      every_n_steps: the period; 0 means never (``first`` and ``last`` included).
      total_steps: the run's length.
      first: also due after the first step of the run (``step == 1``).
      last: also due after the last step (``step == total_steps``), whatever the period.

    Returns:
      True when ``step`` is a multiple of ``every_n_steps``, or is the first (last) step and
      ``first`` (``last``) is set; always False when ``every_n_steps`` is 0.
    """
    if every_n_steps < 0:
        raise ValueError(f"every_n_steps must be >= 0 (0 means never), got {every_n_steps=}.")
    if not every_n_steps:
        return False
    return step % every_n_steps == 0 or (first and step == 1) or (last and step == total_steps)
