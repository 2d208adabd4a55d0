"""The training loop's throughput against its own jitted step's, measured in one process.

Two measurements of the digits recipe (``configs/digits.py``), interleaved in rounds so that a
change in the shared machine's load falls on both:
  * ``step``: the trainer's jitted train step alone (built as ``train_and_evaluate`` builds it,
    on a 1-device mesh), fed one real batch already on the device: ``--step_steps`` steps
    after ``--warmup`` warm-up steps, blocked on only at the end -> steps/s;
  * ``loop``: ``train_and_evaluate`` itself on a fresh workdir, with the config's logging,
    checkpoint, evaluation and sample intervals (``--loop_steps`` steps in all): steps/s of
    each log window from ``metrics.jsonl``. The first window (compilation) is dropped; the
    "steady" figure is the median of the others, the "overall" one is the steps of all the
    others over their summed time (it includes the checkpoints and evaluations that fall due).

The ratio loop/step is printed per round and overall (the loop's figure over the mean of the
step figures measured just before and after it). Results go to
``benchmarks/results/loop_throughput<--tag>.json``.

Run (from the repository root):
  .venv/bin/python benchmarks/loop_throughput.py                  # 2 rounds, ~6 min
  .venv/bin/python benchmarks/loop_throughput.py --rounds 1 --loop_steps 400 --tag _quick
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import numpy as np

from benchmarks import common
from configs import digits as digits_config
from diffusion_jax import _runtime
from diffusion_jax.train import loop, metrics, preflight, sharding


def _config(loop_steps: int, overrides: list[str]):
    config = digits_config.get_config()
    config.train.num_steps = loop_steps
    for item in overrides:  # dotted.key=value, parsed as a Python literal where possible
        key, value = item.split("=", 1)
        node = config
        *parents, leaf = key.split(".")
        for name in parents:
            node = node[name]
        node[leaf] = (
            type(node[leaf])(value)
            if not isinstance(node[leaf], bool)
            else (value.lower() in ("1", "true", "yes"))
        )
    return config


def measure_step(config, steps: int, warmup: int) -> dict:
    """Steps/s of the trainer's jitted step alone, on one device-resident real batch."""
    info, data_shape = preflight.check_data(config)
    mesh = sharding.make_mesh(jax.devices()[:1])
    run = loop._build(config, info, data_shape, mesh)
    iterator = loop._iterator(config, train=True)
    batch = sharding.global_batch(next(iterator), mesh)
    state = run.init()
    for _ in range(warmup):
        state, out = run.train_step(state, batch)
    jax.block_until_ready((state, out))
    load = common.load_average()[0]
    start = time.perf_counter()
    for _ in range(steps):
        state, out = run.train_step(state, batch)
    jax.block_until_ready((state, out))
    seconds = time.perf_counter() - start
    return {"steps": steps, "seconds": seconds, "steps_per_sec": steps / seconds, "load": load}


def measure_loop(config) -> dict:
    """Steps/s of ``train_and_evaluate`` per log window, from its ``metrics.jsonl``."""
    load = common.load_average()[0]
    with tempfile.TemporaryDirectory() as tmp:
        workdir = os.path.join(tmp, "run")
        start = time.perf_counter()
        loop.train_and_evaluate(config, workdir)
        seconds = time.perf_counter() - start
        records = [r for r in metrics.read_metrics(workdir) if "steps_per_sec" in r]
    windows = records[1:]  # the first holds the compilation
    steps = [b["step"] - a["step"] for a, b in zip(records, windows, strict=False)]
    rates = [r["steps_per_sec"] for r in windows]
    return {
        "steps": config.train.num_steps,
        "seconds_total": seconds,
        "window_rates": rates,
        "steady_steps_per_sec": statistics.median(rates),
        "overall_steps_per_sec": sum(steps) / sum(n / r for n, r in zip(steps, rates, strict=True)),
        "load": load,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--loop_steps", type=int, default=1000)
    parser.add_argument("--step_steps", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--tag", default="")
    parser.add_argument(
        "--set", nargs="*", default=[], help="config overrides, e.g. train.progress_bar=False"
    )
    args = parser.parse_args()
    _runtime.keep_freed_memory()  # as train.py does
    _runtime.quiet_library_logs()
    config = _config(args.loop_steps, args.set)
    machine = common.machine()
    step_runs = [measure_step(config, args.step_steps, args.warmup)]
    loop_runs = []
    for index in range(args.rounds):
        loop_runs.append(measure_loop(config))
        step_runs.append(measure_step(config, args.step_steps, args.warmup))
        step = (step_runs[index]["steps_per_sec"] + step_runs[index + 1]["steps_per_sec"]) / 2
        print(
            f"round {index}: step {step:.2f} steps/s | loop steady "
            f"{loop_runs[-1]['steady_steps_per_sec']:.2f} (ratio "
            f"{loop_runs[-1]['steady_steps_per_sec'] / step:.3f}), overall "
            f"{loop_runs[-1]['overall_steps_per_sec']:.2f} (ratio "
            f"{loop_runs[-1]['overall_steps_per_sec'] / step:.3f}) | load "
            f"{loop_runs[-1]['load']:.1f}",
            flush=True,
        )
    step_mean = float(np.mean([r["steps_per_sec"] for r in step_runs]))
    steady = float(np.mean([r["steady_steps_per_sec"] for r in loop_runs]))
    overall = float(np.mean([r["overall_steps_per_sec"] for r in loop_runs]))
    print(
        f"all: step {step_mean:.2f} steps/s, loop steady {steady:.2f} "
        f"(ratio {steady / step_mean:.3f}), overall {overall:.2f} "
        f"(ratio {overall / step_mean:.3f}); load at the end {common.load_average()}"
    )
    path = common.write_json(
        f"loop_throughput{args.tag}",
        {
            "machine": machine,
            "args": vars(args),
            "step": step_runs,
            "loop": loop_runs,
            "ratio_steady": steady / step_mean,
            "ratio_overall": overall / step_mean,
        },
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
