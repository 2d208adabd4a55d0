"""Batches read and placed on the devices by a background thread while the step runs.

:class:`DevicePrefetcher` wraps the data iterator: a thread reads the next host batches, turns
each into global device arrays (``sharding.global_batch``) and queues them, at most ``size``
ahead, so the step never waits for the input pipeline or the host-to-device copy (on 2 CPU
cores the two overlap with XLA's own threads; on a GPU or TPU it is what keeps the device fed).

Its checkpointable position is that of the last batch the loop CONSUMED, not the last one read
ahead: each queued batch carries the iterator's state just after it was read, and
:meth:`DevicePrefetcher.get_state` returns the state of the batch last handed out. A run
resumed from that state continues with the very batch an uninterrupted run would have stepped
on next; the batches still in the queue are simply read again.

Example (the shape of the training loop)::

  with DevicePrefetcher(train_iter, lambda b: sharding.global_batch(b, mesh), size=2) as batches:
      for step in range(num_steps):
          state, out = train_step(state, next(batches))
          if step % checkpoint_every == 0:
              save(state, data_state=batches.get_state())
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Iterator
from typing import Any, Protocol

__all__ = ["CheckpointableIterator", "DevicePrefetcher"]

# How often a producer blocked on a full queue (or a consumer on an empty one) looks up to see
# whether it should give up: only then, so it costs nothing in the steady state.
_POLL_SECONDS = 0.05


class CheckpointableIterator(Protocol):
    """What the prefetcher needs of the data iterator (``data.BatchIterator`` is one)."""

    def __next__(self) -> Any: ...

    def get_state(self) -> Any: ...


class _End:
    """Queued after the last batch of a finite iterator."""


class _Failed:
    """Queued when reading or placing a batch raised: the consumer re-raises ``error``."""

    def __init__(self, error: BaseException):
        self.error = error


class DevicePrefetcher(Iterator[Any]):
    """An iterator over ``place(batch)`` for the batches of ``iterator``, read ahead.

    With ``size >= 1`` a daemon thread reads and places up to ``size`` batches ahead of the
    consumer (so at most ``size + 2`` placed batches exist at once: the queue's, the one being
    placed and the one the step is using). With ``size = 0`` everything happens in
    ``__next__``, in the caller's thread, with the same state semantics.

    An exception raised by ``iterator`` or ``place`` is raised by the ``__next__`` that would
    have returned that batch (the batches before it are handed out first), and the thread ends.
    :meth:`close` (or leaving the ``with`` block, whatever the reason) stops the thread and
    waits for it; it is idempotent.

    Args:
      iterator: the host iterator; from the moment the prefetcher is built, only the prefetcher
        may call it (``set_state`` to resume must come before).
      place: host batch -> device batch, called in the thread (e.g. ``sharding.global_batch``).
      size: how many placed batches may wait in the queue; 0 turns read-ahead off.
      join_timeout: seconds :meth:`close` waits for the thread (a read may be slow) before
        leaving it, a daemon, to end on its own.

    Raises:
      ValueError: ``size`` is negative.
    """

    def __init__(
        self,
        iterator: CheckpointableIterator,
        place: Callable[[Any], Any],
        size: int = 2,
        *,
        join_timeout: float = 10.0,
    ):
        if size < 0:
            raise ValueError(f"The prefetch size must be >= 0 (0: no read-ahead), got {size=}.")
        self._iterator = iterator
        self._place = place
        self.size = size
        self._join_timeout = join_timeout
        self._state = iterator.get_state()  # the position before the first batch handed out
        self._queue: queue.Queue = queue.Queue(maxsize=max(size, 1))
        self._stop = threading.Event()
        self._finished = False  # the end or an error has been handed to the consumer
        self._thread: threading.Thread | None = None
        if size:
            self._thread = threading.Thread(
                target=self._produce, name="diffusion_jax-prefetch", daemon=True
            )
            self._thread.start()

    def _read_one(self) -> tuple[Any, Any]:
        batch = next(self._iterator)
        return self._place(batch), self._iterator.get_state()

    def _produce(self) -> None:
        """The thread: read, place, queue; until the end, an error or :meth:`close`."""
        try:
            while not self._stop.is_set():
                if not self._offer(self._read_one()):
                    return
        except StopIteration:
            self._offer(_End())
        except BaseException as error:  # handed to the consumer, who raises it
            self._offer(_Failed(error))

    def _offer(self, item: Any) -> bool:
        """Queues ``item``, waiting for room; False if :meth:`close` was called meanwhile."""
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=_POLL_SECONDS)
                return True
            except queue.Full:
                continue
        return False

    def __iter__(self) -> DevicePrefetcher:
        return self

    def __next__(self) -> Any:
        """The next placed batch (waiting for it if the thread is behind).

        Raises:
          StopIteration: the iterator is exhausted (or the prefetcher closed).
          Exception: whatever reading or placing this batch raised.
        """
        if self._finished or self._stop.is_set():
            raise StopIteration
        if self._thread is None:
            try:
                batch, self._state = self._read_one()
            except BaseException:
                self._finished = True
                raise
            return batch
        while True:
            try:
                item = self._queue.get(timeout=_POLL_SECONDS)
                break
            except queue.Empty:
                if not self._thread.is_alive() and self._queue.empty():
                    self._finished = True  # closed from another thread
                    raise StopIteration from None
        if isinstance(item, _End | _Failed):
            self._finished = True
            self.close()
            if isinstance(item, _Failed):
                raise item.error
            raise StopIteration
        batch, self._state = item
        return batch

    def get_state(self) -> Any:
        """The iterator's state just after the last batch handed out by ``__next__`` (before
        any is handed out: its state when the prefetcher was built). Restoring it into the
        iterator resumes with the next batch to be consumed, whatever was read ahead."""
        return self._state

    def close(self) -> None:
        """Stops the thread and waits up to ``join_timeout`` seconds for it; drops the batches
        read ahead. Safe to call more than once and from ``__exit__`` after an error."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(self._join_timeout)
            if self._thread.is_alive():
                logging.warning(
                    "The prefetch thread is still reading after %.0f s; leaving it to end.",
                    self._join_timeout,
                )
        while True:  # release the placed batches now rather than with the prefetcher
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break

    @property
    def running(self) -> bool:
        """Whether the background thread is alive."""
        return self._thread is not None and self._thread.is_alive()

    def __enter__(self) -> DevicePrefetcher:
        return self

    def __exit__(self, *exc_info: object) -> bool:
        self.close()
        return False
