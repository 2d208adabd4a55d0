"""Probe: the train step with ``optim.accumulate_steps = k`` and its micro-batch scan unrolled.

``train_step.make_train_step`` runs the k micro-batches in a rolled ``jax.lax.scan``; on
XLA:CPU the convolution gradients inside a while-loop body are 25-100x slower than outside
one. This probe measures the proposed fix without touching the library: it replaces the
``jax`` that the trainer sees by a proxy whose ``lax.scan`` is
``functools.partial(jax.lax.scan, unroll=True)``, then runs ``train_step.measure_case``.

Run (from the repository root), and compare with the rolled scan:
  .venv/bin/python benchmarks/probe_accumulate_unroll.py --accumulate 2
  .venv/bin/python benchmarks/train_step.py --sizes digits --dtypes float32 --batches 64 \
      --scan_k 1 --steps 3 --accumulate 2

Since commit ea748fe the library's scan is unrolled itself, so the probe and
``train_step.py --accumulate 2`` now measure the same thing (the rolled figure below is from
before it).

Read it: ``step_s`` (seconds per optimiser step, same global batch) against the rolled
figure and the ``--accumulate 1`` step. Measured 2026-11-25 at load 1.5, digits batch 64:
rolled 1577 ms, unrolled 85 ms, no accumulation 88.5 ms.
"""

import argparse
import functools
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax

from benchmarks import train_step


class _LaxUnrolledScan:
    """``jax.lax`` with ``scan`` unrolled."""

    scan = staticmethod(functools.partial(jax.lax.scan, unroll=True))

    def __getattr__(self, name):
        return getattr(jax.lax, name)


class _JaxUnrolledScan:
    """``jax`` whose ``lax.scan`` is unrolled."""

    lax = _LaxUnrolledScan()

    def __getattr__(self, name):
        return getattr(jax, name)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="digits")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--accumulate", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    train_step.jax = _JaxUnrolledScan()
    result = train_step.measure_case(
        args.size, "float32", args.batch, args.steps, 1, 0.0, accumulate=args.accumulate
    )
    keys = ("size", "batch", "accumulate_steps", "step_s", "compile_s", "load_before")
    print(json.dumps({k: result[k] for k in keys}, default=float))


if __name__ == "__main__":
    main()
