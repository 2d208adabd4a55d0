"""Train-step throughput, compile time, FLOPs, peak memory and host overhead of the real step.

What it measures, per (U-Net size, compute dtype, batch size), each case in a fresh process:
  * the trainer's own step: ``step_lib.make_train_step`` + ``create_train_state`` jitted on a
    1-device mesh exactly as ``train_and_evaluate`` does (shardings, donated state), fed a
    random uint8 batch already on the device (no input pipeline);
  * compile time (``lower`` + ``compile``), and the FLOPs XLA's cost analysis counts per step;
  * steady-state time per step: ``--steps`` back-to-back steps after one warm-up step, each
    blocked on (min and median), -> steps/s, images/s, achieved GFLOP/s and its fraction of a
    float32 ``jnp.dot`` [2048x2048] peak measured in the same process just before;
  * host overhead: a trivial jitted step with the same state (same leaves, donated), and the
    time ``train_step(...)`` takes to *return* (dispatch) vs to finish;
  * several steps per dispatch: ``lax.scan`` of the same step over ``--scan_k`` stacked
    batches, reported per step (skipped where one step takes over ``--scan_max_step_s``);
  * peak host RSS of the process (VmHWM), so it includes compilation.

Every jit is ``diffusion_jax._runtime.jit`` with the trainer's choice of XLA:CPU library
fusions (``config_lib.cpu_library_fusions``: off below ``model.ch`` 128, on from it; set
``--library_fusions on|off`` to force); ``DIFFUSION_JAX_XLA_DEFAULTS=1`` in the environment
measures XLA's defaults everywhere (the JSON records it in ``machine.compiler_options``).

Sizes (``benchmarks/common.py``): ``digits`` (configs/digits.py), ``issue`` (the issue's 1.5M
shape), ``c64`` (32x32x3, ch 64), ``cifar10`` (configs/cifar10.py, 35.7M). For sizes in
``--extrapolate`` (default cifar10) only 1-2 steps are timed at the small batches given, and
the per-image time is scaled linearly to the config's own batch (128): the table marks these.

Run (from the repository root):
  .venv/bin/python benchmarks/train_step.py --quick            # a few minutes
  .venv/bin/python benchmarks/train_step.py --sizes c64 --batches 8 32 64 --dtypes float32

Read it: ``ms/step`` is the median (min in the JSON); ``GFLOP/s`` = XLA's FLOPs / median
step; ``%peak`` against the matmul peak of the same process. ``host ms`` is the trivial
step's time, an upper bound on what dispatch costs each step; ``scan x k`` is the per-step
time when k steps run in one dispatch. On this shared 2-core machine the load average is
printed with each row: compare rows measured at similar load. Results go to
``benchmarks/results/train_step.json``.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common
from diffusion_jax import _runtime
from diffusion_jax.train import config as config_lib
from diffusion_jax.train import sharding
from diffusion_jax.train import step as step_lib


def _random_images(rng: np.random.Generator, batch: int, shape) -> np.ndarray:
    return rng.integers(0, 256, (batch, *shape), dtype=np.uint8)


def measure_case(
    size: str,
    dtype: str,
    batch: int,
    steps: int,
    scan_k: int,
    scan_max: float,
    accumulate: int = 1,
    prng: str = "",
    library_fusions: str = "auto",
):
    """Everything about one (size, dtype, batch) in this process; returns a dict."""
    if prng:
        jax.config.update("jax_default_prng_impl", prng)
    config, shape = common.size_config(size, dtype, batch)
    config.optim.accumulate_steps = accumulate
    config.train.cpu_library_fusions = library_fusions
    peak = common.matmul_peak_gflops()
    load_before = common.load_average()[0]
    mesh = sharding.make_mesh(jax.devices()[:1])
    schedule = config_lib.build_schedule(config)
    model = config_lib.build_model(config, shape, None)
    tx, learning_rate = config_lib.build_optimizer(config)
    init, _, state_shardings = step_lib.create_train_state(config, model, tx, shape, mesh)
    step_fn = step_lib.make_train_step(config, model, schedule, tx, learning_rate, None)
    batch_sharding, replicated = sharding.data_sharding(mesh), sharding.replicated(mesh)
    fusions = config_lib.cpu_library_fusions(config)
    # The trainer's jit of a step (state donated, batch sharded); the trivial step reuses it.
    jit_step = functools.partial(
        _runtime.jit,
        library_fusions=fusions,
        in_shardings=(state_shardings, batch_sharding),
        out_shardings=(state_shardings, replicated),
        donate_argnums=0,
    )
    train_step = jit_step(step_fn)
    rng = np.random.default_rng(0)
    state = init()
    params = common.count_params(state.params)
    batches = [
        sharding.global_batch({"image": _random_images(rng, batch, shape)}, mesh) for _ in range(2)
    ]

    start = time.perf_counter()
    lowered = train_step.lower(state, batches[0])
    lower_s = time.perf_counter() - start
    start = time.perf_counter()
    compiled = lowered.compile()
    compile_s = time.perf_counter() - start
    flops = common.compiled_flops(compiled)

    state, out = compiled(state, batches[0])  # warm-up
    jax.block_until_ready(out)
    step_times, dispatch_times = [], []
    for i in range(steps):
        start = time.perf_counter()
        state, out = compiled(state, batches[i % 2])
        dispatch_times.append(time.perf_counter() - start)
        jax.block_until_ready(out)
        step_times.append(time.perf_counter() - start)
    if not np.isfinite(float(out["loss"])):
        raise FloatingPointError(f"non-finite loss in {size} {dtype} b{batch}")
    step = common.summarize(step_times)

    # Host overhead: the same state in and out (donated), nothing computed but a counter.
    def trivial(state, batch):
        del batch
        return state.replace(step=state.step + 1), {"loss": jnp.zeros((), jnp.float32)}

    trivial_step = jit_step(trivial)
    state, out = trivial_step(state, batches[0])
    jax.block_until_ready(out)
    trivial_times = []
    for _ in range(20):
        start = time.perf_counter()
        state, out = trivial_step(state, batches[0])
        jax.block_until_ready(out)
        trivial_times.append(time.perf_counter() - start)
    num_leaves = len(jax.tree.leaves(state))

    # k steps per dispatch. Rolled (a while loop) and unrolled: XLA:CPU runs the backward
    # convolutions of a rolled loop body far slower than outside a loop (see README).
    scan = None
    if scan_k > 1 and step["median"] <= scan_max:
        stacked = {"image": jnp.stack([batches[i % 2]["image"] for i in range(scan_k)])}
        scan = {"k": scan_k}
        for name, unroll, repeats in [
            ("rolled", 1, 1),
            ("unrolled", True, max(2, steps // scan_k)),
        ]:

            def multi_step(state, stacked, unroll=unroll):
                return jax.lax.scan(step_fn, state, stacked, unroll=unroll)

            start = time.perf_counter()
            scan_jit = _runtime.jit(multi_step, library_fusions=fusions, donate_argnums=0)
            scan_compiled = scan_jit.lower(state, stacked).compile()
            compile_seconds = time.perf_counter() - start
            state, out = scan_compiled(state, stacked)
            jax.block_until_ready(out)
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                state, out = scan_compiled(state, stacked)
                jax.block_until_ready(out)
                times.append((time.perf_counter() - start) / scan_k)
            scan[name] = {"per_step_s": common.summarize(times), "compile_s": compile_seconds}

    median = step["median"]
    return {
        "size": size,
        "dtype": dtype,
        "batch": batch,
        "accumulate_steps": accumulate,
        "prng": prng or jax.config.jax_default_prng_impl,
        "params": params,
        "lower_s": lower_s,
        "compile_s": compile_s,
        "step_s": step,
        "dispatch_s": common.summarize(dispatch_times),
        "steps_per_s": 1 / median,
        "images_per_s": batch / median,
        "flops_per_step": flops,
        "gflops_per_s": None if flops is None else flops / median / 1e9,
        "matmul_peak_gflops": peak,
        "fraction_of_peak": None if flops is None else flops / median / 1e9 / peak,
        "trivial_step_s": common.summarize(trivial_times),
        "state_leaves": num_leaves,
        "scan": scan,
        "peak_rss_mb": common.peak_rss_mb(),
        "load_before": load_before,
        "load_after": common.load_average()[0],
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the default grid (a few minutes)")
    parser.add_argument("--sizes", nargs="+", default=["digits", "c64", "cifar10"])
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--batches", nargs="+", type=int, help="batch sizes for every size")
    parser.add_argument("--steps", type=int, default=10, help="timed steps (small sizes)")
    parser.add_argument("--scan_k", type=int, default=4)
    parser.add_argument("--scan_max_step_s", type=float, default=0.3)
    parser.add_argument("--extrapolate", nargs="*", default=["cifar10"])
    parser.add_argument(
        "--accumulate", type=int, default=1, help="config.optim.accumulate_steps (micro-batches)"
    )
    parser.add_argument(
        "--prng",
        default="",
        help="jax_default_prng_impl, e.g. rbg or unsafe_rbg (default threefry)",
    )
    parser.add_argument(
        "--library_fusions",
        default="auto",
        choices=("auto", "on", "off"),
        help="config.train.cpu_library_fusions (XLA:CPU YNNPACK fusions in the step)",
    )
    parser.add_argument("--out", default="train_step")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: one case, JSON to stdout
    args = parser.parse_args()

    if args.one:
        case = json.loads(args.one)
        print(json.dumps(measure_case(**case), default=float))
        return

    default_batches = {"digits": [64, 256], "issue": [16, 64], "c64": [8, 32], "cifar10": [4]}
    rows = []
    meta = common.machine()
    print(f"# {meta['date']}  {meta['cpu']} x{meta['cores']}  jax {meta['jax']}", flush=True)
    for size in args.sizes:
        extrapolated = size in args.extrapolate
        for dtype in args.dtypes:
            for batch in args.batches or default_batches[size]:
                case = {
                    "size": size,
                    "dtype": dtype,
                    "batch": batch,
                    "steps": 2 if extrapolated else args.steps,
                    "scan_k": 1 if extrapolated else args.scan_k,
                    "scan_max": args.scan_max_step_s,
                    "accumulate": args.accumulate,
                    "prng": args.prng,
                    "library_fusions": args.library_fusions,
                }
                result = common.run_isolated(__file__, ["--one", json.dumps(case)])
                result.update(case_args=case, extrapolated=extrapolated)
                if "error" in result:
                    print(f"{size} {dtype} b{batch}: FAILED {result['error']}", flush=True)
                    rows.append(result)
                    continue
                if extrapolated:
                    full = common.size_config(size)[0].data.batch_size
                    per_image = result["step_s"]["median"] / batch
                    result["extrapolated_batch"] = full
                    result["extrapolated_step_s"] = per_image * full
                rows.append(result)
                _print_row(result)
    payload = {"machine": meta, "results": rows}
    path = common.write_json(args.out, payload)
    print(f"# wrote {path}")


def _print_row(r):
    scan = r.get("scan")
    flops = r["flops_per_step"]
    scan_cell = "-"
    if scan:
        scan_cell = (
            f"x{scan['k']} rolled {1e3 * scan['rolled']['per_step_s']['median']:.0f} / unrolled "
            f"{1e3 * scan['unrolled']['per_step_s']['median']:.1f} ms/step"
        )
    extra = ""
    if "extrapolated_step_s" in r:
        extra = f"  -> b{r['extrapolated_batch']} ~{r['extrapolated_step_s']:.1f} s/step (extrap.)"
    variant = f" acc{r['accumulate_steps']}" if r["accumulate_steps"] > 1 else ""
    variant += f" {r['prng']}" if r["prng"] != "threefry2x32" else ""
    print(
        f"{r['size']:8s}{variant} {r['dtype']:8s} b{r['batch']:<4d} "
        f"params {r['params'] / 1e6:6.2f}M  "
        f"compile {r['lower_s'] + r['compile_s']:6.1f}s  "
        f"step {1e3 * r['step_s']['median']:8.1f} ms (min {1e3 * r['step_s']['min']:.1f}, "
        f"n={r['step_s']['n']})  {r['images_per_s']:7.1f} img/s  "
        f"{'-' if flops is None else f'{flops / 1e9:.1f}'} GFLOP  "
        f"{r['gflops_per_s'] or 0:5.1f} GFLOP/s = {100 * (r['fraction_of_peak'] or 0):4.1f}% of "
        f"{r['matmul_peak_gflops']:.0f}  host {1e3 * r['trivial_step_s']['median']:.2f} ms "
        f"(dispatch {1e3 * r['dispatch_s']['median']:.2f})  "
        f"scan {scan_cell}  "
        f"RSS {r['peak_rss_mb']:.0f} MiB  load {r['load_before']:.1f}/{r['load_after']:.1f}"
        f"{extra}",
        flush=True,
    )


if __name__ == "__main__":
    main()
