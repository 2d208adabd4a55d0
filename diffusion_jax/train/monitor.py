"""What the loop watches between log lines: throughput, the mean loss, non-finite updates.

The step skips an update whose loss or gradient is not finite (``optax.apply_if_finite``) and
counts the consecutive skips; the loop stops the run with :class:`NonFiniteError` once they
reach ``train.max_nonfinite_steps``. :class:`LogWindow` reads each step's counter one step
late, so that on an accelerator the host never waits for the step it has just dispatched.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping

import jax
import numpy as np

__all__ = ["LogWindow", "NonFiniteError", "check_nonfinite"]


class NonFiniteError(RuntimeError):
    """Raised when too many consecutive updates had a non-finite loss or gradient."""


def check_nonfinite(out: Mapping[str, jax.Array], limit: int, step: int) -> None:
    """Raises :class:`NonFiniteError` if ``out["nonfinite_consecutive"]`` (the step's count of
    consecutive skipped updates) has reached ``limit`` (``train.max_nonfinite_steps``)."""
    consecutive = int(jax.device_get(out["nonfinite_consecutive"]))
    if consecutive >= limit:
        raise NonFiniteError(
            f"{consecutive} consecutive steps up to step {step} had a non-finite loss or "
            f"gradient; their updates were skipped and the parameters are unchanged since. "
            f"Stopping (train.max_nonfinite_steps = {limit}). Lower the learning rate, check "
            "the data, or use float32 compute."
        )


class LogWindow:
    """The steps since the last log line: their losses, their pace, their non-finite counters.

    Args:
      step: the step the window starts after (the run's step when the loop starts).
      batch_size: the global batch, to turn steps/s into images/s.
      max_nonfinite_steps: the limit of :func:`check_nonfinite`.
      clock: seconds, monotonic (a fake one in tests).

    Example:
      >>> window = LogWindow(step=0, batch_size=64, max_nonfinite_steps=20)
      >>> for step in range(1, 51):
      ...     state, out = train_step(state, batch)
      ...     window.add(step, out)
      >>> values = window.flush()  # out's values, loss_mean, steps_per_sec, images_per_sec
    """

    def __init__(
        self,
        step: int,
        batch_size: int,
        max_nonfinite_steps: int,
        *,
        clock: Callable[[], float] = time.perf_counter,
    ):
        self.batch_size = batch_size
        self.max_nonfinite_steps = max_nonfinite_steps
        self._clock = clock
        self._start_step, self._start_time = step, clock()
        self._losses: list[jax.Array] = []
        self._step: int | None = None  # the last step added
        self._out: Mapping[str, jax.Array] | None = None  # its scalar metrics

    def add(self, step: int, out: Mapping[str, jax.Array]) -> None:
        """Records the scalar metrics ``out`` of ``step``, and checks the previous step's
        non-finite counter (raising :class:`NonFiniteError` at the limit)."""
        self._losses.append(out["loss"])
        if self._out is not None:
            check_nonfinite(self._out, self.max_nonfinite_steps, self._step)
        self._step, self._out = step, out

    def flush(self) -> dict[str, float]:
        """The values of a log line at the last step added, and a new window from there.

        Checks that step's non-finite counter first. Returns its metrics as floats, then
        ``loss_mean`` (over the window), ``steps_per_sec`` and ``images_per_sec``.
        """
        if self._out is None:
            raise ValueError("LogWindow.flush() needs at least one step added first.")
        check_nonfinite(self._out, self.max_nonfinite_steps, self._step)
        now = self._clock()
        rate = (self._step - self._start_step) / max(now - self._start_time, 1e-9)
        values = {k: float(v) for k, v in jax.device_get(self._out).items()}
        values["loss_mean"] = float(np.mean(jax.device_get(self._losses)))
        values.update(steps_per_sec=rate, images_per_sec=rate * self.batch_size)
        self._start_step, self._start_time, self._losses = self._step, self._clock(), []
        return values
