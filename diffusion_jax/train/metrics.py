"""Where training metrics go: ``metrics.jsonl`` and TensorBoard event files (tensorboardX).

Only process 0 writes; other processes get a writer that drops everything.
"""

from __future__ import annotations

import json
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
        self._file = None
        self._tb = None
        if enabled:
            os.makedirs(workdir, exist_ok=True)
            self._file = open(os.path.join(workdir, METRICS_FILE), "a")
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

    def write(self, step: int, values: Mapping[str, Any]) -> None:
        """Writes one record ``{"step": step, **values}``."""
        if not self.enabled:
            return
        record = {"step": int(step), **{k: _clean(v) for k, v in values.items()}}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        for key, value in record.items():
            if key != "step" and isinstance(value, float | int):
                self._tb.add_scalar(key, value, int(step))

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
