"""Sampling throughput: model evaluations/s and images/s of DDPM-1000, DDIM-50, DPM-Solver++-20.

What it measures, per U-Net size and batch (float32, random parameters, one process):
  * one jitted model evaluation ``model_fn(params, x_t, t)`` (``train=False``) at the batch:
    median of ``--repeats`` calls -> evaluations/s and image-evaluations/s;
  * each sampler through the library's own ``samplers.sample`` (the whole loop compiled
    once): the first call (compile + run) and then the median of the timed runs.
    For sizes in ``--extrapolate`` (default c64 and cifar10) the samplers run ``--probe_steps``
    steps and the per-step time is scaled to the method's step count: those rows are marked
    "extrap.". Small sizes run the full 1000 / 50 / 20 steps.

Run (from the repository root):
  .venv/bin/python benchmarks/sampling.py --quick            # a few minutes
  .venv/bin/python benchmarks/sampling.py --sizes cifar10 --batch 16 --probe_steps 4

Read it: ``s/image`` = seconds per generated image at that batch; ``loop/eval`` compares the
per-step time inside the sampler with the bare evaluation (> 1 means loop overhead).
Results go to ``benchmarks/results/sampling.json``; the load average is recorded per row.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp

from benchmarks import common
from diffusion_jax import _runtime, samplers
from diffusion_jax.models import make_model_fn
from diffusion_jax.train import config as config_lib

METHODS = [("ddpm", 1000), ("ddim", 50), ("dpm_solver++", 20)]


def measure_size(size: str, batch: int, repeats: int, probe_steps: int | None):
    """Rows for one size: the bare evaluation, then each method."""
    config, shape = common.size_config(size, "float32", batch)
    model = config_lib.build_model(config, shape, None)
    schedule = config_lib.build_schedule(config)
    x = jax.random.normal(jax.random.key(0), (batch, *shape))
    t = jnp.full((batch,), 500, jnp.int32)
    params = jax.jit(model.init)(jax.random.key(1), x[:1], t[:1])["params"]
    model_fn = make_model_fn(model, train=False)
    forward = _runtime.jit(model_fn)
    load = common.load_average()[0]
    start = time.perf_counter()
    jax.block_until_ready(forward(params, x, t))
    forward_compile = time.perf_counter() - start
    evaluation = common.summarize(common.time_calls(lambda: forward(params, x, t), repeats))
    rows = [
        {
            "size": size,
            "batch": batch,
            "params": common.count_params(params),
            "method": "model evaluation",
            "steps": 1,
            "compile_and_first_s": forward_compile,
            "run_s": evaluation,
            "evals_per_s": 1 / evaluation["median"],
            "image_evals_per_s": batch / evaluation["median"],
            "load": load,
            "load_after": common.load_average()[0],
        }
    ]
    for method, num_steps in METHODS:
        steps = num_steps if probe_steps is None else probe_steps
        load = common.load_average()[0]

        def run(method=method, steps=steps):
            return samplers.sample(
                model_fn,
                params,
                schedule,
                jax.random.key(2),
                (batch, *shape),
                method=method,
                num_steps=steps,
                variance=config.diffusion.variance,
            )

        start = time.perf_counter()
        jax.block_until_ready(run())
        first = time.perf_counter() - start
        timed = common.summarize(common.time_calls(run, 1 if steps >= 100 else repeats))
        per_step = timed["median"] / steps
        total = per_step * num_steps
        rows.append(
            {
                "size": size,
                "batch": batch,
                "method": f"{method}-{num_steps}",
                "steps": num_steps,
                "timed_steps": steps,
                "extrapolated": steps != num_steps,
                "compile_and_first_s": first,
                "run_s": timed,
                "per_step_s": per_step,
                "total_s": total,
                "s_per_image": total / batch,
                "images_per_s": batch / total,
                "evals_per_s": 1 / per_step,
                "loop_over_eval": per_step / evaluation["median"],
                "load": load,
                "load_after": common.load_average()[0],
            }
        )
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the default grid (a few minutes)")
    parser.add_argument("--sizes", nargs="+", default=["digits", "c64", "cifar10"])
    parser.add_argument("--batch", type=int, help="batch for every size (default per size)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--probe_steps", type=int, default=4)
    parser.add_argument("--extrapolate", nargs="*", default=["c64", "cifar10"])
    parser.add_argument("--out", default="sampling")
    args = parser.parse_args()

    default_batch = {"digits": 64, "issue": 16, "c64": 16, "cifar10": 16}
    meta = common.machine()
    print(f"# {meta['date']}  {meta['cpu']} x{meta['cores']}  jax {meta['jax']}", flush=True)
    rows = []
    for size in args.sizes:
        probe = args.probe_steps if size in args.extrapolate else None
        new = measure_size(size, args.batch or default_batch[size], args.repeats, probe)
        rows.extend(new)
        for r in new:
            r["label"] = r["method"] + (" (extrap.)" if r.get("extrapolated") else "")
            r["median_ms"] = 1e3 * r["run_s"]["median"]
        common.print_table(
            new,
            [
                ("size", "size", "s"),
                ("batch", "batch", "d"),
                ("label", "method", "s"),
                ("compile_and_first_s", "first s", ".1f"),
                ("median_ms", "timed ms", ".1f"),
                ("evals_per_s", "evals/s", ".2f"),
                ("image_evals_per_s", "img-evals/s", ".0f"),
                ("total_s", "total s", ".1f"),
                ("images_per_s", "images/s", ".3f"),
                ("loop_over_eval", "loop/eval", ".2f"),
                ("load", "load", ".1f"),
            ],
        )
    meta["peak_rss_mb"] = common.peak_rss_mb()
    path = common.write_json(args.out, {"machine": meta, "results": rows})
    print(f"# peak RSS {meta['peak_rss_mb']:.0f} MiB; wrote {path}")


if __name__ == "__main__":
    main()
