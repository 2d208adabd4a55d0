"""Preemption: SIGTERM or Ctrl-C asks the loop to checkpoint and stop after the current step.

The loop then raises :class:`Preempted` (after the checkpoint is written), so that a stopped
run is never mistaken for a finished one; ``train.py`` exits with ``128 + signal`` (143 for
SIGTERM, 130 for Ctrl-C), the status a shell or a scheduler expects of a signalled job.

Example (the shape of the training loop)::

  with StopFlag() as stop:
      while step < num_steps:
          ...  # one step
          if stop.signal:
              ...  # save a checkpoint
              break
"""

from __future__ import annotations

import signal

__all__ = ["Preempted", "StopFlag"]


class Preempted(Exception):  # a stop asked for, not an error: hence no "Error" suffix
    """The run stopped on a signal after saving its checkpoint; running again resumes it.

    Attributes:
      signum: the signal received (``signal.SIGTERM``, ``signal.SIGINT``).
      step: the step of the checkpoint saved before stopping.
      exit_status: ``128 + signum``, the conventional status of a process stopped by it.
    """

    def __init__(self, signum: int, step: int):
        self.signum, self.step = int(signum), int(step)
        self.exit_status = 128 + self.signum
        name = signal.Signals(self.signum).name
        super().__init__(f"{name}: checkpoint saved at step {step}; stopped (run again to resume).")


class StopFlag:
    """Turns SIGTERM/SIGINT into a request to stop, read from :attr:`signal` between steps.

    A second Ctrl-C raises ``KeyboardInterrupt`` at once. Outside the main thread, where Python
    cannot install handlers, signals are left alone. The previous handlers come back on exit.
    """

    def __init__(self):
        self.signal: int | None = None  # the first signal received, None until then
        self._previous = {}

    def __enter__(self) -> StopFlag:
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def _handle(self, signum, frame):
        if self.signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C means now
        self.signal = signum

    def __exit__(self, *exc_info: object) -> bool:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        return False
