"""Where training metrics go: ``metrics.jsonl`` and TensorBoard event files (tensorboardX).

Only process 0 writes; other processes get a writer that drops everything. ``metrics.jsonl``
is ordered by step with each metric at most once per step, whatever the interruptions: a
resumed run first truncates it to its checkpoint (:func:`truncate_metrics`), and the writer
refuses a record that would go back in time or repeat a metric of its step. A file deleted (or
replaced) during a run is noticed at the next record: the writer warns and starts a new one.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Mapping
from typing import Any

__all__ = ["MetricsWriter", "read_metrics", "truncate_metrics"]

METRICS_FILE = "metrics.jsonl"


def _clean(value: Any) -> Any:
    value = float(value) if hasattr(value, "__float__") else value
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf; keep the fact visible
    return value


def read_metrics(workdir: str) -> list[dict[str, Any]]:
    """All records of ``workdir/metrics.jsonl`` (an empty list when there is none)."""
    path = os.path.join(workdir, METRICS_FILE)
    if not os.path.exists(path):
        return []
    records = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line:
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError:
                    break  # a line cut short by a kill: everything after it is untrustworthy
    return records


def truncate_metrics(workdir: str, last_step: int) -> int:
    """Drops records after ``last_step`` (and any torn last line), so that a resumed run does
    not log a step twice. Returns the number of records kept."""
    path = os.path.join(workdir, METRICS_FILE)
    if not os.path.exists(path):
        return 0
    kept = [r for r in read_metrics(workdir) if r.get("step", 0) <= last_step]
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        for record in kept:
            f.write(json.dumps(record) + "\n")
    os.replace(tmp, path)
    return len(kept)


class MetricsWriter:
    """Appends metric records to ``metrics.jsonl`` and TensorBoard; a no-op when disabled.

    Use it as a context manager, or call :meth:`close` when done.

    Args:
      workdir: the run's directory.
      enabled: False on every process but 0.
    """

    def __init__(self, workdir: str, enabled: bool = True):
        self.enabled = enabled
        self.path = os.path.join(workdir, METRICS_FILE)
        self._file = None
        self._tb = None
        self._last_step: int | None = None  # the step of the last record in the file
        self._last_keys: set[str] = set()  # the metrics recorded at that step
        if enabled:
            os.makedirs(workdir, exist_ok=True)
            for record in read_metrics(workdir):
                step = int(record.get("step", 0))
                if step != self._last_step:
                    self._last_step, self._last_keys = step, set()
                self._last_keys |= set(record) - {"step"}
            self._file = open(self.path, "a")
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

    def _reopen_if_gone(self) -> None:
        """Starts a new file, with a warning, if ours was deleted or replaced since opened."""
        try:
            on_disk = os.stat(self.path)
            ours = os.fstat(self._file.fileno())
            gone = (on_disk.st_ino, on_disk.st_dev) != (ours.st_ino, ours.st_dev)
        except FileNotFoundError:
            gone = True
        if gone:
            logging.warning(
                "%s was deleted or replaced during the run; starting a new one (the records "
                "before step %s are not in it).",
                self.path,
                self._last_step,
            )
            self._file.close()
            self._file = open(self.path, "a")

    def write(self, step: int, values: Mapping[str, Any]) -> None:
        """Writes one record ``{"step": step, **values}``.

        Raises:
          ValueError: ``step`` is older than the last record's, or repeats one of its metrics.
        """
        if not self.enabled:
            return
        step = int(step)
        record = {"step": step, **{k: _clean(v) for k, v in values.items()}}
        if self._last_step is not None and step <= self._last_step:
            repeated = sorted(self._last_keys & set(values))
            if step < self._last_step or repeated:
                raise ValueError(
                    f"{self.path}: a record at step {step} {repeated or ''} after step "
                    f"{self._last_step}; records must follow the steps, each metric once."
                )
        if step != self._last_step:
            self._last_step, self._last_keys = step, set()
        self._last_keys |= set(values)
        self._reopen_if_gone()
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        for key, value in record.items():
            if key != "step" and isinstance(value, float | int):
                self._tb.add_scalar(key, value, int(step))

    def recorded(self, step: int, key: str) -> bool:
        """Whether the last record's ``step`` is ``step`` and ``key`` is among its metrics
        (always False when disabled)."""
        return self.enabled and self._last_step == int(step) and key in self._last_keys

    def flush(self) -> None:
        """Pushes buffered records to disk."""
        if self.enabled:
            self._file.flush()
            self._tb.flush()

    def close(self) -> None:
        """Closes the files."""
        if self.enabled:
            self._file.close()
            self._tb.close()
            self.enabled = False

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
