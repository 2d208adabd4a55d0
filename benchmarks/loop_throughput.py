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
    others over their summed time (it includes the checkpoint and evaluation at step 500 when
    ``--loop_steps`` passes it, as the default 550 does).

Each round runs the loop once per ``--prefetch`` value (``data.prefetch``: 0 reads and places
each batch in the loop's thread, as the loop did before the prefetcher; 2 is the default), each
followed by a step measurement. The ratio loop/step is printed per loop run (over the mean of
the step figures measured just before and after it), and its median over the rounds per value.
Results go to ``benchmarks/results/loop_throughput<--tag>.json``.

Run (from the repository root):
  .venv/bin/python benchmarks/loop_throughput.py                  # 2 rounds, ~8 min idle
  .venv/bin/python benchmarks/loop_throughput.py --rounds 1 --loop_steps 200 --prefetch 2
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


class IsolatedStep:
    """The trainer's jitted step (built once, as ``train_and_evaluate`` builds it, on a
    1-device mesh) and one real batch already on the device."""

    def __init__(self, config):
        info, data_shape = preflight.check_data(config)
        mesh = sharding.make_mesh(jax.devices()[:1])
        self.run = loop._build(config, info, data_shape, mesh)
        self.batch = sharding.global_batch(next(loop._iterator(config, train=True)), mesh)
        self.state = self.run.init()

    def measure(self, steps: int, warmup: int) -> dict:
        """Steps/s over ``steps`` steps after ``warmup``, blocked on only at the end."""
        state = self.state
        for _ in range(warmup):
            state, out = self.run.train_step(state, self.batch)
        jax.block_until_ready((state, out))
        load = common.load_average()[0]
        start = time.perf_counter()
        for _ in range(steps):
            state, out = self.run.train_step(state, self.batch)
        jax.block_until_ready((state, out))
        seconds = time.perf_counter() - start
        self.state = state
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
    parser.add_argument("--loop_steps", type=int, default=550)
    parser.add_argument("--step_steps", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument(
        "--prefetch", type=int, nargs="+", default=[0, 2], help="data.prefetch values to run"
    )
    parser.add_argument("--tag", default="")
    parser.add_argument(
        "--set", nargs="*", default=[], help="config overrides, e.g. train.progress_bar=False"
    )
    args = parser.parse_args()
    _runtime.keep_freed_memory()  # as train.py does
    _runtime.quiet_library_logs()
    config = _config(args.loop_steps, args.set)
    machine = common.machine()
    # The loops compile the step once; later runs read it from this cache.
    jax.config.update("jax_compilation_cache_dir", tempfile.mkdtemp(prefix="loop_throughput"))
    isolated = IsolatedStep(config)
    step_runs = [isolated.measure(args.step_steps, args.warmup)]
    loop_runs = []
    for index in range(args.rounds):
        for prefetch in args.prefetch:
            config.data.prefetch = prefetch
            result = measure_loop(config)
            step_runs.append(isolated.measure(args.step_steps, args.warmup))
            step = (step_runs[-2]["steps_per_sec"] + step_runs[-1]["steps_per_sec"]) / 2
            result.update(
                prefetch=prefetch,
                round=index,
                step_steps_per_sec=step,
                ratio_steady=result["steady_steps_per_sec"] / step,
                ratio_overall=result["overall_steps_per_sec"] / step,
            )
            loop_runs.append(result)
            print(
                f"round {index} prefetch {prefetch}: step {step:.2f} steps/s | loop steady "
                f"{result['steady_steps_per_sec']:.2f} (ratio {result['ratio_steady']:.3f}), "
                f"overall {result['overall_steps_per_sec']:.2f} (ratio "
                f"{result['ratio_overall']:.3f}) | load {result['load']:.1f}",
                flush=True,
            )
    summary = {}
    for prefetch in args.prefetch:
        runs = [r for r in loop_runs if r["prefetch"] == prefetch]
        # Medians over the rounds: on a loaded machine one round can be far off.
        summary[prefetch] = {
            key: float(np.median([r[key] for r in runs]))
            for key in (
                "step_steps_per_sec",
                "steady_steps_per_sec",
                "ratio_steady",
                "ratio_overall",
            )
        }
        print(
            f"prefetch {prefetch}: "
            + ", ".join(f"{k} {v:.3f}" for k, v in summary[prefetch].items())
        )
    print(f"load at the end {common.load_average()}")
    path = common.write_json(
        f"loop_throughput{args.tag}",
        {
            "machine": machine,
            "args": vars(args),
            "step": step_runs,
            "loop": loop_runs,
            "summary": summary,
        },
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
