"""One writer per workdir: an exclusive lock on ``workdir/.lock`` for the length of a run.

Two trainers writing one workdir would interleave ``metrics.jsonl``, race on checkpoint steps
and truncate each other's records on resumption. So a trainer takes this lock before it reads
or writes anything in the workdir, and a second one is refused with an error naming the holder.
Readers (``sample.py``, evaluation, plots) take no lock. With several processes
(``jax.distributed``) only process 0 takes it.

**Why ``fcntl.flock``** and not a file created with ``O_CREAT | O_EXCL``: the kernel releases a
``flock`` when its holder dies, however it dies (SIGKILL, the OOM killer, a crash), so a killed
run never leaves a stale lock to clean up, and no heuristic (is that pid alive? was the pid
reused?) can break a live lock by mistake. The lock file itself stays behind; it holds the
holder's JSON ``{"host", "pid", "started"}`` for the refusal message, and an empty file means
nobody holds it. On network filesystems ``flock`` is as reliable as the filesystem's locking
(NFSv4 locks are server-side; some older mounts lock per host only); where a filesystem has no
locks at all, the run goes on with a warning.

Example:
  >>> with WorkdirLock(workdir):
  ...     ...  # train
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import json
import logging
import os
import socket

import jax

from diffusion_jax.train import sharding

__all__ = ["LOCK_FILE", "WorkdirLock", "WorkdirLockedError", "read_holder"]

LOCK_FILE = ".lock"


class WorkdirLockedError(RuntimeError):
    """Another live process holds the workdir's lock; the message names its host and pid.

    Attributes:
      holder: the holder's ``{"host", "pid", "started"}`` (empty if it could not be read).
    """

    def __init__(self, workdir: str, holder: dict):
        self.holder = holder
        who = (
            f"process {holder.get('pid')} on host {holder.get('host')} (started "
            f"{holder.get('started')})"
            if holder
            else "another process (named in process 0's error)"
        )
        super().__init__(
            f"{workdir} is being trained by {who}: one writer per workdir. Wait for it to "
            "finish or stop it (a resumed run continues from its last checkpoint), or use "
            "another workdir."
        )


def read_holder(workdir: str) -> dict:
    """The JSON the lock's holder wrote (empty when unlocked or unreadable)."""
    try:
        with open(os.path.join(workdir, LOCK_FILE)) as f:
            holder = json.loads(f.read() or "{}")
    except (OSError, ValueError):
        return {}
    return holder if isinstance(holder, dict) else {}


class WorkdirLock:
    """Holds ``workdir/.lock`` exclusively from :meth:`acquire` (or ``with``) to :meth:`release`.

    Args:
      workdir: the run's directory (it must exist).
      enabled: whether this process takes the lock (default: process 0 only). With several
        processes every one must call :meth:`acquire`: they all learn process 0's outcome,
        so that all of them stop when it is refused.
    """

    def __init__(self, workdir: str, *, enabled: bool | None = None):
        self.workdir = workdir
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self._fd: int | None = None

    def acquire(self) -> None:
        """Takes the lock without waiting and records this process in it.

        Raises:
          WorkdirLockedError: another process holds it (on every process of the run).
        """
        refused = None
        if self.enabled and self._fd is None:
            try:
                self._take()
            except WorkdirLockedError as err:
                refused = err
        if not sharding.broadcast_from_process_0(refused is None):
            raise refused or WorkdirLockedError(self.workdir, {})
        if refused is not None:
            raise refused

    def _take(self) -> None:
        fd = os.open(os.path.join(self.workdir, LOCK_FILE), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise WorkdirLockedError(self.workdir, read_holder(self.workdir)) from None
        except OSError as err:  # a filesystem without locks: train, but say it is unguarded
            if err.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                os.close(fd)
                raise
            logging.warning(
                "Cannot lock %s (%s): nothing stops a second writer.", self.workdir, err
            )
        holder = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(holder).encode(), 0)
        self._fd = fd

    def release(self) -> None:
        """Empties the lock file and lets it go (the file stays: removing it would let a
        waiting opener lock a deleted file while a third process locks a new one)."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            os.ftruncate(fd, 0)
        finally:
            os.close(fd)  # closing the descriptor drops the flock

    def __enter__(self) -> WorkdirLock:
        self.acquire()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()
