"""The device prefetcher: order, bounded read-ahead, the consumed position as its state, errors
raised where the batch is consumed, and a thread that always ends.

The loop's side (a SIGKILLed run with read-ahead resumes bit for bit; SIGTERM leaves no thread)
is in ``test_reliability_train.py``.
"""

from __future__ import annotations

import threading
import time

import jax
import numpy as np
import pytest

from diffusion_jax import data
from diffusion_jax.train import prefetch, sharding


class Counting:
    """An iterator over 0, 1, ..., ``length - 1`` whose state is how many it has yielded; it
    raises ``fail_at`` (an exception) instead of yielding item ``fail_index``."""

    def __init__(self, length=1000, fail_index=None, fail_at=None):
        self.length, self.fail_index, self.fail_at = length, fail_index, fail_at
        self.position = 0
        self.threads = set()

    def __next__(self):
        self.threads.add(threading.current_thread().name)
        if self.position == self.fail_index:
            raise self.fail_at
        if self.position >= self.length:
            raise StopIteration
        self.position += 1
        return self.position - 1

    def get_state(self):
        return {"position": self.position}


def _wait_until(condition, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)


def _prefetch_threads():
    return [t for t in threading.enumerate() if t.name == "diffusion_jax-prefetch" and t.is_alive()]


@pytest.mark.parametrize("size", [0, 1, 3])
def test_order_placement_and_consumed_state(size):
    source = Counting(length=7)
    with prefetch.DevicePrefetcher(source, lambda x: 10 * x, size=size) as batches:
        assert batches.get_state() == {"position": 0}
        for consumed in range(1, 5):
            assert next(batches) == 10 * (consumed - 1)
            # The state is the position after the batches handed out, whatever was read ahead.
            assert batches.get_state() == {"position": consumed}
        assert list(batches) == [40, 50, 60]
        assert batches.get_state() == {"position": 7}
    assert ("MainThread" in source.threads) == (size == 0)


@pytest.mark.parametrize("size", [1, 2])
def test_read_ahead_is_bounded(size):
    source = Counting()
    with prefetch.DevicePrefetcher(source, lambda x: x, size=size) as batches:
        # ``size`` queued, plus one read and waiting for room.
        _wait_until(lambda: source.position == size + 1)
        time.sleep(0.2)  # were it unbounded, it would have read on by now
        assert source.position == size + 1
        next(batches)
        _wait_until(lambda: source.position == size + 2)
        time.sleep(0.2)
        assert source.position == size + 2
        assert batches.get_state() == {"position": 1}
    assert not batches.running


@pytest.mark.parametrize("size", [0, 2])
@pytest.mark.parametrize("where", ["iterator", "place"])
def test_errors_are_raised_in_the_consumer_after_the_batches_before(where, size):
    error = OSError("disk gone")
    if where == "iterator":
        source, place = Counting(fail_index=3, fail_at=error), lambda x: x
    else:
        source = Counting()

        def place(x):
            if x == 3:
                raise error
            return x

    batches = prefetch.DevicePrefetcher(source, place, size=size)
    assert [next(batches) for _ in range(3)] == [0, 1, 2]
    with pytest.raises(OSError, match="disk gone") as raised:
        next(batches)
    assert raised.value is error
    assert batches.get_state() == {"position": 3}  # the failed batch was not consumed
    _wait_until(lambda: not batches.running)
    with pytest.raises(StopIteration):
        next(batches)
    batches.close()


def test_a_consumer_exception_stops_and_joins_the_thread():
    source = Counting(length=10**9)
    with pytest.raises(RuntimeError, match="step failed"):
        with prefetch.DevicePrefetcher(source, lambda x: x, size=2) as batches:
            next(batches)
            _wait_until(lambda: source.position == 4)  # the producer now blocks on a full queue
            raise RuntimeError("step failed")
    assert not batches.running and not _prefetch_threads()
    batches.close()  # idempotent


def test_close_while_the_producer_waits_in_a_slow_read():
    release = threading.Event()

    class Slow(Counting):
        def __next__(self):
            if self.position == 1:
                release.wait(5)
            return super().__next__()

    source = Slow()
    batches = prefetch.DevicePrefetcher(source, lambda x: x, size=2, join_timeout=0.1)
    assert next(batches) == 0
    batches.close()  # the thread is inside the slow read: close returns after join_timeout
    release.set()
    _wait_until(lambda: not batches.running)
    assert source.position == 2  # it finished that read, then saw the stop and queued nothing
    with pytest.raises(StopIteration):
        next(batches)


def test_negative_size_is_refused():
    with pytest.raises(ValueError, match="size=-1"):
        prefetch.DevicePrefetcher(Counting(), lambda x: x, size=-1)


def test_digits_state_resumes_at_the_next_consumed_batch():
    """Real batches placed over the 8 test devices; a fresh iterator restored from the
    prefetcher's state yields exactly the batch the prefetcher hands out next."""
    mesh = sharding.make_mesh()
    settings = dict(split="train", batch_size=16, seed=3, shuffle=True)  # prepared on first use
    iterator = data.create_iterator("digits", process_index=0, process_count=1, **settings)
    placed = []

    def place(batch):
        placed.append(len(placed))
        return sharding.global_batch(batch, mesh)

    with prefetch.DevicePrefetcher(iterator, place, size=2) as batches:
        first = [next(batches) for _ in range(3)]
        _wait_until(lambda: len(placed) >= 5)  # two batches read ahead
        state = batches.get_state()
        fourth = next(batches)
    assert state["grain"] != iterator.get_state()["grain"]  # the iterator had read further
    assert first[0]["image"].sharding == sharding.data_sharding(mesh)
    restored = data.create_iterator("digits", process_index=0, process_count=1, **settings)
    restored.set_state(state)
    expected = next(restored)
    for key in ("image", "label"):
        np.testing.assert_array_equal(jax.device_get(fourth[key]), expected[key])
